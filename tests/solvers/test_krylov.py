"""cg / minres / lsmr on plain callables: oracles, minimum norm, breakdowns, host checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from solver_helpers import RTOL, SHAPES, TOL, make_operator, rel_err

from ngtriton.solvers import cg, lsmr, minres

DTYPES = [torch.float64, torch.float32]


def run(name: str, op, rhs=None, **kw):
    """Solve (F + λI) x = rhs (default g) with one solver on the dense test operator."""
    rhs = op.gradient() if rhs is None else rhs
    kw.setdefault("tol", TOL[op.dtype])
    kw.setdefault("maxiter", 3 * op.num_params)  # float32 needs a few more than n
    if name == "cg":
        return cg(op.damped_matvec, rhs, **kw)
    if name == "minres":
        return minres(op.damped_matvec, rhs, **kw)
    if name == "lsmr":  # on the factor, b known
        return lsmr(op.factor_matvec, op.factor_rmatvec, op.b, damp=math.sqrt(op.damping), **kw)
    if name == "lsmr-sym":  # on M = F + λI itself (κ(M)², so give it room past n iterations)
        kw.setdefault("maxiter", 4 * op.num_params)
        return lsmr(op.damped_matvec, op.damped_matvec, rhs, **kw)
    raise AssertionError(name)


SOLVERS = ["cg", "minres", "lsmr", "lsmr-sym"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("name", SOLVERS)
def test_matches_oracle_and_is_min_norm(name, shape, damping, dtype):
    R, P, rank = shape
    op = make_operator(R, P, rank, damping=damping, dtype=dtype, seed=hash(shape) % 1000)
    res = run(name, op)
    ref = op.reference(op.gradient())
    assert res.converged and res.reason == "converged", res
    assert res.x.dtype == dtype and torch.isfinite(res.x).all()
    assert rel_err(res.x, ref) < RTOL[dtype]
    null = op.null_basis()
    if null.shape[1]:
        assert float((null.T @ res.x.double()).norm()) < RTOL[dtype] * float(ref.norm())
    # MINRES stops on its recurrence residual and reports the explicit one, which may differ by
    # the float32 rounding the check below allows (5 %).
    assert res.residual <= TOL[dtype] * (1.05 if name == "minres" else 1.0)
    assert len(res.history) == res.iterations
    if name != "minres":  # MINRES reports the explicit residual, checked below
        assert res.history[-1] == pytest.approx(res.residual)
    if name != "lsmr-sym":  # the recurrence residual tracks the true damped normal residual
        M = op.dense_fisher() + damping * torch.eye(P, dtype=torch.float64)
        g = op.gradient().double()
        true = float((g - M @ res.x.double()).norm() / g.norm())
        assert true < RTOL[dtype]
        if name == "minres":
            assert res.residual == pytest.approx(true, rel=0.05,
                                                 abs=10 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("shape", SHAPES)
def test_against_scipy(shape):
    R, P, rank = shape
    op = make_operator(R, P, rank, damping=0.0, seed=7)
    A = op.A.numpy()
    F, g, b = A.T @ A, op.gradient().numpy(), op.b.numpy()
    counts = {"cg": 0}

    def count(_):
        counts["cg"] += 1

    x_cg, info = spla.cg(F, g, rtol=1e-11, atol=0.0, callback=count)
    ours = run("cg", op)
    assert info == 0 and abs(ours.iterations - counts["cg"]) <= max(2, counts["cg"] // 5)
    assert rel_err(ours.x, torch.from_numpy(x_cg)) < 1e-8
    x_mr = spla.minres(F, g, rtol=1e-12)[0]
    assert rel_err(run("minres", op).x, torch.from_numpy(x_mr)) < 1e-8
    for damp in (0.0, 0.5):
        op.damping = damp**2
        out = spla.lsmr(A, b, damp=damp, atol=1e-13, btol=1e-13)
        ours = run("lsmr", op)
        assert rel_err(ours.x, torch.from_numpy(out[0])) < 1e-8
        assert abs(ours.iterations - out[2]) <= max(3, out[2] // 3)
        normal = A.T @ (b - A @ out[0]) - damp**2 * out[0]
        assert np.linalg.norm(normal) / np.linalg.norm(A.T @ b) < 1e-9


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rhs(name, dtype):
    op = make_operator(10, 6, dtype=dtype)
    op.b = torch.zeros(10, dtype=dtype)
    res = run(name, op, rhs=torch.zeros(6, dtype=dtype))
    assert res.reason == "zero rhs" and res.converged and res.iterations == 0
    assert res.residual == 0.0 and torch.equal(res.x, torch.zeros(6, dtype=dtype))


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank3_exhausts_early(name, dtype):
    op = make_operator(3, 20, dtype=dtype, seed=3)  # F of rank 3, P = 20
    res = run(name, op)
    assert res.iterations <= 4 and res.converged
    assert torch.isfinite(res.x).all()
    assert rel_err(res.x, op.reference(op.gradient())) < RTOL[dtype]


@pytest.mark.parametrize("name", SOLVERS)
def test_exhaustion_past_convergence_stays_finite(name):
    """tol = 0 forces the solver past the exhausted Krylov space: it must end cleanly."""
    op = make_operator(3, 20, seed=5)
    res = run(name, op, tol=0.0, maxiter=40)
    assert torch.isfinite(res.x).all() and math.isfinite(res.residual)
    assert res.reason in ("converged", "krylov space exhausted", "breakdown", "maxiter")
    assert rel_err(res.x, op.reference(op.gradient())) < 1e-8


def test_exact_exhaustion():
    """A diagonal F with 3 nonzero entries: the Krylov space has dimension 3 (or 4)."""
    d = torch.zeros(20, dtype=torch.float64)
    d[:3] = torch.tensor([1.0, 2.0, 4.0])
    b = torch.zeros(20, dtype=torch.float64)
    b[:3] = 1.0
    for solver in (cg, minres):
        res = solver(lambda v: d * v, b, tol=0.0)
        assert res.iterations <= 4 and res.converged, res
        assert torch.allclose(res.x[:3], 1 / d[:3]) and torch.all(res.x[3:] == 0)
    # inconsistent: b has a null-space part, the residual cannot vanish
    res = minres(lambda v: d * v, torch.ones(20, dtype=torch.float64), tol=1e-10)
    assert res.reason == "krylov space exhausted" and not res.converged, res
    assert res.iterations <= 5 and torch.isfinite(res.x).all()
    assert torch.allclose(res.x[:3], 1 / d[:3])
    assert res.residual == pytest.approx(math.sqrt(17 / 20), rel=1e-8)
    ls = minres(lambda v: d * v, torch.ones(20, dtype=torch.float64), tol=1e-10, lstsq=True)
    assert ls.converged and ls.iterations <= 4 and torch.allclose(ls.x[:3], 1 / d[:3])


@pytest.mark.parametrize("name", SOLVERS)
def test_maxiter(name):
    op = make_operator(40, 30, seed=2, cond=100.0)
    res = run(name, op, maxiter=3)
    assert not res.converged and res.reason == "maxiter" and res.iterations == 3
    assert len(res.history) == 3
    assert run(name, op, maxiter=0).iterations == 0


@pytest.mark.parametrize("check_every", [1, 4])
def test_cg_indefinite_breaks_down_cleanly(check_every):
    d = torch.linspace(-1, 2, 16, dtype=torch.float64)
    b = torch.ones(16, dtype=torch.float64)
    res = cg(lambda v: d * v, b, maxiter=100, check_every=check_every)
    assert torch.isfinite(res.x).all() and math.isfinite(res.residual)
    assert res.reason in ("breakdown", "converged", "maxiter")
    neg = cg(lambda v: -v, b)  # negative definite: pᵀAp < 0 at once
    assert neg.reason == "breakdown" and not neg.converged and neg.iterations == 0
    assert torch.equal(neg.x, torch.zeros(16, dtype=torch.float64))


@pytest.mark.parametrize("name", ["cg", "minres", "lsmr-sym"])
@pytest.mark.parametrize("check_every", [1, 3])
def test_nonfinite_products_freeze_the_iterate(name, check_every):
    op = make_operator(20, 12, seed=4, cond=50.0)
    calls = {"n": 0}
    good = op.damped_matvec

    def bad(v):
        calls["n"] += 1
        out = good(v)
        return out * float("nan") if calls["n"] > 3 else out

    op.damped_matvec = bad
    res = run(name, op, check_every=check_every)
    assert res.reason == "breakdown" and not res.converged
    assert torch.isfinite(res.x).all() and math.isfinite(res.residual)
    assert res.iterations <= 3


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_check_every_gives_the_same_answer(name, damping):
    op = make_operator(30, 25, 6, damping=damping, seed=11)
    ref = run(name, op, check_every=1)
    for k in (2, 5, 100):
        other = run(name, op, check_every=k)
        assert torch.equal(other.x, ref.x)
        assert (other.iterations, other.reason, other.history) == (ref.iterations, ref.reason,
                                                                  ref.history)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_warm_start(name):
    op = make_operator(30, 20, 5, damping=0.1, seed=12)
    ref = op.reference(op.gradient())
    x0 = ref.clone() + 0.1 * torch.randn(20, dtype=torch.float64)
    res = run(name, op, x0=x0)
    assert res.converged and rel_err(res.x, ref) < 1e-8
    exact = run(name, op, x0=ref.clone())
    assert exact.iterations <= 1 and exact.converged


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_bad_arguments(name):
    op = make_operator(10, 6)
    g = op.gradient()
    for kw, arg, err in [({"tol": -1.0}, "tol", ValueError), ({"tol": "x"}, "tol", TypeError),
                         ({"atol": float("nan")}, "atol", ValueError),
                         ({"maxiter": -2}, "maxiter", ValueError),
                         ({"maxiter": 2.5}, "maxiter", TypeError),
                         ({"check_every": 0}, "check_every", ValueError),
                         ({"x0": torch.zeros(5, dtype=torch.float64)}, "x0", ValueError)]:
        with pytest.raises(err, match=arg):
            run(name, op, g, **kw)
    with pytest.raises(ValueError, match="b"):
        run(name, op, torch.zeros(3, 3, dtype=torch.float64))


def test_lsmr_bad_damp():
    op = make_operator(10, 6)
    with pytest.raises(ValueError, match="damp"):
        lsmr(op.factor_matvec, op.factor_rmatvec, op.b, damp=-1.0)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e6), (torch.float32, 1e8),
                                              (torch.float64, 1e15), (torch.float64, 1e16)])
def test_minres_does_not_depend_on_the_size_of_b(dtype, scale):
    """‖b‖ is not an entry of the Lanczos matrix: counting it in ‖T‖ made large right-hand
    sides look like an exhausted Krylov space (x = 0 at iteration 0)."""
    gen = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    M = (Q * torch.linspace(1, 4, 5, dtype=torch.float64)) @ Q.T
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    want = torch.linalg.solve(M, b)
    Md = M.to(dtype)
    res = minres(lambda v: Md @ v, (b * scale).to(dtype), tol=TOL[dtype])
    assert res.converged and res.reason == "converged", res
    assert rel_err(res.x / scale, want) < RTOL[dtype]
