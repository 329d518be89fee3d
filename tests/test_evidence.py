"""The founding documents' claims, checked at small sizes (float64, CPU, seconds each).

Each test runs the computation of an ``examples/evidence_*.py`` script at a small size and
checks the claim with an explicit tolerance; the scripts' ``main()`` runs the full-size version
and prints the tables pasted into ``docs/evidence.md``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

ggn_kl = importlib.import_module("evidence_ggn_kl")
logreg = importlib.import_module("evidence_logreg")
reparam = importlib.import_module("evidence_reparam")
chain = importlib.import_module("evidence_chain_rule")

HAS_ENGINE = importlib.util.find_spec("ngtriton.linearize.engine") is not None
BACKENDS = ["autograd", pytest.param("auto", marks=pytest.mark.skipif(
    not HAS_ENGINE, reason="linearize/engine.py not available"))]
LIKELIHOODS = ["categorical", "gaussian", "bernoulli"]


# --- 1. Fisher = GGN (Martens sec. 8), and the curvature of the KL ----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fisher_equals_generalised_gauss_newton(likelihood, backend):
    r = ggn_kl.ggn_check(likelihood, n=6, d_in=3, width=5, m=3, backend=backend)
    assert r["fisher_err"] < 1e-12, r
    assert r["grad_err"] < 1e-12, r


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fisher_is_curvature_of_kl(likelihood):
    r = ggn_kl.kl_check(likelihood, n=6, d_in=3, width=5, m=3, backend="autograd",
                        eps=np.logspace(-4, -1, 7))
    assert abs(r["slope"] - 2.0) < 0.01, r["slope"]
    dev = np.abs(r["ratio"] - 1.0)
    assert dev[0] < 1e-4, dev                         # KL / (½ε²dᵀFd) → 1
    assert dev[0] < dev[-1] / 100, dev                # and the gap shrinks like O(ε)


# --- 2. Logistic regression of the natural-gradient blog post ---------------------------------
@pytest.fixture(scope="module")
def logreg_runs():
    configs = (("gd", 0.1), ("gd", 1.0), ("ng-exact", 0.1), ("ng-exact", 1.0),
               ("ng-empirical", 0.1), ("ng-centred", 0.1))
    res = logreg.experiment(reps=12, iters=5, configs=configs, backend="autograd")
    return {c: L.mean(0) for c, L in res.items()} | {("all", c): L for c, L in res.items()}


def test_logreg_exact_natural_gradient_beats_gd_at_step_1(logreg_runs):
    # measured (100 reps): NG-exact 0.190, GD 0.242 after 5 iterations
    assert logreg_runs[("ng-exact", 1.0)][-1] < logreg_runs[("gd", 1.0)][-1] - 0.03


def test_logreg_exact_natural_gradient_decreases_monotonically(logreg_runs):
    for lr in (0.1, 1.0):
        assert np.all(np.diff(logreg_runs[("ng-exact", lr)]) < 0), lr
    every_rep = logreg_runs[("all", ("ng-exact", 1.0))]
    assert np.all(np.diff(every_rep, axis=1) < 1e-12)


def test_logreg_exact_and_empirical_fisher_agree_at_first_step(logreg_runs):
    # at w0 ≈ 0 every s = 1/2, so (s − t)² = s(1 − s): the two Fishers coincide
    assert abs(logreg_runs[("ng-exact", 0.1)][1] - logreg_runs[("ng-empirical", 0.1)][1]) < 2e-3


def test_logreg_twice_as_fast_comes_from_centred_fisher(logreg_runs):
    start = logreg_runs[("gd", 0.1)][0]
    drop = {c: start - logreg_runs[c][-1] for c in logreg_runs if c[0] != "all"}
    # measured (100 reps): loss decrease after 5 steps at step 0.1, relative to GD:
    # centred 2.7×, empirical 1.7×, exact 1.3×
    assert drop[("ng-centred", 0.1)] > 2.0 * drop[("gd", 0.1)]
    assert 1.0 < drop[("ng-exact", 0.1)] / drop[("gd", 0.1)] < 2.0


# --- 3. Parametrisation independence of the minimum-norm natural gradient -----------------------
@pytest.fixture(scope="module")
def reparam_problem():
    models, x, y = reparam.problem(n=8, d_in=3, width=6, m=3, seed=0)
    P = sum(p.numel() for p in models["plain"].parameters())
    assert P > 8 * 3                                  # over-parametrised: F is singular
    return models, x, y


@pytest.mark.parametrize(("method", "tol"), [("dual", 1e-9), ("cg", 1e-8), ("minres", 1e-8)])
def test_min_norm_natural_gradient_is_parametrisation_independent(reparam_problem, method, tol):
    res = reparam.invariance(*reparam_problem, damping=0.0, method=method)
    for kind, r in res.items():
        assert r["natural"] < tol, (kind, r)          # F_R J n agrees
        assert r["euclidean"] > 0.1, (kind, r)        # F_R J g does not
        assert r["params"] > 0.1, (kind, r)           # n itself differs: it is not trivial


def test_damped_solution_converges_to_min_norm(reparam_problem):
    lambdas = np.logspace(-8, -2, 7)
    curves = reparam.damping_curve(*reparam_problem, lambdas)
    for kind in reparam.KINDS:
        c = curves[kind]
        assert c[0] < 1e-4, (kind, c)
        assert np.all(np.diff(c) > 0), (kind, c)
        assert 5 < c[1] / c[0] < 15, (kind, c)        # O(λ): one decade per decade
    for kind in reparam.KINDS[1:]:
        d = curves[f"dist {kind}"]
        assert d[0] < 1e-4 and d[-1] > 1e-3, (kind, d)   # damping breaks the invariance


# --- 4. The "natural chain rule" of the first document ----------------------------------------
@pytest.fixture(scope="module")
def chain_cases():
    rows = chain.cases(big=[5, 4, 2], small=[3, 4, 2], n_big=3, n_small=20, seed=0,
                       backend="autograd")
    return {r["case"]: r for r in rows}


def test_chain_rule_exact_for_invertible_output_fisher_and_full_rank(chain_cases):
    assert chain_cases["Gaussian, N·m ≤ P"]["chain_err"] < 1e-10
    assert chain_cases["Gaussian (F_η ∝ I), N·m > P"]["chain_err"] < 1e-8


def test_chain_rule_not_min_norm_for_softmax_logits(chain_cases):
    r = chain_cases["softmax logits, N·m ≤ P"]
    assert r["chain_err"] > 1e-2, r                   # not F⁺g ...
    assert r["chain_residual"] < 1e-9, r              # ... but still a solution of F n = g
    assert r["chain_norm_ratio"] > 1.0, r             # with a larger norm


def test_chain_rule_wrong_when_batch_exceeds_parameters(chain_cases):
    for name in ("heterosc. Gaussian, N·m > P", "Bernoulli, N·m > P"):
        r = chain_cases[name]
        assert r["chain_err"] > 1e-3, r
        assert r["chain_residual"] > 1e-4, r          # not even a solution of F n = g


def test_chain_rule_wrong_layer_by_layer(chain_cases):
    r = chain_cases["Gaussian, per layer"]
    assert r["chain_err"] > 0.1, r
    assert r["chain_residual"] > 0.1, r


def test_dual_solve_is_min_norm_natural_gradient(chain_cases):
    for name, r in chain_cases.items():
        assert r["dual_err"] < 1e-8, (name, r)
        assert r["lib_fisher_err"] < 1e-12, (name, r)
