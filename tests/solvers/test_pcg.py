"""Preconditioned truncated CG against dense float64 oracles (numpy/torch.linalg)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from solver_helpers import random_factor

from ngtriton.solvers.pcg import pcg


def _system(P: int = 30, R: int = 40, lam: float = 0.1, seed: int = 0):
    A = random_factor(R, P, cond=30.0, seed=seed)
    M = A.T @ A + lam * torch.eye(P, dtype=torch.float64)
    b = torch.randn(P, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return M, b


@pytest.mark.parametrize("precond", [None, "diag", "random"])
def test_converges_to_the_dense_solution(precond):
    M, b = _system()
    d = {None: None, "diag": M.diagonal().clone(),
         "random": torch.rand(30, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(3)) + 0.1}[precond]
    res = pcg(lambda v: M @ v, b, precond=d, tol=1e-12, maxiter=200, progress_tol=0.0)
    assert res.converged and res.reason == "converged"
    torch.testing.assert_close(res.x, torch.linalg.solve(M, b), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.Ax, M @ res.x, rtol=1e-8, atol=1e-9)  # Ax = b − r
    assert res.phi == pytest.approx(float(0.5 * res.x @ M @ res.x - b @ res.x), rel=1e-9)


def test_a_good_preconditioner_needs_fewer_iterations():
    scales = torch.logspace(-3, 3, 30, dtype=torch.float64)
    M, b = _system()
    M = scales[:, None] * M * scales[None, :]  # badly scaled coordinates
    plain = pcg(lambda v: M @ v, b, tol=1e-8, maxiter=500, progress_tol=0.0)
    pre = pcg(lambda v: M @ v, b, precond=M.diagonal().clone(), tol=1e-8, maxiter=500,
              progress_tol=0.0)
    assert pre.converged and pre.iterations < plain.iterations / 2


def test_truncated_iterates_are_galerkin_and_descend():
    """From 0 every iterate satisfies xᵀMx = xᵀb, so φ(x) = −½xᵀb < 0, and φ decreases."""
    M, b = _system()
    d = M.diagonal().clone()
    phis = []
    for k in range(1, 6):
        res = pcg(lambda v: M @ v, b, precond=d, tol=0.0, maxiter=k, progress_tol=0.0)
        x = res.x
        assert float(x @ M @ x) == pytest.approx(float(x @ b), rel=1e-9)
        phis.append(res.phi)
    assert all(a > c for a, c in itertools.pairwise(phis))
    assert phis[-1] < 0


def test_stops_when_the_quadratic_stalls():
    M, b = _system(P=60, R=80)
    res = pcg(lambda v: M @ v, b, tol=0.0, maxiter=60, progress_tol=0.05, min_window=2)
    assert res.reason == "stalled" and res.converged and res.iterations < 60


def test_first_iterate_is_the_preconditioned_gradient_scaled_by_curvature():
    """x₁ = α·M⁻¹b with α = bᵀM⁻¹b / (M⁻¹b)ᵀA(M⁻¹b): the Adam-like direction, exact length."""
    M, b = _system()
    d = torch.rand(30, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    res = pcg(lambda v: M @ v, b, precond=d, tol=0.0, maxiter=1, progress_tol=0.0)
    z = b / d
    torch.testing.assert_close(res.x, z * (b @ z) / (z @ M @ z), rtol=1e-12, atol=0)


def test_breakdown_keeps_x_finite():
    M, b = _system()

    def bad(v):
        out = M @ v
        return out * math.nan if bad.calls > 1 else out
    bad.calls = 0

    def counted(v):
        bad.calls += 1
        return bad(v)
    res = pcg(counted, b, tol=0.0, maxiter=10, progress_tol=0.0)
    assert res.reason == "breakdown" and not res.converged
    assert bool(torch.isfinite(res.x).all()) and res.iterations == 1


def test_zero_rhs_and_bad_arguments():
    M, b = _system()
    res = pcg(lambda v: M @ v, torch.zeros_like(b))
    assert res.converged and res.iterations == 0 and not res.x.any()
    with pytest.raises(ValueError, match="maxiter"):
        pcg(lambda v: M @ v, b, maxiter=0)
    with pytest.raises(ValueError, match="progress_tol"):
        pcg(lambda v: M @ v, b, progress_tol=-1.0)
