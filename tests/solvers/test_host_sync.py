"""Host synchronisations of the Krylov loops (issue 17): with ``check_every=k`` a loop reads its
scalars on the host about once every k iterations, and its answer is the ``check_every=1``
answer.

On CUDA every host read of a device scalar (``float(t)``, ``bool(t)``, ``.item()``,
``.tolist()``) waits for the queue. On the CPU the solvers take shortcuts that read scalars
freely (``_vecops.host_reads_free``); the ``device_loops`` fixture turns them off, so the loops
run on the CPU exactly as on CUDA, and :class:`HostReads` counts what they read.
"""

from __future__ import annotations

import math

import pytest
import torch
from solver_helpers import random_factor
from torch.overrides import TorchFunctionMode

from ngtriton.solvers import _vecops as vo
from ngtriton.solvers import cg, lsmr, minres
from ngtriton.solvers.pcg import pcg

# Every way a tensor's value reaches Python (each one a synchronisation on CUDA).
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__complex__,
          torch.Tensor.numpy, torch.is_nonzero}
# Reads outside the loop: ‖b‖, the initial residual, the last check, and MINRES's explicit
# residual (three) or PCG's final φ.
SETUP_READS = 6


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor(2.0)
    with HostReads() as reads:
        float(t), int(t), bool(t > 1), t.item(), t.tolist(), math.isfinite(t)
        _ = [0, 1, 2][torch.tensor(1)]
    assert reads.count == 7


@pytest.fixture
def device_loops(monkeypatch):
    """The device-side loops and vector updates on the CPU, as on CUDA (no free reads)."""
    monkeypatch.setattr(vo, "host_reads_free", lambda t: False)


def _system(P: int = 40, R: int = 60, lam: float = 0.1, dtype=torch.float64, seed: int = 0):
    A = random_factor(R, P, cond=30.0, seed=seed)
    M = (A.T @ A + lam * torch.eye(P, dtype=torch.float64)).to(dtype)
    b = torch.randn(P, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64).to(dtype)
    return M, b


def _run(name: str, M: torch.Tensor, b: torch.Tensor, **kw):
    def mv(v):
        return M @ v
    if name == "cg":
        return cg(mv, b, **kw)
    if name == "minres":
        return minres(mv, b, **kw)
    if name == "lsmr":
        return lsmr(mv, mv, b, **kw)
    kw.setdefault("progress_tol", 0.0)
    return pcg(mv, b, precond=M.diagonal().clone(), **kw)


SOLVERS = ["cg", "pcg", "minres", "lsmr"]


@pytest.mark.usefixtures("device_loops")
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_reads_once_per_check(name, k):
    """Running to the cap: ≤ ⌈iterations/k⌉ reads in the loop (plus a few around it)."""
    M, b = _system()
    iters = 24
    with HostReads() as reads:
        res = _run(name, M, b, tol=0.0, maxiter=iters, check_every=k)
    assert res.reason == "maxiter" and res.iterations == iters
    assert reads.count <= math.ceil(iters / k) + SETUP_READS
    if k == 1:  # the counter does see the per-iteration checks
        assert reads.count >= iters


@pytest.mark.usefixtures("device_loops")
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("k", [1, 4])
def test_an_early_stop_is_seen_at_the_next_check(name, k):
    M, b = _system(P=30, lam=1.0)
    with HostReads() as reads:
        res = _run(name, M, b, tol=1e-6, maxiter=500, check_every=k)
    assert res.converged and 0 < res.iterations < 500
    assert reads.count <= math.ceil(res.iterations / k) + 1 + SETUP_READS


@pytest.mark.parametrize("name", ["pcg", "cg"])
def test_host_loop_reads_every_iteration_on_the_cpu(name):
    """The default on the CPU (check_every=1) keeps the host loop: reads there are free."""
    M, b = _system()
    with HostReads() as reads:
        _run(name, M, b, tol=0.0, maxiter=12)
    assert reads.count >= 12


def test_pcg_stall_test_reads_no_more_than_the_checks(device_loops):
    """Martens' progress test runs on the device, over φ values kept there."""
    M, b = _system(P=60, R=80)
    with HostReads() as reads:
        res = _run("pcg", M, b, tol=0.0, maxiter=60, progress_tol=0.05, min_window=2,
                   check_every=5)
    assert res.reason == "stalled" and res.iterations < 60
    assert reads.count <= math.ceil(res.iterations / 5) + 1 + SETUP_READS


# --- the answer does not depend on check_every -------------------------------------------------

PCG_CASES = {
    "converged": dict(tol=1e-3, maxiter=300),
    "stalled": dict(tol=0.0, maxiter=60, progress_tol=0.05, min_window=2),
    "maxiter": dict(tol=0.0, maxiter=7),
    "martens": dict(tol=1e-3, maxiter=50, progress_tol=5e-4),
}


def _same(a, b) -> None:
    assert (a.iterations, a.reason, a.converged) == (b.iterations, b.reason, b.converged)
    assert torch.equal(a.x, b.x)
    assert a.history == pytest.approx(b.history, rel=1e-12, abs=0)
    assert a.residual == pytest.approx(b.residual, rel=1e-12, abs=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(PCG_CASES))
def test_pcg_check_every_gives_the_same_answer(case, dtype):
    """On the CPU: check_every=1 (host loop) against the device loop, bit for bit in x."""
    M, b = _system(P=60, R=80, dtype=dtype)
    ref = _run("pcg", M, b, **PCG_CASES[case])
    assert ref.reason == case.replace("martens", ref.reason)
    for k in (2, 3, 7, 100):
        other = _run("pcg", M, b, check_every=k, **PCG_CASES[case])
        _same(other, ref)
        assert torch.equal(other.Ax, ref.Ax) and other.phi == ref.phi


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", SOLVERS)
def test_device_loop_is_the_same_for_every_check_every(device_loops, name, dtype):
    """The loops as on CUDA: check_every changes when the host looks, never the iterates."""
    M, b = _system(dtype=dtype)
    ref = _run(name, M, b, tol=1e-7, maxiter=200, check_every=1)
    for k in (2, 5, 64):
        other = _run(name, M, b, tol=1e-7, maxiter=200, check_every=k)
        assert (other.iterations, other.reason) == (ref.iterations, ref.reason)
        assert torch.equal(other.x, ref.x) and other.history == ref.history


@pytest.mark.parametrize("name", SOLVERS)
def test_device_loop_matches_the_cpu_loop(monkeypatch, name):
    """The CUDA-style loop on the CPU against the CPU's own, to round-off (which, past n
    iterations, may move the stop by an iteration)."""
    M, b = _system(P=30, lam=1.0)
    ref = _run(name, M, b, tol=1e-9, maxiter=200)
    monkeypatch.setattr(vo, "host_reads_free", lambda t: False)
    other = _run(name, M, b, tol=1e-9, maxiter=200, check_every=4)
    assert other.reason == ref.reason and abs(other.iterations - ref.iterations) <= 2
    torch.testing.assert_close(other.x, ref.x, rtol=1e-8, atol=1e-10)


# --- PCG's stops on the device -----------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("loops", ["cpu", "device"])
def test_pcg_nonfinite_product_freezes_the_iterate(monkeypatch, k, loops):
    if loops == "device":
        monkeypatch.setattr(vo, "host_reads_free", lambda t: False)
    M, b = _system()
    calls = {"n": 0}

    def bad(v):
        calls["n"] += 1
        return M @ v * (math.nan if calls["n"] > 3 else 1.0)
    res = pcg(bad, b, tol=0.0, maxiter=10, progress_tol=0.0, check_every=k)
    ref = pcg(lambda v: M @ v, b, tol=0.0, maxiter=3, progress_tol=0.0)
    assert res.reason == "breakdown" and not res.converged and res.iterations == 3
    assert torch.equal(res.x, ref.x) and res.phi == ref.phi
    assert bool(torch.isfinite(res.x).all()) and bool(torch.isfinite(res.Ax).all())


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("loops", ["cpu", "device"])
def test_pcg_overflowing_step_is_taken_back(monkeypatch, k, loops):
    """A finite pᵀAp whose step overflows r·r: the step is undone, the iterate frozen."""
    if loops == "device":
        monkeypatch.setattr(vo, "host_reads_free", lambda t: False)
    M, b = _system(dtype=torch.float32)
    calls = {"n": 0}

    def spiky(v):  # the 3rd product: one huge entry where p is 0, so pᵀAp stays finite
        calls["n"] += 1
        out = M @ v
        if calls["n"] == 3:
            out = out.clone()
            out[0] = 3e38 if v[0] == 0 else out[0]
        return out
    b = b.clone()
    b[0] = 0.0
    M = M.clone()
    M[0, 1:] = 0
    M[1:, 0] = 0  # keeps p[0] = 0 throughout
    res = pcg(spiky, b, tol=0.0, maxiter=10, progress_tol=0.0, check_every=k)
    assert res.reason == "breakdown" and res.iterations == 2
    assert bool(torch.isfinite(res.x).all())


def test_pcg_check_every_is_validated():
    M, b = _system()
    for bad, err in ((0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                     ("3", TypeError), (None, TypeError)):
        with pytest.raises(err, match="check_every"):
            pcg(lambda v: M @ v, b, check_every=bad)


# --- NGD's check_every -------------------------------------------------------------------------

def _ngd_history(check_every, method: str, steps: int = 3, **kw):
    import torch.nn.functional as F
    from torch import nn

    from ngtriton.optim import NGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    opt = NGD(model, method=method, check_every=check_every, **kw)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()], opt.history


DECISIONS = ("accepted", "reason", "iterations", "converged", "method")


@pytest.mark.parametrize(("method", "kw"), [
    ("cg", {}), ("minres", {}), ("pcg", {"preconditioner": "adam"}),
    ("pcg", {"preconditioner": "adam", "maxiter": 60, "tol": 1e-12, "momentum": "auto"}),
], ids=["cg", "minres", "pcg-adam", "pcg-stall"])
def test_ngd_check_every_changes_no_decision(method, kw):
    ref_params, ref = _ngd_history(None, method, **kw)
    one_params, _ = _ngd_history(1, method, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ref_params, one_params))  # None is 1 here
    params, hist = _ngd_history(3, method, **kw)
    for a, b in zip(hist, ref):
        assert {k: a[k] for k in DECISIONS} == {k: b[k] for k in DECISIONS}
        assert a["damping"] == b["damping"]
        assert a["residual"] == pytest.approx(b["residual"], rel=1e-9)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["cg", "pcg"])
def test_ngd_notices_a_nonfinite_product_between_checks(monkeypatch, method):
    """With check_every > 1 the loop goes on (frozen) past a NaN product: NGD must still see
    it and skip the step, as it does with the host loop."""
    from ngtriton.fisher import FisherOperator

    original = FisherOperator.damped_matvec
    calls = {"n": 0}

    def product(self, v):
        calls["n"] += 1
        out = original(self, v)
        return out * math.nan if calls["n"] == 2 else out
    monkeypatch.setattr(FisherOperator, "damped_matvec", product)
    for k in (1, 4):
        calls["n"] = 0
        _, hist = _ngd_history(k, method, steps=1, maxiter=10)
        assert hist[-1]["reason"] == "nonfinite_curvature", k
        assert calls["n"] >= 2


def test_ngd_default_check_every():
    from ngtriton.optim.config import CUDA_CHECK_EVERY, resolve_check_every

    assert resolve_check_every(None, torch.device("cpu")) == 1
    assert resolve_check_every(None, torch.device("cuda", 0)) == CUDA_CHECK_EVERY == 4
    assert resolve_check_every(7, torch.device("cuda")) == 7
    assert resolve_check_every(2, torch.device("cpu")) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pcg_through_the_fused_kernels(monkeypatch, dtype):
    """PCG's GPU loop with its vector updates in the Krylov kernels (Triton's interpreter
    off CUDA), against the CPU's host loop."""
    pytest.importorskip("triton")
    from ngtriton.kernels import krylov, triton_available

    if not triton_available():
        pytest.skip("triton cannot run here")
    M, b = _system(P=30, lam=1.0, dtype=dtype)
    # 8 iterations: past ~12 this system amplifies rounding differences (1e-16 → 1e-3 in 10
    # iterations, as a 1e-15 change of b shows), and the kernels round differently (FMA)
    ref = _run("pcg", M, b, tol=0.0, maxiter=8)
    monkeypatch.setattr(vo, "host_reads_free", lambda t: False)
    monkeypatch.setattr(vo, "_fused", lambda x: krylov)
    got = _run("pcg", M, b, tol=0.0, maxiter=8, check_every=3)
    assert (got.reason, got.iterations) == (ref.reason, ref.iterations) == ("maxiter", 8)
    assert got.history == pytest.approx(ref.history, rel=1e-9 if dtype == torch.float64 else 1e-4)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.x, ref.x, rtol=tol, atol=tol)
    torch.testing.assert_close(got.Ax, ref.Ax, rtol=tol, atol=tol)
