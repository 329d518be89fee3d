"""Hypothesis: every solver on random singular PSD systems with a known minimum-norm answer."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from solver_helpers import RTOL, TOL, make_operator, rel_err

from ngtriton.solvers import cg, dual_direct, lsmr, minres


@st.composite
def systems(draw):
    P = draw(st.integers(2, 14))
    R = draw(st.integers(1, 16))
    rank = draw(st.integers(1, min(R, P)))
    damping = draw(st.sampled_from([0.0, 0.01, 0.5]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 10_000))
    return make_operator(R, P, rank, damping=damping, dtype=dtype, seed=seed)


def _check(op, x, rhs):
    dtype = op.dtype
    ref = op.reference(rhs)
    assert torch.isfinite(x).all()
    assert rel_err(x, ref) < 5 * RTOL[dtype]
    null = op.null_basis()
    if op.damping == 0 and null.shape[1]:
        assert float((null.T @ x.double()).norm()) <= 5 * RTOL[dtype] * float(ref.norm())


@settings(max_examples=30, deadline=None)
@given(systems())
def test_cg_minres(op):
    g, it = op.gradient(), 4 * op.num_params
    for solver in (cg, minres):
        res = solver(op.damped_matvec, g, tol=TOL[op.dtype], maxiter=it)
        _check(op, res.x, g)


@settings(max_examples=30, deadline=None)
@given(systems())
def test_lsmr(op):
    g = op.gradient()
    res = lsmr(op.factor_matvec, op.factor_rmatvec, op.b, damp=math.sqrt(op.damping),
               tol=TOL[op.dtype], maxiter=4 * op.num_params)
    _check(op, res.x, g)
    res = lsmr(op.damped_matvec, op.damped_matvec, g, tol=TOL[op.dtype],
               maxiter=6 * op.num_params)
    _check(op, res.x, g)


@settings(max_examples=30, deadline=None)
@given(systems())
def test_dual_direct(op):
    _check(op, dual_direct(op, b=op.b).x, op.gradient())
