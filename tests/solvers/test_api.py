"""``solve`` on a Fisher operator: every method, minimum norm, rhs forms, argument errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from solver_helpers import RTOL, SHAPES, TOL, make_operator, rel_err

from ngtriton.solvers import DUAL_DIRECT_MAX_ROWS, ConvergenceWarning, SolveResult, solve

DTYPES = [torch.float64, torch.float32]
METHODS = ["cg", "minres", "lsmr", "lsqr", "dual", "dual-direct", "dual-krylov", "auto"]


def _solve(op, rhs=None, method="auto", **kw):
    kw.setdefault("tol", TOL[op.dtype])
    kw.setdefault("maxiter", 4 * max(op.num_params, op.num_rows))
    return solve(op, rhs, method, **kw)


def _check_min_norm(op, x, ref, dtype, scale=1.0):
    assert torch.isfinite(x).all()
    assert rel_err(x, ref) < scale * RTOL[dtype]
    null = op.null_basis()
    if op.damping == 0 and null.shape[1]:
        assert float((null.T @ x.double()).norm()) < scale * RTOL[dtype] * float(ref.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_every_method(method, shape, damping, dtype):
    op = make_operator(*shape, damping=damping, dtype=dtype, seed=31)
    if method == "dual-krylov" and damping == 0 and op.num_rows > op.num_params:
        with pytest.raises(ValueError, match="method"):
            _solve(op, method=method)
        return
    res = _solve(op, method=method)
    assert isinstance(res, SolveResult), res
    assert res.converged or _near_precision_floor(res, method, dtype), res
    _check_min_norm(op, res.x, op.reference(op.gradient()), dtype)


def _near_precision_floor(res, method, dtype) -> bool:
    """dual-krylov judges convergence by the primal residual computed explicitly, which in
    float32 can sit just above a tolerance this close to the precision (1e-5)."""
    return method == "dual-krylov" and dtype == torch.float32 and res.residual < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("method", ["cg", "minres", "lsmr", "dual-direct", "auto"])
def test_consistent_rhs_without_b(method, shape, damping, dtype):
    """An explicit rhs in range(F) (b unknown): the arbitrary-rhs paths."""
    op = make_operator(*shape, damping=damping, dtype=dtype, seed=32)
    w = torch.randn(op.num_params, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64).to(dtype)
    rhs = op.fisher_matvec(w)
    res = _solve(op, rhs, method)
    assert res.converged, res
    _check_min_norm(op, res.x, op.reference(rhs), dtype, scale=5.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["lsmr", "dual-direct"])
def test_inconsistent_rhs_is_pinv(method, shape, dtype):
    op = make_operator(*shape, dtype=dtype, seed=33)
    rhs = torch.randn(op.num_params, generator=torch.Generator().manual_seed(6),
                      dtype=torch.float64).to(dtype)
    res = _solve(op, rhs, method)
    _check_min_norm(op, res.x, op.reference(rhs), dtype, scale=5.0)


def test_auto_choices():
    small = make_operator(20, 40, seed=1)
    assert solve(small).method == "dual-direct"
    tall = make_operator(60, 20, seed=2)  # R > P: the dual's pseudo-inverse of K is exact too
    assert solve(tall).method == "dual-direct"
    # capped below the dual's cost (R + 2 products), the Krylov solve is the cheaper one
    assert solve(tall, maxiter=5, on_unconverged="ignore").method == "lsmr"
    tall.has_b = False  # λ = 0 and an rhs maybe outside range(F): LSMR on F itself
    assert solve(tall, maxiter=5, on_unconverged="ignore").method == "lsmr"
    tall.damping = 0.1
    assert solve(tall, maxiter=5, on_unconverged="ignore").method == "minres"
    x0 = torch.zeros(20, dtype=torch.float64)
    assert solve(tall, x0=x0).method == "cg"
    big = make_operator(DUAL_DIRECT_MAX_ROWS + 1, 600, rank=30, seed=3)
    res = solve(big, method="dual", tol=1e-10)
    assert res.method == "dual-krylov" and res.converged
    assert rel_err(res.x, big.reference(big.gradient())) < 1e-8
    assert solve(big).method == "lsmr"


@pytest.mark.parametrize("method", ["cg", "minres", "lsmr", "dual-direct"])
def test_list_rhs_returns_list(method):
    op = make_operator(15, 24, 5, damping=0.05, seed=4)
    g = op.gradient()
    res = solve(op, op.unflatten(g.clone()), method, tol=1e-11)
    assert isinstance(res.x, list) and [tuple(t.shape) for t in res.x] == op.shapes
    assert rel_err(torch.cat([t.reshape(-1) for t in res.x]), op.reference(g)) < 1e-8


def test_dual_krylov_needs_b():
    op = make_operator(10, 20, has_b=False)
    with pytest.raises(ValueError, match="method"):
        solve(op, method="dual-krylov")
    with pytest.raises(ValueError, match="method"):
        solve(op, op.gradient(), method="dual-krylov")


def test_x0():
    op = make_operator(20, 15, 5, damping=0.1, seed=8)
    ref = op.reference(op.gradient())
    res = solve(op, method="minres", x0=op.unflatten(ref.clone()), tol=1e-10)
    assert res.converged and res.iterations <= 1
    for method in ("lsmr", "dual", "dual-direct"):
        with pytest.raises(ValueError, match="x0"):
            solve(op, method=method, x0=ref)
    with pytest.raises(ValueError, match="x0"):
        solve(op, method="cg", x0=torch.zeros(3, dtype=torch.float64))
    op.damping = 0.0
    with pytest.warns(UserWarning, match="x0"):
        solve(op, method="cg", x0=torch.zeros(15, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(op, method="cg")


def test_bad_arguments():
    op = make_operator(10, 12)
    cases = [(dict(method="newton"), ValueError, "method"),
             (dict(method=3), ValueError, "method"),
             (dict(rhs=torch.zeros(11, dtype=torch.float64)), ValueError, "rhs"),
             (dict(rhs=torch.zeros(12, 1, dtype=torch.float64)), ValueError, "rhs"),
             (dict(rhs=[torch.zeros(3)]), ValueError, "rhs"),
             (dict(rhs="g"), TypeError, "rhs"),
             (dict(tol=-1e-3), ValueError, "tol"),
             (dict(tol=None), TypeError, "tol"),
             (dict(atol=-1.0), ValueError, "atol"),
             (dict(maxiter=-1), ValueError, "maxiter"),
             (dict(maxiter=1.0), TypeError, "maxiter"),
             (dict(check_every=0), ValueError, "check_every")]
    for kw, err, name in cases:
        with pytest.raises(err, match=name):
            solve(op, **kw)
    err_msg = ""
    try:
        solve(op, method="newton")
    except ValueError as e:
        err_msg = str(e)
    assert all(m in err_msg for m in ("'cg'", "'minres'", "'lsmr'", "'dual'", "'auto'"))


@pytest.mark.parametrize("method", ["cg", "minres", "lsmr", "dual-direct", "dual-krylov"])
def test_zero_gradient(method):
    op = make_operator(10, 14, 4)
    op.b = torch.zeros(10, dtype=torch.float64)
    res = solve(op, method=method)
    assert res.reason == "zero rhs" and res.residual == 0.0
    assert torch.equal(res.x, torch.zeros(14, dtype=torch.float64))


def test_maxiter_and_check_every_through_solve():
    op = make_operator(40, 30, seed=9, cond=100.0)
    with pytest.warns(ConvergenceWarning, match="maxiter"):
        res = solve(op, method="cg", maxiter=2)
    assert res.reason == "maxiter" and not res.converged and res.iterations == 2
    a = solve(op, method="minres", check_every=1, tol=1e-10)
    b = solve(op, method="minres", check_every=6, tol=1e-10)
    assert torch.equal(a.x, b.x) and a.iterations == b.iterations
    assert "minres" in repr(a) and "converged" in repr(a)


# --- right-hand sides of extreme size, and what a solve must not choke on ------------------

@pytest.mark.parametrize("method", ["cg", "minres", "lsmr", "dual-direct"])
@pytest.mark.parametrize("exponent", [-100, -60, 66])
def test_extreme_rhs_sizes_give_the_scaled_solution(method, exponent):
    """float32 right-hand sides far from 1, whose squares underflow or overflow: the solve runs
    on rhs / 2^k and scales back, so x(2^e·rhs) is 2^e·x(rhs) bit for bit."""
    op = make_operator(8, 12, damping=0.1, dtype=torch.float32, seed=41)
    rhs = op.gradient()
    base = solve(op, rhs, method, tol=1e-5)
    scaled = solve(op, rhs * 2.0 ** exponent, method, tol=1e-5)
    assert scaled.converged and scaled.reason != "zero rhs", scaled
    assert scaled.iterations == base.iterations
    assert torch.equal(scaled.x, base.x * 2.0 ** exponent)


def test_rhs_and_x0_that_require_grad_are_taken_as_values():
    op = make_operator(8, 12, damping=0.1, seed=42)
    rhs = op.gradient().clone().requires_grad_(True)
    for method in ("cg", "minres", "lsmr", "dual-direct"):
        res = solve(op, rhs, method)
        assert res.converged and not res.x.requires_grad
    x0 = torch.zeros(op.num_params, dtype=torch.float64, requires_grad=True)
    assert solve(op, rhs, "cg", x0=x0).converged


@pytest.mark.parametrize(("x0", "error"), [
    (np.zeros(12), TypeError), ("zeros", TypeError), ([torch.zeros(3)], ValueError),
    (torch.zeros(5, dtype=torch.float64), ValueError),
])
def test_bad_x0_errors_name_x0(x0, error):
    op = make_operator(8, 12, damping=0.1, seed=43)
    with pytest.raises(error, match=r"^x0: "):
        solve(op, method="cg", x0=x0)


def test_auto_avoids_the_pseudo_inverse_in_half_precision():
    """At λ = 0 the pseudo-inverse drops eigenvalues below A's rounding noise, most of them in
    float16: auto runs LSMR there (with damping, or in float32, the dual solve as before)."""
    half = make_operator(8, 40, dtype=torch.float16, seed=44)
    assert solve(half, method="auto", tol=1e-2, maxiter=400).method == "lsmr"
    damped = make_operator(8, 40, damping=0.1, dtype=torch.float16, seed=44)
    assert solve(damped, method="auto").method == "dual-direct"
    assert solve(make_operator(8, 40, dtype=torch.float32, seed=44)).method == "dual-direct"
