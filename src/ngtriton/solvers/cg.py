"""Conjugate gradients for symmetric positive semi-definite systems ``M x = b``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _vecops as vo
from .result import (
    Monitor,
    SolveResult,
    check_options,
    check_vector,
    default_maxiter,
    trivial_result,
)
from .workspace import Workspace

Matvec = Callable[[Tensor], Tensor]


def cg(matvec: Matvec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-6,
       atol: float = 0.0, maxiter: int | None = None, check_every: int = 1,
       workspace: Workspace | None = None) -> SolveResult:
    """Solve ``M x = b`` for symmetric PSD ``M`` (given as ``matvec``) by conjugate gradients.

    From ``x0 = 0`` on a consistent singular system the iterates stay in range(M), so CG
    returns the minimum-norm solution ``M⁺ b``. Stops when ``‖r‖/‖b‖ ≤ max(tol, atol/‖b‖)``
    (``r`` from the recurrence), after ``maxiter`` iterations (default
    ``min(2n + 10, 10_000)``), or on breakdown (``pᵀMp ≤ 0`` or non-finite scalars: ``M`` is
    not PSD, or the Krylov space is exhausted); the iterate is then frozen, never NaN.

    Scalars stay on the device; the host reads them every ``check_every`` iterations. On CUDA a
    value > 1 avoids one synchronisation per iteration at the price of up to ``check_every − 1``
    wasted (frozen) iterations after the stop.

    ``workspace``: a :class:`~ngtriton.solvers.workspace.Workspace` that holds ``x``, ``r`` and
    ``p`` between calls (no fresh allocations on the CPU); ``result.x`` is then its ``"cg.x"``
    buffer, overwritten by the next solve that uses the workspace.
    """
    b = check_vector(b, "b")
    tol, atol, maxiter, check_every = check_options(tol, atol, maxiter, check_every)
    workspace = Workspace.check(workspace)
    maxiter = default_maxiter(maxiter, b.numel())
    bnorm = float(vo.norm(b))
    if bnorm == 0.0:
        return trivial_result(torch.zeros_like(b), "cg")
    if x0 is not None:
        x0 = check_vector(x0, "x0", b.numel())

    def vector(name: str) -> Tensor:
        return torch.empty_like(b) if workspace is None else workspace.like(f"cg.{name}", b)

    x, r, p = vector("x"), vector("r"), vector("p")
    if workspace is not None:  # b or x0 may be an earlier result.x, i.e. one of these buffers
        ours = {t.untyped_storage().data_ptr() for t in (x, r, p)}
        if b.untyped_storage().data_ptr() in ours:
            b = b.clone()
        if x0 is not None and x0.untyped_storage().data_ptr() in ours:
            x0 = x0.clone()
    if x0 is None:
        x.zero_()
        r.copy_(b)
    else:
        x.copy_(x0)
        torch.sub(b, matvec(x), out=r)
    rr = vo.dot(r, r)
    threshold = max(tol, atol / bnorm, torch.finfo(rr.dtype).eps)  # as Monitor's
    tiny = torch.finfo(rr.dtype).tiny
    if not b.is_cuda and check_every == 1:
        rr_host = float(rr)
        if math.sqrt(rr_host) / bnorm <= threshold:
            return trivial_result(x, "cg", "converged", math.sqrt(rr_host) / bnorm)
        p.copy_(r)
        return _cg_host(matvec, x, r, p, rr_host, bnorm, threshold, maxiter, tiny)
    mon = Monitor(rr.sqrt() / bnorm, threshold, check_every)
    if mon.residual <= mon.threshold:
        return trivial_result(x, "cg", "converged", mon.residual)
    p.copy_(r)
    for _ in range(maxiter):
        Ap = matvec(p)
        pAp = vo.dot(p, Ap)
        ok = mon.running & torch.isfinite(pAp) & (pAp > tiny)
        Ap = torch.where(ok, Ap, 0)  # a non-finite product must not leak into the iterates
        alpha = torch.where(ok, rr / torch.where(ok, pAp, 1), 0)
        rr_new = vo.cg_update(x, r, p, Ap, alpha)
        beta = torch.where(ok & (rr > 0), rr_new / torch.where(rr > 0, rr, 1), 0)
        vo.update_direction(p, r, beta)
        rr = torch.where(ok, rr_new, rr)
        if mon.record(ok, rr.sqrt() / bnorm):
            break
    return mon.result(x, "cg")


def _cg_host(matvec: Matvec, x: Tensor, r: Tensor, p: Tensor, rr: float, bnorm: float,
             threshold: float, maxiter: int, tiny: float) -> SolveResult:
    """The same iteration with its scalars on the host: off CUDA reading a scalar costs nothing,
    and Python floats spare the ~20 dispatches of 0-d tensor arithmetic per iteration that the
    device-side loop needs. Stops, reasons and the frozen-iterate guarantee are the same."""
    history: list[float] = []
    reason = "maxiter"
    for _ in range(maxiter):
        Ap = matvec(p)
        pAp = float(vo.dot(p, Ap))
        if not math.isfinite(pAp) or pAp <= tiny:  # M not PSD, NaN/Inf, or nothing left
            reason = "breakdown"
            break
        alpha = rr / pAp
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        rr_new = float(vo.dot(r, r))
        if not math.isfinite(rr_new):  # cannot happen after a finite pAp; keep x finite anyway
            x.sub_(p, alpha=alpha)
            reason = "breakdown"
            break
        history.append(math.sqrt(rr_new) / bnorm)
        if history[-1] <= threshold:
            reason = "converged"
            break
        torch.add(r, p, alpha=rr_new / rr, out=p)  # p = r + βp, as vo.update_direction
        rr = rr_new
    residual = history[-1] if history else math.sqrt(rr) / bnorm
    return SolveResult(x=x, iterations=len(history), residual=residual,
                       converged=reason == "converged", reason=reason, method="cg",
                       history=history)
