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
    not PSD, or the Krylov space is exhausted; in float16/bfloat16 also a step α or β, or an
    iterate, beyond the dtype's range); the iterate is then frozen, never NaN or Inf.

    Scalars stay on the device; the host reads them every ``check_every`` iterations (an int
    ≥ 1). On CUDA a value > 1 avoids one synchronisation per iteration at the price of up to
    ``check_every − 1`` wasted (frozen) iterations after the stop; the result is the same as
    with ``check_every=1`` (to round-off: on the CPU ``check_every=1`` runs a host loop).

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
    narrow = b.dtype in (torch.float16, torch.bfloat16)
    fmax = torch.finfo(b.dtype).max
    if check_every == 1 and vo.host_reads_free(b):
        rr_host = float(rr)
        if math.sqrt(rr_host) / bnorm <= threshold:
            return trivial_result(x, "cg", "converged", math.sqrt(rr_host) / bnorm)
        p.copy_(r)
        return _cg_host(matvec, x, r, p, rr_host, bnorm, threshold, maxiter, tiny, narrow)
    mon = Monitor(rr.sqrt() / bnorm, threshold, check_every)
    if mon.residual <= mon.threshold:
        return trivial_result(x, "cg", "converged", mon.residual)
    p.copy_(r)
    # In float16/bfloat16 a finite step can overflow the iterate (α·p > 65504): keep the
    # previous iterate there, restored unless the update stayed finite (two more passes).
    backup = torch.empty_like(x) if narrow else None
    for _ in range(maxiter):
        Ap = matvec(p)
        pAp = vo.dot(p, Ap)
        ok = mon.running & torch.isfinite(pAp) & (pAp > tiny)
        alpha = torch.where(ok, rr / torch.where(ok, pAp, 1), 0)
        if narrow:  # α itself must fit the vectors' dtype
            ok = ok & (alpha.abs() <= fmax)
            alpha = torch.where(ok, alpha, 0)
            backup.copy_(x)
        Ap = torch.where(ok, Ap, 0)  # a non-finite product must not leak into the iterates
        rr_new = vo.cg_update(x, r, p, Ap, alpha)
        if narrow:
            ok = ok & vo.all_finite(x) & torch.isfinite(rr_new)
            x.copy_(torch.where(ok, x, backup))
        beta = torch.where(ok & (rr > 0), rr_new / torch.where(rr > 0, rr, 1), 0)
        if narrow:
            beta = torch.where(beta <= fmax, beta, 0)
            ok = ok & (beta <= fmax)
        vo.update_direction(p, r, beta)
        rr = torch.where(ok, rr_new, rr)
        if mon.record(ok, rr.sqrt() / bnorm):
            break
    return mon.result(x, "cg")


def _cg_host(matvec: Matvec, x: Tensor, r: Tensor, p: Tensor, rr: float, bnorm: float,
             threshold: float, maxiter: int, tiny: float, narrow: bool) -> SolveResult:
    """The same iteration with its scalars on the host: off CUDA reading a scalar costs nothing,
    and Python floats spare the ~20 dispatches of 0-d tensor arithmetic per iteration that the
    device-side loop needs. Stops, reasons and the frozen-iterate guarantee are the same.

    ``narrow`` (float16/bfloat16 vectors): α and β must fit the dtype (torch refuses to convert
    a larger Python float), and ``x + αp`` is formed in a spare buffer and taken only when
    finite; either failure is a breakdown with the previous iterate kept."""
    history: list[float] = []
    reason = "maxiter"
    fmax = torch.finfo(x.dtype).max
    out, spare = x, (torch.empty_like(x) if narrow else None)
    for _ in range(maxiter):
        Ap = matvec(p)
        pAp = float(vo.dot(p, Ap))
        if not math.isfinite(pAp) or pAp <= tiny:  # M not PSD, NaN/Inf, or nothing left
            reason = "breakdown"
            break
        alpha = rr / pAp
        if narrow:
            if not abs(alpha) <= fmax:
                reason = "breakdown"
                break
            torch.add(x, p, alpha=alpha, out=spare)
        else:
            x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        rr_new = float(vo.dot(r, r))
        if narrow and not (math.isfinite(rr_new) and bool(vo.all_finite(spare))):
            reason = "breakdown"  # x is untouched
            break
        if not math.isfinite(rr_new):  # cannot happen after a finite pAp; keep x finite anyway
            x.sub_(p, alpha=alpha)
            reason = "breakdown"
            break
        if narrow:
            x, spare = spare, x
        history.append(math.sqrt(rr_new) / bnorm)
        if history[-1] <= threshold:
            reason = "converged"
            break
        beta = rr_new / rr
        if narrow and not beta <= fmax:
            reason = "breakdown"
            break
        torch.add(r, p, alpha=beta, out=p)  # p = r + βp, as vo.update_direction
        rr = rr_new
    if x is not out:  # the caller's buffer (a workspace's) holds the answer
        out.copy_(x)
    residual = history[-1] if history else math.sqrt(rr) / bnorm
    return SolveResult(x=out, iterations=len(history), residual=residual,
                       converged=reason == "converged", reason=reason, method="cg",
                       history=history)
