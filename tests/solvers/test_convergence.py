"""No unconverged answer without a word: ``on_unconverged``, the dual solve at tiny damping, CG
and MINRES on an rhs outside range(F), "auto" by cost, CG in float16.

Oracles: numpy's pinv / solve of the dense float64 damped Fisher.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from solver_helpers import make_operator, rel_err

from ngtriton import ConvergenceError, ConvergenceWarning
from ngtriton.solvers import BATCHED_COLUMN_COST, choose_method, dual_cost, krylov_cost, solve
from ngtriton.solvers import dual as dual_module


def np_reference(A64: torch.Tensor, rhs64: torch.Tensor, damping: float) -> torch.Tensor:
    """(AᵀA + λI)⁺ rhs in float64 by numpy; below the rank cutoff, λ → 0's limit F⁺ rhs."""
    F = (A64.T @ A64).numpy()
    M = F + damping * np.eye(F.shape[0])
    return torch.from_numpy(np.linalg.pinv(M, rcond=1e-10, hermitian=True) @ rhs64.numpy())


# --- on_unconverged ---------------------------------------------------------------------------

def test_unconverged_solve_warns_raises_or_stays_quiet():
    op = make_operator(40, 30, seed=9, cond=100.0)
    with pytest.warns(ConvergenceWarning) as rec:
        res = solve(op, method="cg", maxiter=3)
    msg = str(rec[0].message)
    assert not res.converged and res.reason == "maxiter"
    for words in ("cg", "3 iterations", f"{res.residual:.2e}", "tol 1.0e-06", "maxiter",
                  "damping", "method='dual'", "on_unconverged='ignore'"):
        assert words in msg, (words, msg)
    assert rec[0].filename == __file__  # points at the caller's line
    with pytest.raises(ConvergenceError, match="cg hit its iteration cap") as err:
        solve(op, method="cg", maxiter=3, on_unconverged="raise")
    assert err.value.result.iterations == 3 and not err.value.result.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = solve(op, method="cg", maxiter=3, on_unconverged="ignore")
        assert torch.equal(quiet.x, res.x)
        solve(op, method="cg", on_unconverged="raise")  # converges: nothing to say


@pytest.mark.parametrize(("value", "error"), [("loud", ValueError), (None, TypeError),
                                              (True, TypeError)])
def test_bad_on_unconverged_names_it(value, error):
    with pytest.raises(error, match=r"^on_unconverged: "):
        solve(make_operator(8, 12), on_unconverged=value)


@pytest.mark.parametrize("method", ["minres", "lsmr"])
def test_other_krylov_methods_warn_at_their_cap(method):
    op = make_operator(40, 30, seed=9, cond=100.0)
    with pytest.warns(ConvergenceWarning, match=method):
        solve(op, method=method, maxiter=2)


# --- the docstring's promise at λ = 0: F⁺ rhs -------------------------------------------------

@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("shape", [(30, 25, 6), (10, 50, 4), (60, 20, 20)])
def test_cg_minres_give_pinv_for_an_rhs_in_the_range(method, shape):
    op = make_operator(*shape, seed=51)
    w = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    for rhs in (None, op.fisher_matvec(w)):  # g = Aᵀb, and F w
        want = np_reference(op.A, op.gradient() if rhs is None else rhs, 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            res = solve(op, rhs, method, tol=1e-12, maxiter=400)
        assert rel_err(res.x, want) < 1e-8


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("shape", [(30, 25, 6), (10, 50, 4)])
def test_cg_minres_say_so_for_an_rhs_outside_the_range(method, shape):
    """rhs ∉ range(F) at λ = 0: CG and MINRES cannot return F⁺ rhs; they must not pass their
    answer off as it, and "auto" gives F⁺ rhs."""
    op = make_operator(*shape, seed=52)
    rhs = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64)
    want = np_reference(op.A, rhs, 0.0)
    with pytest.warns(ConvergenceWarning, match=r"outside range\(F\)"):
        res = solve(op, rhs, method, maxiter=200)
    assert not res.converged and rel_err(res.x, want) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        auto = solve(op, rhs, "auto", tol=1e-10)
    assert rel_err(auto.x, want) < 1e-8


# --- the dual solve at tiny damping -----------------------------------------------------------

SHAPES = [(30, 25, 6), (10, 50, 4), (12, 40, None), (60, 20, 20)]


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("damping", [1e-10, 1e-20, 1e-80])
@pytest.mark.parametrize("shape", SHAPES)
def test_dual_at_tiny_damping_float64(shape, damping, dense, monkeypatch):
    """Woodbury divided rounding noise by λ (relative errors 1e-4 .. 1e67 here before).
    ``dense=False``: K from products, ``A(AᵀI)``, as past ``DENSE_FACTOR_MAX_ELEMENTS``."""
    if not dense:
        monkeypatch.setattr(dual_module, "DENSE_FACTOR_MAX_ELEMENTS", 0)
    op = make_operator(*shape, damping=damping, seed=7, cond=30.0)
    want = np_reference(op.A, op.gradient(), damping)
    for rhs in (None, op.gradient()):  # with b, and an explicit rhs as NGD passes it
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            res = solve(op, rhs, "dual")
        assert res.method == "dual-direct" and res.converged
        assert rel_err(res.x, want) < 1e-10, (rhs is None, rel_err(res.x, want))


@pytest.mark.parametrize("damping", [1e-3, 1e-6, 1e-10, 1e-20])
@pytest.mark.parametrize("shape", SHAPES)
def test_dual_at_tiny_damping_float32(shape, damping):
    """A float32 operator against the float64 one it was rounded from: the rounding leaves
    singular values ~eps·σ_max where A has none, which must not be divided by λ."""
    op64 = make_operator(*shape, damping=damping, seed=7, cond=30.0)
    op = make_operator(*shape, damping=damping, dtype=torch.float32, seed=7, cond=30.0)
    want = np_reference(op64.A, op64.gradient(), damping)
    for rhs in (None, op.gradient()):
        res = solve(op, rhs, "dual")
        assert res.converged and rel_err(res.x, want) < 1e-5, (rhs is None, rel_err(res.x, want))


@pytest.mark.parametrize("damping", [0.05, 1e-4])
@pytest.mark.parametrize("shape", SHAPES)
def test_dual_keeps_a_true_rhs_outside_the_range(shape, damping):
    """An rhs with a real part outside range(F) at λ > 0: (F + λI)⁻¹ sends it to rhs⊥/λ."""
    op = make_operator(*shape, damping=damping, seed=8)
    rhs = torch.randn(op.num_params, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64)
    want = np_reference(op.A, rhs, damping)
    res = solve(op, rhs, "dual")
    assert res.converged and rel_err(res.x, want) < 1e-9


# --- "auto" by cost ---------------------------------------------------------------------------

class Counting:
    """Counts every product (JVP or VJP, single or batched column) of a test operator."""

    def __init__(self, op):
        self.op, self.count = op, 0

    def __getattr__(self, name):
        return getattr(self.op, name)

    def _n(self, k):
        self.count += k

    def damped_matvec(self, v):
        self._n(2)
        return self.op.damped_matvec(v)

    def fisher_matvec(self, v):
        self._n(2)
        return self.op.fisher_matvec(v)

    def factor_matvec(self, v):
        self._n(1)
        return self.op.factor_matvec(v)

    def factor_rmatvec(self, u):
        self._n(1)
        return self.op.factor_rmatvec(u)

    def factor_matmat(self, V):
        self._n(BATCHED_COLUMN_COST * V.shape[1])
        return self.op.factor_matmat(V)

    def factor_rmatmat(self, U):
        self._n(BATCHED_COLUMN_COST * U.shape[1])
        return self.op.factor_rmatmat(U)


def test_cost_model_counts_the_products_it_runs():
    op = Counting(make_operator(40, 300, seed=11, damping=1e-3))
    res = solve(op, method="dual-direct")
    assert op.count == dual_cost(40, 300) and res.converged
    op.count = 0
    solve(op, method="lsmr", maxiter=7, tol=1e-14, on_unconverged="ignore")
    assert op.count <= krylov_cost(40, 300, 7) + 2


def test_auto_takes_the_cheaper_solve_under_a_cap():
    """Today's rule took the dual solve (R products) whenever R ≤ 512 and R ≤ P, even when
    the caller caps the Krylov solve far below that (NGD: 20 iterations, resnet18: 5.4 s a step
    against CG's 1.8 s)."""
    op = Counting(make_operator(40, 300, seed=11, damping=1e-3, cond=2.0))
    res = solve(op, maxiter=10, tol=1e-3)
    assert res.method == "lsmr" and res.converged and op.count < dual_cost(40, 300)
    assert choose_method(op, maxiter=10) == "lsmr"
    assert choose_method(op, maxiter=10, factor_rhs=False) == "minres"
    assert dual_cost(40, 300) == 32  # 40 batched columns of Aᵀ at 0.75, and the residual
    assert choose_method(op, maxiter=15) == "lsmr"  # 30 products at most
    assert choose_method(op, maxiter=16) == "dual-direct"  # a tie: the exact solve
    assert choose_method(op) == "dual-direct"  # the default cap: the exact solve
    assert choose_method(op, warm_start=True) == "cg"


def test_auto_prefers_the_exact_solve_where_a_krylov_solve_would_stall():
    """R > P at λ = 0 on an ill-conditioned factor: LSMR stops at its cap unconverged; the
    exact dual solve (R ≤ 512) is what "auto" must run."""
    op = make_operator(200, 60, seed=12, cond=1e4)
    lsmr = solve(op, method="lsmr", maxiter=2 * 60 + 10, on_unconverged="ignore")
    assert not lsmr.converged
    want = np_reference(op.A, op.gradient(), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = solve(op)
    assert res.method == "dual-direct" and rel_err(res.x, want) < 1e-8


def test_auto_skips_the_dual_past_its_row_limit():
    op = make_operator(600, 40, seed=13)
    assert choose_method(op) == "lsmr"


# --- CG in float16 ----------------------------------------------------------------------------

@pytest.mark.parametrize("check_every", [1, 4])
def test_float16_cg_never_raises_and_never_returns_inf(check_every):
    """A small, badly conditioned float16 Fisher at λ = 1e-8 (0 in float16): α and the iterate
    leave float16's range. CG raised "value cannot be converted to type c10::Half without
    overflow" (35 of 40 seeds here) or returned Inf (45 of 80 solves)."""
    for seed in range(40):
        op = make_operator(12, 30, 8, damping=1e-8, seed=seed, cond=30.0)
        op.A, op.b, op.dtype = (op.A * 1e-3).half(), op.b.half(), torch.float16
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = solve(op, method="cg", check_every=check_every)
        assert torch.isfinite(res.x).all(), seed
        if not res.converged:
            assert any(issubclass(w.category, ConvergenceWarning) for w in rec), seed
