"""The whole-model autograd linearization against torch.func jvp/vjp."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ngtriton.linearize import AutogradLinearization, NotLinearizable


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


def _functional(model, x):
    """The oracle: ``f(*params) = model(x)`` through torch.func, and the parameters."""
    names = [n for n, _ in model.named_parameters()]

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    return f, tuple(p.detach() for p in model.parameters())


@pytest.mark.parametrize("model_fn", [
    lambda: nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 3)),
    Branchy,
])
def test_matches_torch_func(model_fn):
    torch.manual_seed(0)
    model = model_fn().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    lin = AutogradLinearization(model, (x,))
    f, params = _functional(model, x)
    v = tuple(torch.randn_like(p) for p in params)
    u = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lin.jvp(list(v)), jvp(f, params, v)[1])
    for got, want in zip(lin.vjp(u), vjp(f, *params)[1](u)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="tangents"):
        lin.jvp(list(v)[:-1])
    with pytest.raises(ValueError, match="cotangent"):
        lin.vjp(u[:, :2])


def test_dropout_is_the_identity_as_in_the_engine():
    """Train-mode dropout (module and functional) is left out of the linearization, so the
    autograd fallback and the engine take the Fisher of the same network."""
    class Drops(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.drop, self.b = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)

        def forward(self, x):
            h = self.drop(torch.tanh(self.a(x)))
            return self.b(torch.nn.functional.dropout(h, 0.3, training=True))

    torch.manual_seed(1)
    model = Drops().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    lin = AutogradLinearization(model, (x,))
    model.eval()
    reference = AutogradLinearization(
        nn.Sequential(model.a, nn.Tanh(), model.b), (x,))
    v = [torch.randn_like(p) for p in model.parameters()]
    torch.testing.assert_close(lin.outputs, reference.outputs, rtol=0, atol=0)
    torch.testing.assert_close(lin.jvp(v), reference.jvp(v))


def test_attention_runs_through_the_math_backend():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    lin = AutogradLinearization(layer, (x,))
    f, params = _functional(layer, x)
    v = tuple(torch.randn_like(p) for p in params)
    with sdpa_kernel([SDPBackend.MATH]):  # the oracle's forward AD needs it too
        want = jvp(f, params, v)[1]
    torch.testing.assert_close(lin.jvp(list(v)), want)


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_a_backward_that_cannot_be_differentiated_again_is_an_error_not_a_zero():
    torch.manual_seed(3)
    a, b = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    model = nn.Sequential(a, nn.Tanh())
    x = torch.randn(6, 4, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.b(_OnceSquare.apply(torch.tanh(self.a(x))))

    with pytest.raises(NotLinearizable, match=r"^model: .*_OnceSquare .*cannot be "
                       "differentiated again.* no jvp"):
        AutogradLinearization(Net(), (x,))
    # a zero derivative (round) is not mistaken for a cut graph
    rounded = nn.Sequential(model, nn.Linear(5, 3).double())
    rounded[0][1].register_forward_hook(lambda m, args, out: out + (out * 0).round())
    AutogradLinearization(rounded, (x,))


def test_a_parameter_added_to_the_output_is_linked():
    """``z = lin(x) + offset`` with offset shaped like z: its gradient is the cotangent itself
    (no grad_fn), which depends on u, not a cut graph."""
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.offset = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) + self.offset

    torch.manual_seed(4)
    model = Offset()
    x = torch.randn(4, 3, dtype=torch.float64)
    lin = AutogradLinearization(model, (x,))
    f, params = _functional(model, x)
    v = tuple(torch.randn_like(p) for p in params)
    torch.testing.assert_close(lin.jvp(list(v)), jvp(f, params, v)[1])
