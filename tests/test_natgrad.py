"""natural_gradient / solve end to end against dense float64 pinv and solve (torch.func oracles)."""

from __future__ import annotations

import functools

import pytest
import torch
from oracles import dense_fisher
from test_fisher import make_problem

import ngtriton
from ngtriton import FisherOperator, natural_gradient, solve

METHODS = ["cg", "minres", "lsmr", "dual-direct", "dual-krylov", "auto"]


@functools.cache
def cached_problem(likelihood: str, fisher: str, n: int):
    """The problem and its dense oracle, built once per (likelihood, fisher, n)."""
    model, x, y = make_problem(likelihood, n, seed=10 + n)
    return (model, x, y, *dense_fisher(model, x, y, likelihood, fisher))


def reference(F_ref: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    if damping == 0:
        return torch.linalg.pinv(F_ref, hermitian=True, rtol=1e-10) @ g
    return torch.linalg.solve(F_ref + damping * torch.eye(len(g), dtype=g.dtype), g)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("n", [4, 20])  # over- and under-parametrised: N·m = 12 / 60, P = 38
def test_natural_gradient_matches_dense_oracle(likelihood, fisher, method, damping, n):
    model, x, y, F_ref, g_ref = cached_problem(likelihood, fisher, n)
    if method == "dual-krylov" and damping == 0 and n == 20 and fisher == "exact":  # R > P
        with pytest.raises(ValueError, match="method"):
            natural_gradient(model, x, y, likelihood=likelihood, fisher=fisher, method=method)
        return
    want = reference(F_ref, g_ref, damping)
    got, res = natural_gradient(model, x, y, likelihood=likelihood, fisher=fisher,
                                damping=damping, method=method, tol=1e-12, maxiter=2000,
                                return_result=True)
    flat = torch.cat([t.reshape(-1) for t in got])
    assert torch.isfinite(flat).all()
    torch.testing.assert_close(flat, want, rtol=1e-6, atol=1e-8 * want.norm().item())
    if damping == 0:  # the minimum-norm property: no component in null(F)
        evals, evecs = torch.linalg.eigh(F_ref)
        null = evecs[:, evals < 1e-10 * evals.max()]
        assert (null.T @ flat).norm() <= 1e-7 * flat.norm()
    assert res.residual < 1e-6 or res.reason in ("direct", "krylov space exhausted")


@pytest.mark.parametrize("method", ["cg", "minres", "lsmr", "dual-direct", "auto"])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_monte_carlo_fisher_solves_its_own_operator(method, damping):
    """g is not in range(F_mc) in general: damping 0 must give the min-norm least squares F⁺g."""
    model, x, y = make_problem("categorical", 6)
    op = FisherOperator(model, x, targets=y, fisher="mc", damping=damping,
                        generator=torch.Generator().manual_seed(3))
    if damping == 0 and method in ("cg", "minres"):
        pytest.skip("CG/MINRES do not give F⁺g on an inconsistent system; auto avoids them")
    F_mc = op.to_dense() - damping * torch.eye(op.num_params, dtype=torch.float64)
    want = reference(F_mc, op.gradient(), damping)
    res = solve(op, method=method, tol=1e-12, maxiter=5000)
    torch.testing.assert_close(res.x, want, rtol=1e-5, atol=1e-7 * want.norm().item())


def test_float32_lsmr_is_accurate_on_an_ill_conditioned_fisher():
    """LSMR on the factor works with κ(A), not κ(A)²: in float32 it must still be accurate."""
    model, x, y = make_problem("gaussian", 30, seed=4)
    x = x * torch.logspace(0, 2, 3, dtype=torch.float64)  # badly scaled inputs
    F_ref, g_ref = dense_fisher(model, x, y, "gaussian")
    want = reference(F_ref, g_ref, 1e-6).float()
    model32 = model.float()
    got = natural_gradient(model32, x.float(), y.float(), likelihood="gaussian", damping=1e-6,
                           method="lsmr", tol=1e-7, maxiter=500)
    flat = torch.cat([t.reshape(-1) for t in got])
    assert torch.isfinite(flat).all()
    assert (flat - want).norm() / want.norm() < 2e-2


def test_list_rhs_returns_list_and_top_level_api():
    model, x, y = make_problem("categorical", 8)
    op = FisherOperator(model, x, targets=y, damping=1e-3)
    res = solve(op, op.unflatten(op.gradient()), method="cg", tol=1e-10)
    assert isinstance(res.x, list) and len(res.x) == 4
    assert res.converged and res.iterations > 0 and res.method
    assert set(ngtriton.__all__) >= {"FisherOperator", "solve", "natural_gradient", "NGD"}


def test_bad_arguments_name_the_argument():
    model, x, y = make_problem("categorical", 8)
    with pytest.raises(ValueError, match="method"):
        natural_gradient(model, x, y, method="gmres")
    with pytest.raises(ValueError, match="damping"):
        natural_gradient(model, x, y, damping=-1)
    with pytest.raises(ValueError, match="likelihood"):
        natural_gradient(model, x, y, likelihood="student-t")
    with pytest.raises(ValueError, match="fisher"):
        natural_gradient(model, x, y, fisher="diag")
    with pytest.raises(ValueError, match="backend"):
        natural_gradient(model, x, y, backend="jax")
    with pytest.raises(ValueError, match="targets"):
        natural_gradient(model, x, y[:3])
    op = FisherOperator(model, x, targets=y)
    with pytest.raises(ValueError, match="rhs"):
        solve(op, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol"):
        solve(op, tol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        solve(op, maxiter=-1)


def test_non_finite_inputs_raise_a_clear_error():
    model, x, y = make_problem("categorical", 8)
    x = x.clone()
    x[0, 0] = float("nan")
    for method in ("auto", "cg", "dual-direct"):
        with pytest.raises(ValueError, match="rhs"):
            natural_gradient(model, x, y, method=method)
    op = FisherOperator(model, x[1:], targets=y[1:])
    bad = torch.full((op.num_params,), float("inf"), dtype=torch.float64)
    with pytest.raises(ValueError, match="rhs"):
        solve(op, bad)
