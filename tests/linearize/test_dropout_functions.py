"""Dropout off everywhere (linearize/dropout.py) and custom autograd.Functions as one node
(linearize/functions.py), at the level of the engine and its helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ngtriton.linearize import AutogradLinearization
from ngtriton.linearize.dropout import DROPOUT_FUNCS, WithoutDropout, dropout_free
from ngtriton.linearize.engine import build_engine

F64 = torch.float64


@pytest.mark.parametrize("func", sorted(DROPOUT_FUNCS, key=lambda f: f.__name__))
def test_every_dropout_function_is_the_identity(func):
    x = torch.randn(2, 3, 4, 4)
    with WithoutDropout():
        assert func(x.clone(), 0.5, True).equal(x)
    assert dropout_free(func)((x, 0.5, True), {}).equal(x)


def test_functions_with_a_dropout_probability_get_zero():
    q = torch.randn(2, 2, 5, 4)
    ref = F.scaled_dot_product_attention(q, q, q)
    with WithoutDropout():
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, None, 0.5), ref)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), ref)
        out, mask = torch.native_dropout(q, 0.5, True)
    assert out.equal(q) and bool(mask.all())
    run = dropout_free(F.scaled_dot_product_attention)
    torch.testing.assert_close(run((q, q, q), {"dropout_p": 0.9}), ref)


def test_a_traced_sdpa_node_runs_without_its_dropout():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v, None, 0.9).squeeze(1)  # positional

    torch.manual_seed(0)
    model = Attn().to(F64)
    x = torch.randn(2, 5, 4, dtype=F64)
    a, b = build_engine(model, (x,)), build_engine(model, (x,))
    assert a.outputs.equal(b.outputs)
    with torch.no_grad():
        q, k, v = model.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        torch.testing.assert_close(a.outputs, F.scaled_dot_product_attention(q, k, v).squeeze(1))


class _Double(torch.autograd.Function):
    """Forward doubles, backward claims 5 (so a trace of the forward would be visible)."""

    @staticmethod
    def forward(ctx, x, scale=1.0):
        return 2 * x * scale

    @staticmethod
    def backward(ctx, g):
        return 5 * g, None


class _Leaf(nn.Module):
    """A layer without submodules: an opaque node that calls a Function inside."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=F64))

    def forward(self, x):
        return _Double.apply(x @ self.w)


@pytest.mark.parametrize("where", ["traced", "leaf", "constant"])
def test_a_function_is_honoured_wherever_it_is(where):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.leaf = nn.Linear(3, 3).to(F64), _Leaf()

        def forward(self, x):
            if where == "traced":
                return _Double.apply(self.a(x), 0.5)
            if where == "leaf":
                return self.leaf(self.a(x))
            return self.a(x) + _Double.apply(x)  # on data: no tangent

    model = Net()
    x = torch.randn(4, 3, dtype=F64)
    eng, ref = build_engine(model, (x,)), AutogradLinearization(model, (x,))
    torch.testing.assert_close(eng.outputs, ref.outputs)
    v = [torch.randn_like(p) for p in eng.params]
    u = torch.randn_like(eng.outputs)
    torch.testing.assert_close(eng.jvp(v), ref.jvp(v))
    for a, b in zip(eng.vjp(u), ref.vjp(u)):
        torch.testing.assert_close(a, b)


def test_torch_own_functions_are_traced_through_as_before():
    """Reentrant checkpoint is an autograd.Function without a double backward: the engine keeps
    tracing its forward's ops (exact) instead of making it a node it cannot linearize."""
    torch.manual_seed(2)
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(F64)
    head = nn.Linear(4, 2).to(F64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = inner, head

        def forward(self, x):
            return self.head(checkpoint(self.inner, x, use_reentrant=True))

    x = torch.randn(5, 3, dtype=F64)
    apply = torch.autograd.function.Function.__dict__["apply"]
    eng = build_engine(Net(), (x,))
    assert torch.autograd.function.Function.__dict__["apply"] is apply  # the patch is gone
    ref = AutogradLinearization(nn.Sequential(inner, head), (x,))
    v = [torch.randn_like(p) for p in eng.params]
    torch.testing.assert_close(eng.jvp(v), ref.jvp(v))
