"""Sample-space ("dual", kernel) solves: ``n = Aᵀ (AAᵀ + λI)⁺ b`` in R dimensions (R rows of A).

Cheaper than the primal solve when R = rows of the factor ≪ P; exact by ``eigh`` when R is small.
``op`` follows the FisherOperator protocol (``factor_matvec``/``rmatvec``/``matmat``/``rmatmat``,
``damped_matvec``, ``damping``, ``num_rows``, ``dtype``, ``device``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _vecops as vo
from .lsmr import lsmr
from .minres import minres
from .result import SolveResult, trivial_result


def kernel_matrix(op: Any, chunk_size: int = 256) -> Tensor:
    """``K = A Aᵀ`` (R × R), built as ``A (Aᵀ I)`` in column chunks, then symmetrised."""
    R = int(op.num_rows)
    eye = torch.eye(R, dtype=op.dtype, device=op.device)
    cols = [op.factor_matmat(op.factor_rmatmat(eye[:, i:i + chunk_size]))
            for i in range(0, R, chunk_size)]
    K = torch.cat(cols, dim=1)
    return (K + K.T) * 0.5


# Aᵀ is kept as a dense (P, R) matrix when it fits in this many elements; else only K = AAᵀ.
DENSE_FACTOR_MAX_ELEMENTS = 1 << 26


def _relres(op: Any, rhs: Tensor, x: Tensor) -> float:
    rnorm = float(vo.norm(rhs))
    return float(vo.norm(rhs - op.damped_matvec(x))) / rnorm if rnorm > 0 else 0.0


def dual_direct(op: Any, rhs: Tensor | None = None, b: Tensor | None = None, *,
                chunk_size: int = 256, tol: float = 1e-6) -> SolveResult:
    """Exact solve through the eigendecomposition of ``K = AAᵀ`` (R × R).

    ``Aᵀ`` is formed column by column (R VJPs) and ``K = (Aᵀ)ᵀAᵀ`` is accumulated and
    diagonalised in float64, so a float32 operator loses only its own rounding of ``A``
    (error ~κ(A)·u, not κ(A)²·u). When the dense ``Aᵀ`` would exceed
    ``DENSE_FACTOR_MAX_ELEMENTS``, K is built as ``A(AᵀI)`` instead (R products of each kind).

    Eigenvalues of K below ``max((4·√min(P, R)·eps)², R·eps₆₄)·μ_max`` (dense Aᵀ: the rounding
    noise of A) or ``R·eps·μ_max`` (K from products), eps of the operator's dtype, are treated
    as zero at every λ: with a λ near or below that noise, ``1/(μ+λ)`` would multiply rounding
    noise by up to ``1/λ``. With ``b`` (``Aᵀb = rhs``): ``n = Aᵀ U diag(1/(μ+λ)) Uᵀ b`` over
    the kept eigenpairs (at λ = 0 the pseudo-inverse). With only ``rhs``: its part in
    range(Aᵀ) is solved as ``n = Aᵀ U diag(1/(μ(μ+λ))) Uᵀ A rhs`` (``F⁺ rhs`` at λ = 0); a
    remainder above ``√eps·‖rhs‖`` (an rhs outside range(F)) at λ > 0 goes through Woodbury,
    ``n = (rhs − Aᵀ(K+λ)⁻¹A rhs)/λ``, exact there. ``residual`` is computed explicitly,
    ``‖rhs − (F+λI)n‖/‖rhs‖`` (one more product), and ``converged`` says whether it is below
    ``max(tol, √eps)``, or below what a residual computed in the operator's dtype can reach,
    ``10·eps·‖F + λI‖·‖n‖/‖rhs‖`` (as MINRES's check); for an rhs outside range(F) at λ = 0 it
    is the residual's part inside range(F) that must be that small (the rest is left by ``F⁺``
    by construction).
    """
    if rhs is None and b is None:
        raise ValueError("rhs: dual_direct needs rhs or b")
    if rhs is None:
        rhs = op.factor_rmatvec(b)
    if float(vo.norm(rhs)) == 0.0:
        return trivial_result(torch.zeros_like(rhs), "dual-direct")
    lam = float(op.damping)
    R, P = int(op.num_rows), int(op.num_params)
    wide = torch.float64
    if R * P <= DENSE_FACTOR_MAX_ELEMENTS:
        eye = torch.eye(R, dtype=op.dtype, device=op.device)
        At = torch.cat([op.factor_rmatmat(eye[:, i:i + chunk_size])
                        for i in range(0, R, chunk_size)], dim=1).to(wide)
        K = At.T @ At
        apply_At = At.__matmul__
        apply_A = At.T.__matmul__
        # Rounding A to its dtype moves its singular values by at most ‖δA‖ ≤ eps·‖A‖_F
        # ≤ eps·√min(P, R)·σ_max (Weyl): below a few times that a direction is noise.
        # K itself is exact to float64 rounding.
        noise = 4.0 * min(P, R) ** 0.5 * torch.finfo(op.dtype).eps
        cutoff = max(noise * noise, R * torch.finfo(wide).eps)
    else:
        K = kernel_matrix(op, chunk_size).to(wide)
        cutoff = R * torch.finfo(op.dtype).eps  # K itself carries rounding of order eps·‖K‖

        def apply_At(u: Tensor) -> Tensor:
            return op.factor_rmatvec(u.to(op.dtype)).to(wide)

        def apply_A(v: Tensor) -> Tensor:
            return op.factor_matvec(v.to(op.dtype)).to(wide)

    if not bool(torch.isfinite(K).all()):  # a Fisher product went non-finite: end cleanly
        return SolveResult(x=torch.zeros_like(rhs), iterations=0, residual=math.inf,
                           converged=False, reason="breakdown", method="dual-direct",
                           history=[])
    # Eigenvalues at the noise level are zero, whatever λ: 1/(μ+λ) of a noise μ and a tiny λ
    # would multiply rounding noise by up to 1/λ. A true μ there is unknowable anyway.
    mu_all, U_all = torch.linalg.eigh((K + K.T) * 0.5)
    mu_max = max(float(mu_all.max()), 0.0) if mu_all.numel() else 0.0
    keep = mu_all > cutoff * mu_max
    mu, U = mu_all[keep], U_all[:, keep]
    rhs_w = rhs.to(wide)
    rnorm = float(torch.linalg.vector_norm(rhs_w))
    eps = torch.finfo(op.dtype).eps
    good = max(tol, eps ** 0.5)

    def accepted(res: float, x: Tensor) -> bool:
        """``res`` within tolerance, or within what a residual computed in the operator's
        dtype can reach, ~10·eps·‖F + λI‖·‖x‖/‖rhs‖ (as MINRES's explicit check)."""
        floor = 10 * eps * (mu_max + lam) * float(vo.norm(x)) / rnorm
        return res <= max(good, floor)

    def from_rhs() -> tuple[Tensor, float, bool]:
        """x for ``rhs`` alone, its residual, and whether it converged. The part of rhs in
        range(Aᵀ), ``Aᵀy``, is solved on the kept eigenpairs without dividing by λ. The rest,
        ``rhs⊥``: at λ = 0, F⁺ ignores it (the residual it leaves is not held against the
        solve); at λ > 0 it is rounding noise when below ``√eps·‖rhs‖`` (a gradient computed
        apart from A) and dropped, else (F+λI)⁻¹ sends it to ``rhs⊥/λ``: Woodbury's
        ``(rhs − Aᵀ(K+λ)⁻¹A rhs)/λ`` on every positive eigenpair, taken if its residual is
        smaller."""
        c = U.T @ apply_A(rhs_w)
        perp = rhs_w - apply_At(U @ (c / mu))
        x = apply_At(U @ (c / (mu * (mu + lam)))).to(op.dtype)
        r = rhs_w - op.damped_matvec(x).to(wide)
        res = float(torch.linalg.vector_norm(r)) / rnorm
        if lam == 0:
            return x, res, accepted(float(torch.linalg.vector_norm(r - perp)) / rnorm, x)
        small_perp = float(torch.linalg.vector_norm(perp)) <= eps ** 0.5 * rnorm
        if small_perp and accepted(res, x):
            return x, res, True
        pos = mu_all > 0
        Up = U_all[:, pos]
        cw = Up.T @ apply_A(rhs_w)
        xw = ((rhs_w - apply_At(Up @ (cw / (mu_all[pos] + lam)))) / lam).to(op.dtype)
        resw = _relres(op, rhs, xw)
        return (xw, resw, accepted(resw, xw)) if resw < res else (x, res, accepted(res, x))

    if b is not None:
        x = apply_At(U @ ((U.T @ b.to(wide)) / (mu + lam))).to(op.dtype)
        res = _relres(op, rhs, x)
        converged = accepted(res, x)
        if not converged:
            # b can be huge (a confidently wrong classifier: b ~ 1/√p of the true class) and
            # the b-formula then cancels badly; the same eigenpairs applied to rhs do not.
            x_rhs, res_rhs, conv_rhs = from_rhs()
            if res_rhs < res:
                x, res, converged = x_rhs, res_rhs, conv_rhs
    else:
        x, res, converged = from_rhs()
    return SolveResult(x=x, iterations=0, residual=res, converged=converged, reason="direct",
                       method="dual-direct", history=[])


def dual_krylov(op: Any, b: Tensor, *, rhs: Tensor | None = None, tol: float = 1e-6,
                atol: float = 0.0, maxiter: int | None = None, check_every: int = 1
                ) -> SolveResult:
    """MINRES on ``(K + λI) y = b`` with ``K y = A(Aᵀy)``, then ``n = Aᵀ y`` (λ > 0).

    ``history`` and the stopping test are then in the dual sense, ``‖b − (K+λ)y‖/‖b‖``. At
    λ = 0, K may be singular with ``b ∉ range(K)`` (R > rank A), where MINRES is unstable; the
    same Krylov space is then searched by LSMR on ``A`` (``n = A⁺b = AᵀK⁺b``, same cost per
    iteration), whose history is the primal normal-equation residual. Either way the reported
    ``residual`` is the primal ``‖rhs − (F+λI)n‖/‖rhs‖`` with ``rhs = Aᵀb``, computed
    explicitly (one more product), and ``converged`` needs it below ``max(tol, atol/‖rhs‖)``
    too (within a factor 2): a small dual residual does not bound the primal one.
    """
    lam = float(op.damping)
    if rhs is None:
        rhs = op.factor_rmatvec(b)
    if lam == 0:
        res = lsmr(op.factor_matvec, op.factor_rmatvec, b, tol=tol, atol=atol, maxiter=maxiter,
                   check_every=check_every)
        res.residual = _relres(op, rhs, res.x)
        res.method = "dual-krylov"
        res.converged = res.converged and res.residual <= _primal_threshold(rhs, tol, atol)
        return res

    def kmv(y: Tensor) -> Tensor:
        out = op.factor_matvec(op.factor_rmatvec(y))
        return out.add_(y, alpha=lam) if lam else out

    # A small dual residual does not bound the primal one: while the dual solve converged but
    # the primal residual is above the threshold, tighten the dual tolerance and go on from
    # the dual iterate (at most twice more).
    threshold = _primal_threshold(rhs, tol, atol)
    inner_tol, y, iterations, history = tol, None, 0, []
    for _ in range(3):
        inner = minres(kmv, b, x0=y, tol=inner_tol, atol=atol, maxiter=maxiter,
                       check_every=check_every)
        iterations += inner.iterations
        history += inner.history
        y = inner.x
        x = op.factor_rmatvec(y)
        primal = _relres(op, rhs, x)
        if primal <= threshold or not inner.converged or inner_tol <= torch.finfo(b.dtype).eps:
            break
        inner_tol *= max(1e-3, 0.25 * threshold / primal)
    inner.x, inner.iterations, inner.history = x, iterations, history
    inner.residual = primal
    inner.method = "dual-krylov"
    inner.converged = inner.converged and primal <= threshold
    return inner


def _primal_threshold(rhs: Tensor, tol: float, atol: float) -> float:
    rnorm = float(vo.norm(rhs))
    return 2 * max(tol, atol / rnorm if rnorm > 0 else 0.0, torch.finfo(rhs.dtype).eps)
