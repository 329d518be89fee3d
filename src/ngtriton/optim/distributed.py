"""NGD on ``torch.distributed``: data parallel, each rank holding its shard of the batch.

What is communicated, per step (``P``: trainable parameters, ``k``: Fisher products):

- the gradient: averaged by DDP's own hooks during the closure's backward (NGD adds nothing);
  around a plain model (no DDP wrapper, e.g. Lightning's ``strategy="ddp"`` hands NGD the
  unwrapped ``LightningModule``) NGD checks, with one small all-gather, whether the ranks'
  gradients already agree, and averages them itself (one all-reduce of ``P`` numbers) if not;
- every Fisher product ``F v``: one all-reduce (sum, then ÷ world size) of the ``P``-vector, so
  that ``F`` is the mean over all ranks' examples. Every vector of the solve is then the same,
  bit for bit, on every rank (an all-reduce hands every rank the same result), so the solvers'
  dot products, the quadratic model, ρ and every branch agree with no further communication;
- the losses: one small all-gather of ``[loss, damping, steps]`` at the start (the loss is
  averaged, the state is checked to be in sync) and one all-reduce of the trial loss;
- the generator for the curvature subsample and Monte-Carlo labels: rank 0's state is
  broadcast when the step draws from it (a few KB).

A non-finite value on one rank becomes non-finite on every rank through the all-reduces, so
every rank skips the same step. The sample-space (dual) solve and LSMR on the factor ``A``
would need the rows of every rank: they are refused. A rank that raises leaves the others
waiting in a collective until the process group's timeout (``init_process_group(timeout=)``)
or until the failed process exits: then they raise too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Methods that need the rows of A (sample space): refused across processes.
REFUSED_METHODS = ("dual", "dual-direct", "dual-krylov", "lsmr", "lsqr")


def _ddp_class() -> type | None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DistributedDataParallel


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(module, ddp)``: a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper's
    inner module and the wrapper, or ``(model, None)``. NGD linearizes and hooks the inner
    module (DDP calls it with the same inputs); the wrapper is kept for ``no_sync``."""
    ddp = _ddp_class()
    if ddp is not None and isinstance(model, ddp):
        return model.module, model
    return model, None


def refuse_sharded(params: list[Tensor]) -> None:
    """FSDP2 (``fully_shard``) turns parameters into sharded DTensors: not supported yet (see
    docs/distributed.md for the design); a clear error instead of one from deep in a step."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(p, DTensor) for p in params):
        raise NotImplementedError(
            "model: its parameters are sharded DTensors (FSDP2's fully_shard); NGD supports "
            "data parallel training (DistributedDataParallel) only, so far: see "
            "docs/distributed.md")


def world(ddp: nn.Module | None) -> Any | None:
    """The process group NGD communicates on, or None when it runs in one process."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = getattr(ddp, "process_group", None) if ddp is not None else None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@dataclass
class CommStats:
    """The communication of one step: all-reduces (and gathers/broadcasts), bytes sent into
    them (each rank's payload), and wall seconds spent in them on this rank."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    products: int = 0  # of the calls: all-reduces of Fisher products


class Comm:
    """One step's collectives on ``group`` (every rank calls the same ones in the same order)."""

    def __init__(self, group: Any, ddp: nn.Module | None) -> None:
        self.group = group
        self.ddp = ddp
        self.size = torch.distributed.get_world_size(group)
        self.rank = torch.distributed.get_rank(group)
        self.stats = CommStats()

    def _timed(self, nbytes: int, fn: Callable[[], Any], product: bool = False) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.bytes += nbytes
        self.stats.products += int(product)
        return out

    def mean_(self, t: Tensor, product: bool = False) -> Tensor:
        """``t`` ← the mean of ``t`` over the ranks, in place (sum, then ÷ world size)."""
        dist = torch.distributed
        self._timed(t.numel() * t.element_size(),
                    lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group), product)
        return t.div_(self.size)

    def gather(self, values: list[float]) -> Tensor:
        """Every rank's ``values``, as a (world size, len(values)) float64 tensor."""
        dist = torch.distributed
        mine = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        self._timed(mine.numel() * 8, lambda: dist.all_gather(out, mine, group=self.group))
        return torch.stack(out)

    def scalar_mean(self, value: float) -> float:
        return float(self.mean_(torch.tensor([value], dtype=torch.float64))[0])

    # --- the step's agreements ---
    def start(self, opt: Any, loss: float) -> float:
        """The mean loss over the ranks, after checking that their optimizers are in step."""
        rows = self.gather([loss, float(opt.damping), float(opt.steps)])
        if not (bool((rows[:, 1] == rows[0, 1]).all()) and bool((rows[:, 2] == rows[0, 2]).all())):
            raise RuntimeError(
                "NGD: the ranks' optimizers are out of step (damping "
                f"{rows[:, 1].tolist()}, steps {rows[:, 2].tolist()}); build NGD the same way "
                "on every rank and load the same checkpoint everywhere")
        if opt.curvature_fraction < 1.0 or opt.fisher == "mc":
            self.sync_generator(opt._generator)
        return float(rows[:, 0].mean())

    def sync_generator(self, generator: torch.Generator) -> None:
        """Rank 0's generator state everywhere: the subsample and Monte-Carlo labels agree."""
        dist = torch.distributed
        state = generator.get_state()
        self._timed(state.numel(), lambda: dist.broadcast(
            state, src=dist.get_global_rank(self.group, 0)
            if self.group is not dist.group.WORLD else 0, group=self.group))
        generator.set_state(state)

    def gradient(self, g: Tensor) -> None:
        """Make ``g`` the ranks' mean gradient, in place. Under DDP it already is. Otherwise the
        ranks compare ``[Σg, Σg²]`` (one small all-gather): equal everywhere means already
        averaged (an outer DDP, e.g. Lightning's), else one all-reduce of ``g``."""
        if self.ddp is not None:
            return
        with torch.no_grad():
            check = [float(g.sum(dtype=torch.float64)), float(g.double().square().sum())]
        rows = self.gather(check)
        if not bool((rows == rows[0]).all()):  # NaN is unequal to itself: averaged, it spreads
            self.mean_(g)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Around the trial call: a DDP forward would otherwise wait for a gradient reduction
        that the trial's backward (through the loss head only) never starts."""
        if self.ddp is None:
            yield
            return
        with self.ddp.no_sync():
            yield


def context(opt: Any) -> Comm | None:
    """The step's :class:`Comm`, or None when NGD runs in one process."""
    ddp = getattr(opt, "_ddp", None)
    group = world(ddp)
    if group is None:
        return None
    if opt.method in REFUSED_METHODS:
        raise ValueError(f"method: {opt.method!r} needs every rank's rows of the Fisher factor "
                         "(the sample-space solve); across processes use 'auto', 'cg', 'pcg' or "
                         "'minres'")
    return Comm(group, ddp)


def resolve_method(method: str, op: Any, opt: Any) -> str:
    """NGD's method choice, never a sample-space one across processes."""
    if method in ("dual-direct", "auto") and opt.method == "auto":
        return "cg" if op.damping > 0 or opt.fisher != "mc" else "minres"
    return method


class DistributedOperator:
    """A Fisher operator whose products ``F v`` (and ``(F + λI) v``) are averaged over the
    ranks: one all-reduce of the P-vector each. Its factor products refer to this rank's rows
    only and are refused."""

    def __init__(self, op: Any, comm: Comm) -> None:
        self._op = op
        self._comm = comm

        def averaged(product: Callable[..., Tensor]) -> Callable[..., Tensor]:
            def run(v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                out = product(v, *args, **kwargs)
                return comm.mean_(out.contiguous(), product=True)
            return run

        self.fisher_matvec = averaged(op.fisher_matvec)
        self.damped_matvec = averaged(op.damped_matvec)

        def refused(*args: Any, **kwargs: Any) -> Tensor:
            raise RuntimeError("NGD: the Fisher factor's products hold this rank's rows only; "
                               "they are not available across processes")
        for name in ("factor_matvec", "factor_rmatvec", "factor_matmat", "factor_rmatmat"):
            setattr(self, name, refused)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.damped_matvec(v)

    def __getattr__(self, name: str) -> Any:  # everything but the products: the operator's
        if name == "_op":
            raise AttributeError(name)
        return getattr(self._op, name)
