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


def _eig(K: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Kept eigenpairs of PSD ``K``: eigenvalues ``≤ cutoff·μ_max`` are treated as zero."""
    mu, U = torch.linalg.eigh(K)
    mu_max = float(mu.max()) if mu.numel() else 0.0
    keep = mu > cutoff * max(mu_max, 0.0)
    return mu[keep], U[:, keep]


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

    With ``b`` (``Aᵀb = rhs``): ``n = Aᵀ U diag(1/(μ+λ)) Uᵀ b`` over the kept eigenpairs
    (``1/μ`` for λ = 0, the pseudo-inverse). With only ``rhs``: Woodbury's
    ``n = (rhs − Aᵀ(K+λ)⁻¹A rhs)/λ`` (λ > 0) or ``n = Aᵀ K⁺K⁺ A rhs = F⁺ rhs`` (λ = 0), so an
    rhs outside range(F) is handled exactly too. At λ = 0 eigenvalues below
    ``max((4·√min(P, R)·eps)², R·eps₆₄)·μ_max`` (dense Aᵀ: the rounding noise of A) or
    ``R·eps·μ_max`` (K from products) are treated as zero, eps of the operator's dtype; with
    λ > 0 every eigenvalue is kept. ``residual`` is computed explicitly,
    ``‖rhs − (F+λI)n‖/‖rhs‖`` (one more product), and ``converged`` says whether it is below
    ``max(tol, √eps)``; for an inconsistent rhs at λ = 0 it is not small although
    ``n = F⁺ rhs`` then, and ``converged`` is True.
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
    # With damping (K + λI) is well conditioned: keep every direction. At λ = 0 the
    # pseudo-inverse must drop the noise-level eigenvalues.
    mu, U = _eig((K + K.T) * 0.5, cutoff if lam == 0 else 0.0)
    rhs_w = rhs.to(wide)
    good = max(tol, torch.finfo(op.dtype).eps ** 0.5)

    def from_rhs() -> Tensor:
        c = U.T @ apply_A(rhs_w)
        if lam > 0:  # Woodbury: (AᵀA + λI)⁻¹ = (I − Aᵀ(AAᵀ + λI)⁻¹A)/λ, no K⁺ needed
            return ((rhs_w - apply_At(U @ (c / (mu + lam)))) / lam).to(op.dtype)
        return apply_At(U @ (c / (mu * mu))).to(op.dtype)

    if b is not None:
        x = apply_At(U @ ((U.T @ b.to(wide)) / (mu + lam))).to(op.dtype)
        res = _relres(op, rhs, x)
        if not res <= good:
            # b can be huge (a confidently wrong classifier: b ~ 1/√p of the true class) and
            # the b-formula then cancels badly; the same eigenpairs applied to rhs do not.
            x_rhs = from_rhs()
            res_rhs = _relres(op, rhs, x_rhs)
            if res_rhs < res:
                x, res = x_rhs, res_rhs
    else:
        x = from_rhs()
        res = _relres(op, rhs, x)
    # An rhs outside range(F) at λ = 0 leaves a residual by construction (x = F⁺ rhs still).
    consistent = lam > 0 or b is not None
    converged = not consistent or res <= good
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
