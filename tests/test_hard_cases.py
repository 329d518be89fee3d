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


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("method", ["dual-direct", "lsmr"])
def test_float32_ill_conditioned_factor_keeps_real_directions(method, damping):
    """Near-duplicate examples make κ(A) ~ 1e4: float32 must keep A's small but real directions."""
    def mlp(dtype):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                             nn.Linear(64, 1)).to(dtype)

    torch.manual_seed(1)
    x0 = torch.randn(16, 16)
    x = torch.cat([x0, x0 + 1e-3 * torch.randn(16, 16)])
    y = torch.randn(32, 1)
    op64 = FisherOperator(mlp(torch.float64), x.double(), "gaussian", targets=y.double())
    A = op64.factor_rmatmat(torch.eye(op64.num_rows, dtype=torch.float64)).T  # (R, P)
    b = op64.gradient_factor()
    if damping == 0:  # minimum-norm least squares by LAPACK's SVD driver
        want = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
    else:
        K = A @ A.T + damping * torch.eye(A.shape[0], dtype=A.dtype)  # Woodbury, in float64
        want = A.T @ torch.linalg.solve(K, b)
    op = FisherOperator(mlp(torch.float32), x, "gaussian", targets=y, damping=damping)
    res = solve(op, method=method, tol=1e-6, maxiter=2000)
    err = ((res.x.double() - want).norm() / want.norm()).item()
    assert err < 2e-2, err


@pytest.mark.parametrize("method", ["lsmr", "cg", "minres", "dual-direct", "auto"])
def test_float32_underflowing_probability_does_not_poison_the_factor(method):
    """p_y underflows in float32: b ~ 1/√p_y cannot be trusted, the solvers must use g instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.0, 0.0, -120.0]))  # class 2 all but impossible
    x = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    op = FisherOperator(model, x, targets=y, damping=1e-3)
    assert op.gradient_factor() is None
    F_ref, g = dense_fisher(model.double(), x.double(), y, "categorical")
    want = torch.linalg.solve(F_ref + 1e-3 * torch.eye(len(g), dtype=g.dtype), g)
    res = solve(op, method=method, maxiter=500)
    assert res.converged
    assert ((res.x.double() - want).norm() / want.norm()).item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_confidently_wrong_classifier_through_the_dual_solve(dtype):
    """Logits of ±100 and wrong labels: b ~ 1/√p_y is huge (yet Aᵀb = g to √eps), and the dual
    solve's b-formula cancels badly; it must fall back to the same eigenpairs applied to g."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(200.0)
        model[2].bias.mul_(200.0)
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        y = (model(x).argmax(-1) + 1) % 3
    F_ref, g = dense_fisher(model, x, y, "categorical")
    want = torch.linalg.solve(F_ref + 1e-3 * torch.eye(len(g), dtype=g.dtype), g)
    model = model.to(dtype)
    direction, res = natural_gradient(model, x.to(dtype), y, damping=1e-3, return_result=True)
    assert res.method == "dual-direct"
    err = float((flat(direction).double() - want).norm() / want.norm())
    assert err < (1e-8 if dtype == torch.float64 else 1e-4), (err, res)
