"""NGD across processes (torch.distributed, gloo, CPU): two ranks, each with half the batch,
must give the parameters of one process on the whole batch; a rank that fails makes every rank
fail, not hang; the sample-space solve is refused."""

from __future__ import annotations

import datetime
import os
import traceback
import zlib

import pytest
import torch
from torch import nn

import ngtriton

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
STEPS = 6
BATCH = 32  # the union batch; each rank holds BATCH // WORLD rows
# Solves converged far below the 1e-10 asked of the parameters. The "adam" preconditioner at its
# default power 0.5 makes PCG on this tiny problem sensitive to round-off (a 1e-15 change of g
# moves a 20-iteration solve by 1e-2, in one process too), so a milder power keeps the
# comparison about distribution, not about that conditioning. lr 4 makes one step rejected.
OPTIONS = dict(lr=4.0, damping=0.3, warm_start=True, momentum="auto", preconditioner="adam",
               preconditioner_power=0.1, tol=1e-13, maxiter=300, progress_tol=0.0,
               damping_floor=0.1)


def _port(name: str) -> int:
    """A fixed port per test, off the default 29500 and other runs."""
    return 31000 + zlib.crc32(name.encode()) % 2000


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (BATCH,), generator=g)
    return x, y


def _train(model: nn.Module, opt: ngtriton.NGD, rank: int = 0, world: int = 1,
           fail_at: int | None = None) -> None:
    for step in range(STEPS):
        x, y = _batch(step)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.step(_closure(model, opt, x[rows], y[rows], fail=fail_at == step))


def _closure(model, opt, x, y, fail=False):
    calls = [0]

    def closure():
        calls[0] += 1
        if fail and calls[0] == 2:  # inside the step: the trial call
            raise RuntimeError("injected fault")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _init(rank: int, port: int, timeout_s: float = 120.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))


def _worker_equal(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        results = {}
        for wrap in ("ddp", "plain"):
            model = _model()
            net = nn.parallel.DistributedDataParallel(model) if wrap == "ddp" else model
            opt = ngtriton.NGD(net, **OPTIONS)
            _train(net, opt, rank, WORLD)
            results[wrap] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "damping": opt.damping, "rejected": opt.rejected_total,
                "losses": [h["loss"] for h in opt.history],
                "comm": opt.communication}
        torch.save(results, f"{out}.{rank}")
        _misc(rank, out)
        dist.barrier()  # leave together: a peer gone mid-collective aborts the other
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort the process


def _worker_fault(rank: int, port: int, out: str) -> None:
    _init(rank, port, timeout_s=5.0)
    model = _model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = ngtriton.NGD(net, **OPTIONS)
    try:
        _train(net, opt, rank, WORLD, fail_at=2 if rank == 1 else None)
        outcome = "returned"
    except Exception as err:  # what every rank must do
        outcome = f"raised {type(err).__name__}: {str(err)[:200]}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(outcome)
    if rank == 1:  # the failed rank exits: its peer must not wait for it forever
        os._exit(0)
    dist.destroy_process_group()


def _misc(rank: int, out: str) -> None:
    """The sample-space solve is refused; the subsample keeps the ranks equal."""
    lines = []
    model = _model()
    net = nn.parallel.DistributedDataParallel(model)
    opt = ngtriton.NGD(net, method="dual")
    x, y = _batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[rank::2]), y[rank::2])
        loss.backward()
        return loss
    try:
        opt.step(closure)
        lines.append("dual: no error")
    except ValueError as err:
        lines.append(f"dual: {err}")
    # The curvature subsample, with a generator seeded differently on each rank: rank 0's
    # draws are used everywhere, so the ranks stay equal.
    opt = ngtriton.NGD(net, curvature_fraction=0.5, seed=rank, momentum="auto")
    for _ in range(3):
        opt.step(closure)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(rows, flat)
    lines.append(f"subsample max difference: {float((rows[0] - rows[1]).abs().max())}")
    state = opt._generator.get_state().double()
    states = [torch.empty_like(state) for _ in range(WORLD)]
    dist.all_gather(states, state)
    lines.append(f"generators equal: {bool(torch.equal(states[0], states[1]))}")
    with open(f"{out}.misc.{rank}", "w") as f:
        f.write("\n".join(lines))


def _spawn(fn, name: str, out: str, timeout: float) -> list:
    ctx = torch.multiprocessing.spawn(fn, args=(_port(name), out), nprocs=WORLD, join=False)
    import time
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{name}: the ranks hung for {timeout} s")
    return ctx.processes


_RUNS: dict[str, str] = {}


def _equal_run(tmp_path) -> str:
    """The two-rank run (once per session): DDP, plain model, and the checks of _misc."""
    if "out" not in _RUNS:
        out = str(tmp_path / "result")
        _spawn(_worker_equal, "test_two_ranks_equal_one_process", out, timeout=120)
        _RUNS["out"] = out
    return _RUNS["out"]


def test_two_ranks_equal_one_process_on_the_union_batch(tmp_path):
    out = _equal_run(tmp_path)
    model = _model()
    opt = ngtriton.NGD(model, **OPTIONS)
    _train(model, opt)
    assert opt.rejected_total > 0  # the test covers a rejected step
    ref = [p.detach() for p in model.parameters()]
    for rank in range(WORLD):
        try:
            results = torch.load(f"{out}.{rank}", weights_only=False)
        except Exception:
            traceback.print_exc()
            raise
        for wrap, res in results.items():
            assert res["rejected"] == opt.rejected_total, wrap
            assert res["damping"] == pytest.approx(opt.damping, rel=1e-12), wrap
            assert res["losses"] == pytest.approx([h["loss"] for h in opt.history], rel=1e-12)
            for a, b in zip(res["params"], ref):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
            comm = res["comm"]
            assert comm is not None and comm.products > 0 and comm.bytes > 0


def test_a_failing_rank_makes_every_rank_raise(tmp_path):
    out = str(tmp_path / "fault")
    _spawn(_worker_fault, "test_a_failing_rank_makes_every_rank_raise", out, timeout=60)
    outcomes = [_read(f"{out}.{rank}") for rank in range(WORLD)]
    assert outcomes[1].startswith("raised RuntimeError: injected fault"), outcomes
    assert outcomes[0].startswith("raised"), outcomes


def test_dual_refused_and_subsample_in_sync(tmp_path):
    """Run by the workers of the first test (one spawn fewer)."""
    out = _equal_run(tmp_path)
    for rank in range(WORLD):
        lines = _read(f"{out}.misc.{rank}").splitlines()
        assert lines[0].startswith("dual: method: 'dual' needs every rank's rows"), lines
        assert lines[1] == "subsample max difference: 0.0", lines
        assert lines[2] == "generators equal: True", lines
