"""The whole-model autograd linearization against torch.func jvp/vjp."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from ngtriton.linearize import AutogradLinearization


class Branchy(nn.Module):
    """Data-dependent control flow and an unused parameter: nothing fx could trace."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.unused = nn.Parameter(torch.randn(2))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.b(torch.nn.functional.softplus(h))


@pytest.mark.parametrize("model_fn", [
    lambda: nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 3)),
    Branchy,
])
def test_matches_torch_func(model_fn):
    torch.manual_seed(0)
    model = model_fn().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    lin = AutogradLinearization(model, (x,))
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    v = tuple(torch.randn_like(p) for p in params)
    u = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lin.jvp(list(v)), jvp(f, params, v)[1])
    for got, want in zip(lin.vjp(u), vjp(f, *params)[1](u)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="tangents"):
        lin.jvp(list(v)[:-1])
    with pytest.raises(ValueError, match="cotangent"):
        lin.vjp(u[:, :2])
