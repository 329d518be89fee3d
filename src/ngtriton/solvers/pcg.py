"""Preconditioned, truncated conjugate gradients for a damped Fisher (Hessian-free style).

NGD's Krylov solve rarely needs to converge: what matters is how much of the quadratic model
``φ(x) = ½xᵀAx − bᵀx`` each product buys. :func:`pcg` therefore

- takes a diagonal preconditioner (any positive vector ``d``: it solves with ``M = diag(d)``),
- stops when the relative residual reaches ``tol``, after ``maxiter`` iterations, or when φ
  stalls: at iteration ``i`` with ``k = max(min_window, ⌈window_frac·i⌉)``, once
  ``(φᵢ − φᵢ₋ₖ)/φᵢ < k·progress_tol`` (Martens 2010, §4.4),
- returns ``A·x`` alongside ``x`` (it is ``b − r``, free from the recurrence), so a caller can
  evaluate the quadratic model of ``x`` without another product.

From ``x0 = 0`` the iterates satisfy ``xᵀAx = xᵀb`` (Galerkin), with or without a
preconditioner. With a preconditioner, at λ = 0 the solve of a singular system returns the
minimum-``M``-norm solution rather than the Euclidean minimum-norm one; every solution gives the
same function-space step ``J·x``.

Scalars are read on the host every iteration (the progress test needs φ); on the CPU that is
free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _vecops as vo
from .result import SolveResult, check_vector

Matvec = Callable[[Tensor], Tensor]


@dataclass(repr=False)
class PCGResult(SolveResult):
    """A :class:`SolveResult` plus ``Ax`` (= ``b − r``) and the quadratic's value ``phi`` at
    ``x``; ``reason`` may also be ``"stalled"`` (φ's relative progress fell below the bound)."""

    Ax: Tensor | None = None
    phi: float = 0.0


def pcg(matvec: Matvec, b: Tensor, *, precond: Tensor | None = None, x0: Tensor | None = None,
        tol: float = 1e-6, maxiter: int = 50, progress_tol: float = 5e-4, min_window: int = 10,
        window_frac: float = 0.1) -> PCGResult:
    """Solve ``A x = b`` (``A`` symmetric PSD, as ``matvec``) by CG preconditioned with
    ``diag(precond)`` (``None``: plain CG), stopping as the module docstring says.

    A breakdown (``pᵀAp`` not finite or ≤ 0) freezes the iterate: ``x`` stays finite."""
    b = check_vector(b, "b")
    n = b.numel()
    if precond is not None:
        precond = check_vector(precond, "precond", n)
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter: expected an integer ≥ 1, got {maxiter!r}")
    for name, value in (("tol", tol), ("progress_tol", progress_tol)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{name}: expected a number ≥ 0, got {value!r}")
    bnorm = float(vo.norm(b))
    if bnorm == 0.0 or not math.isfinite(bnorm):
        x = torch.zeros_like(b)
        return PCGResult(x=x, iterations=0, residual=0.0 if bnorm == 0 else math.nan,
                         converged=bnorm == 0, reason="zero rhs" if bnorm == 0 else "breakdown",
                         method="pcg", Ax=torch.zeros_like(b), phi=0.0)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = check_vector(x0, "x0", n).to(b.dtype).clone()
        r = b - matvec(x)
    z = r / precond if precond is not None else r
    p = z.clone()
    rz = float(vo.dot(r, z))
    phis = [-0.5 * float(vo.dot(x, b + r))]
    history: list[float] = []
    reason = "maxiter"
    tiny = torch.finfo(b.dtype).tiny
    res = math.sqrt(float(vo.dot(r, r))) / bnorm
    if res <= tol:
        reason, maxiter = "converged", 0
    for i in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = float(vo.dot(p, Ap))
        if not math.isfinite(pAp) or pAp <= tiny:
            reason = "breakdown"
            break
        alpha = rz / pAp
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        rr = float(vo.dot(r, r))
        phi = -0.5 * float(vo.dot(x, b + r))
        if not (math.isfinite(rr) and math.isfinite(phi)):
            x.sub_(p, alpha=alpha)
            r.add_(Ap, alpha=alpha)
            reason = "breakdown"
            break
        phis.append(phi)
        res = math.sqrt(rr) / bnorm
        history.append(res)
        if res <= tol:
            reason = "converged"
            break
        k = max(min_window, math.ceil(window_frac * i))
        if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * progress_tol:
            reason = "stalled"
            break
        z = r / precond if precond is not None else r
        rz_new = float(vo.dot(r, z))
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return PCGResult(x=x, iterations=len(history), residual=res,
                     converged=reason in ("converged", "stalled"), reason=reason, method="pcg",
                     history=history, Ax=b - r, phi=phis[-1])
