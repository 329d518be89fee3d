"""The rules' building blocks: activation derivatives and broadcasting adjoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from ngtriton.linearize.rules import Activation, unbroadcast

TORCH_ACTS = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu,
    "leaky_relu": lambda s: F.leaky_relu(s, 0.3), "gelu": F.gelu,
    "gelu_tanh": lambda s: F.gelu(s, approximate="tanh"), "silu": F.silu,
}


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_activation_value_and_derivative(name, owned):
    torch.manual_seed(0)
    s = torch.cat([torch.randn(200, dtype=torch.float64) * 4, torch.tensor([0.0, 30, -30],
                                                                           dtype=torch.float64)])
    act = Activation(name, 0.3 if name == "leaky_relu" else 0.0)
    ref = TORCH_ACTS[name]
    want_y, want_d = jvp(ref, (s,), (torch.ones_like(s),))
    s_in = s.clone()
    y, d = act.forward(s_in, owned=owned)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, want_d, rtol=1e-12, atol=1e-12)
    if not owned:
        assert torch.equal(s_in, s)  # the input is left untouched


@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_activation_derivative_from_a_recorded_forward(name):
    """σ′ from (s, σ(s)) as a recorded forward gives it, and from s alone; inputs untouched."""
    torch.manual_seed(2)
    s = torch.randn(300, dtype=torch.float64) * 3
    act = Activation(name, 0.3 if name == "leaky_relu" else 0.0)
    _, want_d = jvp(TORCH_ACTS[name], (s,), (torch.ones_like(s),))
    y = TORCH_ACTS[name](s)
    s_in, y_in = s.clone(), y.clone()
    torch.testing.assert_close(act.derivative(s_in, y_in), want_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.derivative(s_in, None), want_d, rtol=1e-12, atol=1e-12)
    assert torch.equal(s_in, s) and torch.equal(y_in, y)
    if name in ("tanh", "sigmoid"):
        torch.testing.assert_close(act.derivative(None, y_in), want_d, rtol=1e-10, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="needs the activation's input"):
            act.derivative(None, y_in)


def test_unbroadcast_is_adjoint_of_broadcast():
    torch.manual_seed(1)
    for shape, out in [((3,), (4, 5, 3)), ((1, 3), (4, 3)), ((4, 1, 3), (4, 5, 3)), ((), (2, 2)),
                       ((2, 3), (2, 3))]:
        a = torch.randn(shape, dtype=torch.float64)
        g = torch.randn(out, dtype=torch.float64)
        lhs = (a.expand(out) * g).sum()
        got = unbroadcast(g, torch.Size(shape))
        assert got.shape == torch.Size(shape)
        torch.testing.assert_close((a * got).sum(), lhs)
