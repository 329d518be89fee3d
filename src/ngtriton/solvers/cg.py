"""Conjugate gradients for symmetric positive semi-definite systems ``M x = b``."""

from __future__ import annotations

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

Matvec = Callable[[Tensor], Tensor]


def cg(matvec: Matvec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-6,
       atol: float = 0.0, maxiter: int | None = None, check_every: int = 1) -> SolveResult:
    """Solve ``M x = b`` for symmetric PSD ``M`` (given as ``matvec``) by conjugate gradients.

    From ``x0 = 0`` on a consistent singular system the iterates stay in range(M), so CG
    returns the minimum-norm solution ``M⁺ b``. Stops when ``‖r‖/‖b‖ ≤ max(tol, atol/‖b‖)``
    (``r`` from the recurrence), after ``maxiter`` iterations (default
    ``min(2n + 10, 10_000)``), or on breakdown (``pᵀMp ≤ 0`` or non-finite scalars: ``M`` is
    not PSD, or the Krylov space is exhausted); the iterate is then frozen, never NaN.

    Scalars stay on the device; the host reads them every ``check_every`` iterations. On CUDA a
    value > 1 avoids one synchronisation per iteration at the price of up to ``check_every − 1``
    wasted (frozen) iterations after the stop.
    """
    b = check_vector(b, "b")
    tol, atol, maxiter, check_every = check_options(tol, atol, maxiter, check_every)
    maxiter = default_maxiter(maxiter, b.numel())
    bnorm = float(vo.norm(b))
    if bnorm == 0.0:
        return trivial_result(torch.zeros_like(b), "cg")
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = check_vector(x0, "x0", b.numel()).to(b.dtype).clone()
        r = b - matvec(x)
    rr = vo.dot(r, r)
    mon = Monitor(rr.sqrt() / bnorm, max(tol, atol / bnorm), check_every)
    if mon.residual <= mon.threshold:
        return trivial_result(x, "cg", "converged", mon.residual)
    p = r.clone()
    tiny = torch.finfo(rr.dtype).tiny
    # Off CUDA a scalar read costs nothing: branch on the host instead of masking the vectors.
    host = not b.is_cuda and check_every == 1
    for _ in range(maxiter):
        Ap = matvec(p)
        pAp = vo.dot(p, Ap)
        ok = mon.running & torch.isfinite(pAp) & (pAp > tiny)
        if host:
            if not bool(ok):
                mon.record(ok, rr.sqrt() / bnorm)
                break
            alpha = rr / pAp
        else:
            Ap = torch.where(ok, Ap, 0)  # a non-finite product must not leak into the iterates
            alpha = torch.where(ok, rr / torch.where(ok, pAp, 1), 0)
        rr_new = vo.cg_update(x, r, p, Ap, alpha)
        beta = torch.where(ok & (rr > 0), rr_new / torch.where(rr > 0, rr, 1), 0)
        vo.update_direction(p, r, beta)
        rr = torch.where(ok, rr_new, rr)
        if mon.record(ok, rr.sqrt() / bnorm):
            break
    return mon.result(x, "cg")
