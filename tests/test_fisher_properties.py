"""Property-based checks of the Fisher operator: symmetric, positive semi-definite, linear."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ngtriton import FisherOperator

CASES = st.fixed_dictionaries({
    "likelihood": st.sampled_from(["categorical", "gaussian", "bernoulli"]),
    "fisher": st.sampled_from(["exact", "mc", "empirical"]),
    "n": st.integers(1, 12),
    "width": st.integers(1, 6),
    "m": st.integers(1, 4),
    "damping": st.sampled_from([0.0, 1e-3, 1.0]),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "backend": st.sampled_from(["torch", "autograd"]),
    "seed": st.integers(0, 2**16),
})


def build(case):
    torch.manual_seed(case["seed"])
    dtype, n, m = case["dtype"], case["n"], case["m"]
    if case["likelihood"] == "categorical":
        m = max(m, 2)
        y = torch.randint(0, m, (n,))
    elif case["likelihood"] == "gaussian":
        y = torch.randn(n, m, dtype=dtype)
    else:
        y = torch.randint(0, 2, (n, m)).to(dtype)
    model = nn.Sequential(nn.Linear(3, case["width"]), nn.Tanh(),
                          nn.Linear(case["width"], m)).to(dtype)
    x = torch.randn(n, 3, dtype=dtype)
    op = FisherOperator(model, x, case["likelihood"], targets=y, fisher=case["fisher"],
                        damping=case["damping"], backend=case["backend"],
                        generator=torch.Generator().manual_seed(case["seed"]))
    return op


@settings(max_examples=40, deadline=None)
@given(CASES)
def test_symmetric_psd_linear(case):
    op = build(case)
    tol = 1e-4 if case["dtype"] == torch.float32 else 1e-10
    u, v = (torch.randn(op.num_params, dtype=case["dtype"]) for _ in range(2))
    Fu, Fv = op @ u, op @ v
    scale = (u.norm() * Fv.norm() + v.norm() * Fu.norm()).item() + 1e-30
    assert abs((u @ Fv - v @ Fu).item()) <= tol * scale
    assert (v @ Fv).item() >= case["damping"] * (v @ v).item() - tol * scale
    torch.testing.assert_close(op @ (2.0 * u - 3.0 * v), 2.0 * Fu - 3.0 * Fv,
                               rtol=10 * tol, atol=10 * tol * (Fu.norm() + Fv.norm()).item())
    # The factor reproduces the operator: (AᵀA + λI) v = (F + λI) v.
    AtAv = op.factor_rmatvec(op.factor_matvec(v)) + op.damping * v
    torch.testing.assert_close(AtAv, Fv, rtol=10 * tol, atol=10 * tol * Fv.norm().item() + 1e-30)
