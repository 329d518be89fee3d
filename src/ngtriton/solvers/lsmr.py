"""LSMR (Fong & Saunders 2011): ``min ‖A x − b‖² + damp²‖x‖²`` with only ``A v`` and ``Aᵀ u``."""

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

Matvec = Callable[[Tensor], Tensor]


def _rotation(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Givens rotation ``(c, s, r)``: ``c a + s b = r = hypot(a, b)``, ``−s a + c b = 0``."""
    r = torch.hypot(a, b)
    pos = r > 0
    r_s = torch.where(pos, r, 1)
    return torch.where(pos, a / r_s, 1), torch.where(pos, b / r_s, 0), r


def _unit(v: Tensor, nv: Tensor) -> Tensor:
    """``v/‖v‖`` (0 when ``‖v‖`` is 0 or non-finite)."""
    good = torch.isfinite(nv) & (nv > 0)
    return torch.where(good, v * torch.where(good, 1 / torch.where(good, nv, 1), 0).to(v.dtype), 0)


def lsmr(matvec: Matvec, rmatvec: Matvec, b: Tensor, *, damp: float = 0.0, tol: float = 1e-6,
         atol: float = 0.0, maxiter: int | None = None, check_every: int = 1) -> SolveResult:
    """Minimum-norm solution of ``min ‖A x − b‖² + damp²‖x‖²`` by LSMR, from ``x0 = 0``.

    ``matvec(v) = A v`` (length ``len(b)``), ``rmatvec(u) = Aᵀ u``. There is no ``x0``: LSMR's
    minimum-norm property needs ``x0 = 0`` (solve for a correction yourself if you must).
    ``residual``/``history`` are the relative residual of the damped normal equations,
    ``‖Aᵀ(b − A x) − damp² x‖ / ‖Aᵀ b‖`` (LSMR's ``|ζ̄|``, free of charge), i.e. the quantity CG
    and MINRES report for ``F = AᵀA``, ``λ = damp²``. Stops when it is
    ``≤ max(tol, atol/‖Aᵀb‖)``; when a bidiagonalisation coefficient vanishes (``α`` or
    ``β ≤ eps·‖A‖``: Krylov space exhausted); on non-finite scalars (breakdown, iterate frozen);
    or after ``maxiter`` iterations (default ``min(2·min(len(b), len(x)) + 10, 10_000)``).
    ``check_every``: as in :func:`~ngtriton.solvers.cg`.

    Per iteration, besides the two products, the vector work is four passes on CUDA (fused
    kernels through ``_vecops``: ``u = Av − α u`` with ``‖u‖``, ``u /= ‖u‖``, ``v = Aᵀu − β v``
    with ``‖v‖``, then ``v /= ‖v‖`` with the ``h̄``, ``x``, ``h`` updates), with every scalar on
    the device.
    """
    b = check_vector(b, "b")
    tol, atol, maxiter, check_every = check_options(tol, atol, maxiter, check_every)
    damp_f = float(damp)
    if not damp_f >= 0.0 or damp_f == float("inf"):
        raise ValueError(f"damp: expected a finite number ≥ 0, got {damp!r}")
    beta = vo.norm(b)
    u = _unit(b, beta)
    v = rmatvec(u)
    alpha = vo.norm(v)
    bnorm, alpha_f = (float(t) for t in torch.stack([beta, alpha]).tolist())
    if not (math.isfinite(bnorm) and math.isfinite(alpha_f)):
        return SolveResult(x=torch.zeros_like(v), iterations=0, residual=math.inf,
                           converged=False, reason="breakdown", method="lsmr", history=[])
    if bnorm == 0.0 or alpha_f == 0.0:  # Aᵀb = 0: x = 0 solves the normal equations
        return trivial_result(torch.zeros_like(v), "lsmr")
    maxiter = default_maxiter(maxiter, min(b.numel(), v.numel()))
    v = _unit(v, alpha)
    normar0 = alpha_f * bnorm
    sdt = alpha.dtype
    eps = torch.finfo(sdt).eps
    dmp = torch.tensor(damp_f, dtype=sdt, device=b.device)

    def const(c: float) -> Tensor:
        return torch.full((), c, dtype=sdt, device=b.device)

    zetabar, alphabar = alpha * beta, alpha
    rho, rhobar, cbar, sbar = const(1.0), const(1.0), const(1.0), const(0.0)
    norma2 = alpha * alpha
    h, hbar, x = v.clone(), torch.zeros_like(v), torch.zeros_like(v)
    mon = Monitor(const(1.0), max(tol, atol / normar0), check_every)
    # u, v, h, h̄, x are this solve's own buffers (u, v fresh from _unit), updated in place
    for _ in range(maxiter):
        beta = vo.bidiag_step(u, matvec(v), alpha)  # u = Av − α u, β = ‖u‖
        finb = torch.isfinite(beta)
        beta = torch.where(finb, beta, 0)
        vo.normalize(u, beta)
        alpha = vo.bidiag_step(v, rmatvec(u), beta)  # v = Aᵀu − β v, α = ‖v‖
        fina = torch.isfinite(alpha)
        alpha = torch.where(fina, alpha, 0)
        # rotations: Q̂ (damping), Q (bidiagonal → upper), Q̄ (Rᵀ → R̄)
        _, _, alphahat = _rotation(alphabar, dmp)
        rhoold = rho
        c, s, rho = _rotation(alphahat, beta)
        thetanew = s * alpha
        alphabar = c * alpha
        rhobarold = rhobar
        thetabar = sbar * rho
        cbar, sbar, rhobar = _rotation(cbar * rho, thetanew)
        zeta = cbar * zetabar
        zetabar = -sbar * zetabar
        den1, den2 = rhoold * rhobarold, rho * rhobar
        ok = mon.running & finb & fina & (den1 > 0) & (den2 > 0) & (rho > 0)
        c1 = torch.where(ok, thetabar * rho / torch.where(ok, den1, 1), 0)
        c2 = torch.where(ok, zeta / torch.where(ok, den2, 1), 0)
        c3 = torch.where(ok, thetanew / torch.where(ok, rho, 1), 0)
        vo.lsmr_update(x, h, hbar, v, alpha, c1, c2, c3)  # v /= α; h̄, x, h
        norma2 = norma2 + beta * beta + alpha * alpha
        norma = norma2.sqrt()
        exhausted = finb & fina & ((beta <= eps * norma) | (alpha <= eps * norma))
        if mon.record(ok, zetabar.abs() / normar0, exhausted):
            break
    return mon.result(x, "lsmr")
