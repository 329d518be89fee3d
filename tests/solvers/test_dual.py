"""Sample-space solves: kernel matrix, direct (eigh) and Krylov (MINRES on AAᵀ + λI)."""

from __future__ import annotations

import pytest
import torch
from solver_helpers import RTOL, SHAPES, TOL, make_operator, rel_err

from ngtriton.solvers import dual_direct, dual_krylov, kernel_matrix

DTYPES = [torch.float64, torch.float32]


def test_kernel_matrix_in_chunks():
    op = make_operator(23, 9, 4, seed=1)
    K = kernel_matrix(op, chunk_size=5)
    assert torch.allclose(K, op.A @ op.A.T, atol=1e-12) and torch.equal(K, K.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_direct_with_b(shape, damping, dtype):
    op = make_operator(*shape, damping=damping, dtype=dtype, seed=21)
    res = dual_direct(op, b=op.b)
    assert res.reason == "direct" and res.converged and res.method == "dual-direct"
    assert rel_err(res.x, op.reference(op.gradient())) < RTOL[dtype]
    assert res.residual < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_direct_arbitrary_rhs_is_pinv(shape, damping, dtype):
    """rhs not in range(F): λ = 0 gives F⁺ rhs, λ > 0 gives (F + λI)⁻¹ rhs."""
    op = make_operator(*shape, damping=damping, dtype=dtype, seed=22)
    rhs = torch.randn(op.num_params, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64).to(dtype)
    res = dual_direct(op, rhs)
    ref = op.reference(rhs)
    assert rel_err(res.x, ref) < (RTOL[dtype] if damping == 0 else 20 * RTOL[dtype])
    null = op.null_basis()
    if damping == 0 and null.shape[1]:
        assert float((null.T @ res.x.double()).norm()) < RTOL[dtype] * float(ref.norm())
    M = op.dense_fisher() + damping * torch.eye(op.num_params, dtype=torch.float64)
    true = float((rhs.double() - M @ res.x.double()).norm() / rhs.double().norm())
    assert res.residual == pytest.approx(true, rel=1e-3, abs=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_krylov(shape, damping, dtype):
    op = make_operator(*shape, damping=damping, dtype=dtype, seed=23)
    res = dual_krylov(op, op.b, tol=TOL[dtype], maxiter=4 * op.num_rows)
    assert res.method == "dual-krylov", res
    # converged: the explicit primal residual met tol (in float32 it may sit just above 1e-5)
    assert res.converged or (dtype == torch.float32 and res.residual < 10 * TOL[dtype]), res
    assert rel_err(res.x, op.reference(op.gradient())) < RTOL[dtype]
    assert res.residual < RTOL[dtype]


def test_zero_rhs():
    op = make_operator(8, 12)
    zero = torch.zeros(12, dtype=torch.float64)
    assert dual_direct(op, zero).reason == "zero rhs"
    res = dual_krylov(op, torch.zeros(8, dtype=torch.float64))
    assert res.reason == "zero rhs" and torch.equal(res.x, zero) and res.residual == 0.0
