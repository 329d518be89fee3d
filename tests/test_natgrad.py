"""natural_gradient / solve end to end against dense float64 pinv and solve (torch.func oracles)."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from oracles import dense_fisher
from test_fisher import make_problem

import ngtriton
from ngtriton import ConvergenceError, ConvergenceWarning, FisherOperator, natural_gradient, solve

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
    # tol 1e-12 is below what MINRES's explicit residual reaches at λ = 0 (~1e-10): the
    # accuracy is checked against the oracle here, not the solver's own verdict
    got, res = natural_gradient(model, x, y, likelihood=likelihood, fisher=fisher,
                                damping=damping, method=method, tol=1e-12, maxiter=2000,
                                return_result=True, on_unconverged="ignore")
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


# --- no unconverged answer without a word --------------------------------------------------

def sequence_problem(T: int = 10, seed: int = 0):
    """A tanh MLP on (N, T, d) inputs with Bernoulli (BCE-with-logits) outputs per position,
    float32, and its float64 twin for the oracle: R = N·T·m rows > P = 180."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(8, T, 6, generator=gen)
    y = torch.rand(8, T, 4, generator=gen).round()
    return model, x, y, copy.deepcopy(model).double()


def test_sequence_bce_at_zero_damping_with_default_arguments():
    """"auto" took LSMR here (R > P), which stopped at its cap of 2P + 10 iterations with
    converged=False and no word, 6 % off F⁺g; the exact dual solve is right."""
    model, x, y, model64 = sequence_problem()
    # the oracle's rows are whole sequences (Σ over positions): F and g both scale by T, F⁺g
    # does not change
    flat_model = torch.nn.Sequential(model64, torch.nn.Flatten())
    F_ref, g_ref = dense_fisher(flat_model, x.double(), y.double().flatten(1), "bernoulli")
    want = reference(F_ref, g_ref, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        got, res = natural_gradient(model, x, y, likelihood="bernoulli", return_result=True)
    flat = torch.cat([t.reshape(-1) for t in got]).double()
    assert res.converged, res
    assert (flat - want).norm() / want.norm() < 1e-3


def test_an_unconverged_natural_gradient_warns_or_raises():
    """Past the dual solve's row limit (R = 640 > 512) only a Krylov solve is left: capped, it
    must say that it stopped short."""
    model, x, y, _ = sequence_problem(T=20)
    with pytest.warns(ConvergenceWarning, match="lsmr .*hit its iteration cap") as rec:
        natural_gradient(model, x, y, likelihood="bernoulli", maxiter=15)
    assert rec[0].filename == __file__
    with pytest.raises(ConvergenceError, match="maxiter"):
        natural_gradient(model, x, y, likelihood="bernoulli", maxiter=15,
                         on_unconverged="raise")
    _, res = natural_gradient(model, x, y, likelihood="bernoulli", maxiter=15,
                              on_unconverged="ignore", return_result=True)
    assert not res.converged


@pytest.mark.parametrize("damping", [1e-10, 1e-20])
@pytest.mark.parametrize(("likelihood", "n"), [("categorical", 4), ("categorical", 20),
                                               ("bernoulli", 4), ("gaussian", 6)])
def test_dual_at_tiny_damping_in_float32(likelihood, n, damping):
    """The Woodbury branch divided rounding noise by λ: 29 .. 7e11 relative error here."""
    model, x, y = make_problem(likelihood, n, seed=3)
    F_ref, g_ref = dense_fisher(model, x, y, likelihood)
    # pinv of F + λI: exact where λ is above pinv's cutoff, λ → 0's limit where below
    want = torch.linalg.pinv(F_ref + damping * torch.eye(len(g_ref), dtype=torch.float64),
                             hermitian=True, rtol=1e-10) @ g_ref
    y32 = y if likelihood == "categorical" else y.float()
    op = FisherOperator(copy.deepcopy(model).float(), x.float(), likelihood, targets=y32,
                        damping=damping)
    for rhs in (None, op.gradient()):  # the gradient factor b, or g alone (as NGD passes it)
        res = solve(op, rhs, method="auto")
        assert res.method == "dual-direct" and res.converged
        assert (res.x.double() - want).norm() / want.norm() < 2e-3


def test_float16_cg_on_a_bernoulli_fisher_never_raises():
    """float16, Bernoulli, λ = 1e-8 and CG: the iterate overflowed float16 (Inf returned with
    no word, 36 of 40 seeds), or α did (a RuntimeError at CG's update)."""
    for seed in range(8):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3)).half()
        x = torch.randn(8, 4).half()
        y = torch.rand(8, 3).round().half()
        op = FisherOperator(model, x, "bernoulli", targets=y, damping=1e-8)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = solve(op, method="cg", maxiter=60)
        assert torch.isfinite(res.x).all(), seed
        assert res.converged or any(issubclass(w.category, ConvergenceWarning) for w in rec)


def test_an_exact_solve_at_its_dtypes_residual_floor_is_converged():
    """Logits of ±100 in float32 at λ = 1e-3: the dual answer is right to 2e-7, but its float32
    residual can only reach ~10·eps·‖F + λI‖·‖n‖/‖g‖ (3e-2 here): converged, without a word."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(200.0)
        model[2].bias.mul_(200.0)
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        y = (model(x).argmax(-1) + 1) % 3
    F_ref, g_ref = dense_fisher(model, x, y, "categorical")
    want = reference(F_ref, g_ref, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        got, res = natural_gradient(model.float(), x.float(), y, damping=1e-3,
                                    return_result=True)
    flat = torch.cat([t.reshape(-1) for t in got]).double()
    assert res.method == "dual-direct" and res.converged and res.residual > 1e-3
    assert (flat - want).norm() / want.norm() < 1e-4
