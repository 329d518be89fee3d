"""Hard but valid problems give finite, correct natural gradients (float64 oracles, pinv)."""

from __future__ import annotations

import pytest
import torch
from oracles import dense_fisher
from torch import nn

from ngtriton import FisherOperator, natural_gradient, solve

METHODS = ["auto", "cg", "minres", "lsmr", "dual"]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def check_min_norm(model, x, y, likelihood, method, rtol=1e-5, damping=0.0):
    F_ref, g = dense_fisher(model, x, y, likelihood)
    want = torch.linalg.pinv(F_ref, hermitian=True, rtol=1e-10) @ g if damping == 0 else \
        torch.linalg.solve(F_ref + damping * torch.eye(len(g), dtype=g.dtype), g)
    got = flat(natural_gradient(model, x, y, likelihood=likelihood, method=method,
                                damping=damping, tol=1e-12, maxiter=3000))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.norm().item())
    return got


@pytest.mark.parametrize("method", METHODS)
def test_duplicated_units(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # units 0 and 1 identical, in and out: F is exactly singular
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[:, 1] = model[2].weight[:, 0]
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    n = check_min_norm(model, x, y, "categorical", method)
    W1 = n[:12].reshape(4, 3)
    torch.testing.assert_close(W1[0], W1[1])  # the minimum-norm step treats twins alike


@pytest.mark.parametrize("method", METHODS)
def test_dead_relus_and_batch_of_one(method):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # three dead units
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    n = check_min_norm(model, x, y, "categorical", method)
    assert n[:9].abs().max() == 0  # no update flows into dead units' incoming weights


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradient_gives_zero_step(method):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    op = FisherOperator(model, x, "gaussian", targets=y)
    res = solve(op, method=method)
    assert torch.isfinite(res.x).all() and res.x.abs().max() == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 400])  # N·m far below and far above P = 38
def test_batch_far_from_parameter_count(method, n):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 3, dtype=torch.float64)
    check_min_norm(model, x, y, "gaussian", method, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_confidently_wrong_softmax(method):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        model[2].weight.mul_(15.0)
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmin(-1)  # the least likely class: p_y is tiny
    F_ref, g = dense_fisher(model, x, y, "categorical")
    got = flat(natural_gradient(model, x, y, method=method, damping=1e-4, tol=1e-10,
                                maxiter=3000))
    want = torch.linalg.solve(F_ref + 1e-4 * torch.eye(len(g), dtype=g.dtype), g)
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_float32_badly_conditioned_is_finite_and_close(method):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(64, 4) * torch.tensor([1e-2, 1.0, 10.0, 1e2])
    y = torch.randint(0, 3, (64,))
    got = flat(natural_gradient(model, x, y, method=method, damping=1e-3, tol=1e-6,
                                maxiter=2000))
    assert torch.isfinite(got).all()
    m64 = model.double()
    F_ref, g = dense_fisher(m64, x.double(), y, "categorical")
    want = torch.linalg.solve(F_ref + 1e-3 * torch.eye(len(g), dtype=g.dtype), g)
    assert (got.double() - want).norm() / want.norm() < 5e-2
