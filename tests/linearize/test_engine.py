"""The per-module engine against torch.func jvp/vjp (oracles it does not share code with)."""

from __future__ import annotations

import collections
import copy
import itertools
import types
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp
from torch.utils._python_dispatch import TorchDispatchMode

from ngtriton.linearize import ops_torch
from ngtriton.linearize.base import Linearization
from ngtriton.linearize.engine import (
    EngineLinearization,
    EngineUnsupported,
    _Builder,
    _Tracer,
    build_engine,
    clear_trace_cache,
)

F64 = torch.float64


def oracle(model: nn.Module, inputs: tuple):
    """``f(*params)`` over the trainable parameters, through functional_call."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = tuple(p.detach() for _, p in named)

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), inputs)

    return f, params


def _reverse_jvp(f, params, v):
    """``(f(params), J v)`` from the dense reverse-mode Jacobian (for ops without forward AD)."""
    jac = jacrev(f, argnums=tuple(range(len(params))))(*params)
    return f(*params), sum(torch.tensordot(j, t, dims=t.ndim) for j, t in zip(jac, v))


def check_against_oracle(model, inputs, rtol=1e-10, atol=1e-10, oracle_model=None, seed=0,
                         reverse_only=False):
    """Engine jvp/vjp/outputs == torch.func jvp/vjp on fresh random tangents/cotangents
    (``reverse_only``: J v from torch.func's dense reverse-mode Jacobian instead)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    lin = build_engine(model, inputs)
    assert isinstance(lin, Linearization)
    assert [id(p) for p in lin.params] == [id(p) for p in model.parameters() if p.requires_grad]
    f, params = oracle(oracle_model or model, inputs)
    gen = torch.Generator().manual_seed(seed)
    v = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)
    out, jv = (_reverse_jvp if reverse_only else jvp)(f, params, v)
    u = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    want = vjp(f, *params)[1](u)
    torch.testing.assert_close(lin.outputs, out, rtol=rtol, atol=atol)
    torch.testing.assert_close(lin.jvp(list(v)), jv, rtol=rtol, atol=atol)
    got = lin.vjp(u)
    assert len(got) == len(want)
    for g, w, p in zip(got, want, params):
        assert g.shape == p.shape
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    return lin


# --------------------------------------------------------------------------------------------
# Activations (modules and functional forms), fused after Linear and standalone
# --------------------------------------------------------------------------------------------

ACT_MODULES = {
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2), "relu_inplace": lambda: nn.ReLU(inplace=True),
}

ACT_FUNCS = {
    "torch.tanh": torch.tanh, "torch.sigmoid": torch.sigmoid, "torch.relu": torch.relu,
    "F.relu": F.relu, "F.relu_inplace": lambda x: F.relu(x, inplace=True),
    "F.gelu": F.gelu, "F.gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "F.silu": F.silu, "F.tanh": F.tanh, "F.sigmoid": F.sigmoid,
    "F.leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "Tensor.relu": lambda x: x.relu(), "Tensor.tanh": lambda x: x.tanh(),
    "Tensor.sigmoid": lambda x: x.sigmoid(),
}


def mlp(act_fn, dims=(5, 7, 6, 3)):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(act_fn())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("name", list(ACT_MODULES))
def test_mlp_activation_modules(name):
    torch.manual_seed(0)
    model = mlp(ACT_MODULES[name]).to(F64)
    x = torch.randn(9, 5, dtype=F64)
    lin = check_against_oracle(model, x)
    assert [type(s).__name__ for s in lin.steps] == ["LinearStep"] * 3  # activations fused
    assert lin.fallbacks == []


class FunctionalMLP(nn.Module):
    def __init__(self, act, fuse=True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act, self.fuse = act, fuse

    def forward(self, x):
        h = self.act(self.a(x))
        s = self.b(h)
        if not self.fuse:
            s = s * 1.5  # the activation no longer directly follows the Linear
        h = self.act(s)
        return self.c(h) + self.act(2.0 * h).sum(-1, keepdim=True)  # standalone activation


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("name", list(ACT_FUNCS))
def test_mlp_functional_activations(name, fuse):
    torch.manual_seed(1)
    model = FunctionalMLP(ACT_FUNCS[name], fuse).to(F64)
    lin = check_against_oracle(model, torch.randn(6, 5, dtype=F64))
    assert lin.fallbacks == []
    kinds = collections.Counter(type(s).__name__ for s in lin.steps)
    assert kinds["LinearStep"] == 3
    assert kinds["ElementwiseStep"] == (1 if fuse else 2)


def test_activations_at_extreme_inputs():
    """σ′ at large |s| and exactly 0 (relu: torch uses σ′(0) = 0)."""
    torch.manual_seed(2)
    for name, act in ACT_MODULES.items():
        model = nn.Sequential(nn.Linear(3, 4), act()).to(F64)
        with torch.no_grad():
            model[0].weight.mul_(30.0)
            model[0].bias.zero_()
        x = torch.randn(10, 3, dtype=F64)
        x[0] = 0.0
        check_against_oracle(model, x)
        assert name


# --------------------------------------------------------------------------------------------
# Containers, plain modules, residuals, arithmetic
# --------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.ff(self.ln(x))


class Residual(nn.Module):
    """Plain module: residual blocks, ModuleList/ModuleDict, scalar arithmetic, get_attr params."""

    def __init__(self, d=6):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.heads = nn.ModuleDict({"out": nn.Linear(d, 3)})
        self.scale = nn.Parameter(torch.randn(d))
        self.offset = nn.Parameter(torch.randn(1, d))
        self.register_buffer("mask", torch.randn(d))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for blk in self.blocks:
            h = blk(h)
        h = 0.5 * h - self.offset + 1.0           # scalar mul, sub of a parameter, constant
        h = torch.add(h, h * self.scale, alpha=0.3)  # product with a parameter, alpha
        h = h * self.mask / 2.0 - (-h)             # buffer (constant) mul, div, neg
        h = h * h + 2 - h                          # product of two active values
        return self.heads["out"](h)


def test_nested_sequential():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
        nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Identity()),
        nn.Linear(6, 2),
    ).to(F64)
    check_against_oracle(model, torch.randn(7, 4, dtype=F64))


def test_residual_plain_module():
    torch.manual_seed(4)
    model = Residual().to(F64)
    lin = check_against_oracle(model, torch.randn(5, 4, dtype=F64))
    assert lin.fallbacks == []


def test_sequence_inputs_rank3():
    """Linear / LayerNorm / activations on (N, T, d) inputs."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), Block(6), nn.LayerNorm(6),
                          nn.Linear(6, 3)).to(F64)
    check_against_oracle(model, torch.randn(3, 5, 4, dtype=F64))


# --------------------------------------------------------------------------------------------
# LayerNorm, Embedding, Flatten, Dropout, shape ops
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["affine", "no_affine", "no_bias", "2d_shape", "functional"])
def test_layernorm(kind):
    torch.manual_seed(6)
    if kind == "2d_shape":
        model = nn.Sequential(nn.Unflatten(1, (2, 4)), nn.LayerNorm((2, 4)), nn.Flatten(),
                              nn.Linear(8, 3))
        x = torch.randn(5, 8, dtype=F64)
    elif kind == "functional":
        class FLN(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 6)
                self.w = nn.Parameter(torch.randn(6))
                self.b = nn.Parameter(torch.randn(6))

            def forward(self, x):
                return F.layer_norm(self.lin(x), (6,), self.w, self.b, 1e-3)

        model = FLN()
        x = torch.randn(5, 4, dtype=F64)
    else:
        ln = nn.LayerNorm(6, elementwise_affine=kind != "no_affine", bias=kind != "no_bias")
        if ln.weight is not None:
            with torch.no_grad():
                ln.weight.normal_()
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), ln, nn.Linear(6, 3))
        x = torch.randn(5, 4, dtype=F64)
    lin = check_against_oracle(model.to(F64), x)
    assert "LayerNormStep" in {type(s).__name__ for s in lin.steps}
    assert lin.fallbacks == []


def test_layernorm_on_the_input():
    """LayerNorm first: no tangent flows into it, only its affine parameters."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)).to(F64)
    check_against_oracle(model, torch.randn(6, 4, dtype=F64))


class Bag(nn.Module):
    """Embedding → mean-pool → Linear."""

    def __init__(self, tie=False):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.out = nn.Linear(5, 11 if tie else 3)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx).mean(dim=1)))


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_mean_pool(tie):
    torch.manual_seed(8)
    model = Bag(tie).to(F64)
    idx = torch.randint(0, 11, (6, 4))
    idx[0, :2] = 3  # repeated indices: cotangents must add up
    lin = check_against_oracle(model, idx)
    assert len(lin.params) == (2 if tie else 3)
    assert "EmbeddingStep" in {type(s).__name__ for s in lin.steps}


def test_embedding_padding_idx_adjoint():
    """padding_idx rows have a zero Jacobian both ways (torch's backward skips them)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 2))
    model = model.to(F64)
    idx = torch.tensor([[0, 1, 2, 0], [3, 0, 6, 5]])
    lin = build_engine(model, (idx,))
    f, params = oracle(model, (idx,))
    u = torch.randn(2, 2, dtype=F64)
    for g, w in zip(lin.vjp(u), vjp(f, *params)[1](u)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    _adjoint(lin)


def test_flatten_nchw():
    torch.manual_seed(10)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.Flatten()
            self.a = nn.Linear(2 * 3 * 4, 5)
            self.b = nn.Linear(5 * 2, 2)

        def forward(self, x):
            h = self.a(self.flat(x)).relu()
            h = torch.cat([h, torch.flatten(x, 1)[:, :5] * h], dim=1)  # cat, getitem, product
            h = h.view(h.size(0), 2, 5).transpose(1, 2).reshape(-1, 10)
            return self.b(h).permute(1, 0).t()

    lin = check_against_oracle(Net().to(F64), torch.randn(3, 2, 3, 4, dtype=F64))
    assert lin.fallbacks == []


def test_shape_ops():
    torch.manual_seed(11)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)                                   # (N, 6)
            p, q = h.chunk(2, dim=-1)                       # tuple output + getitem
            h = torch.stack([p, q], 0).sum(0) + p.mean(-1, keepdim=True)
            h = h.unsqueeze(1).expand(-1, 2, -1).flip(1).squeeze(1)[:, 0]
            return self.b(h)

    lin = check_against_oracle(Net().to(F64), torch.randn(5, 4, dtype=F64))
    assert lin.fallbacks == []


def test_dropout_train_mode_is_identity():
    torch.manual_seed(12)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 6), nn.Tanh(),
                                     nn.Dropout(0.3), nn.Linear(6, 3))

        def forward(self, x):
            return F.dropout(self.seq(x), 0.5, training=self.training)

    model = Net().to(F64).train()
    x = torch.randn(8, 4, dtype=F64)
    ref = Net().to(F64).eval()
    ref.load_state_dict(model.state_dict())
    # oracle: the deterministic network (dropout inactive)
    named = dict(model.named_parameters())
    lin = build_engine(model, (x,))
    f, params = oracle(ref, (x,))
    v = tuple(torch.randn_like(p) for p in params)
    out, jv = jvp(f, params, v)
    torch.testing.assert_close(lin.outputs, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lin.jvp(list(v)), jv, rtol=1e-10, atol=1e-10)
    u = torch.randn_like(out)
    for g, w in zip(lin.vjp(u), vjp(f, *params)[1](u)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert model.training and len(named) == 4


# --------------------------------------------------------------------------------------------
# Per-module fallback, shared and frozen parameters, dtypes
# --------------------------------------------------------------------------------------------

class ScaledSoftplus(nn.Module):
    """A user layer without a rule: a parameter and a buffer, traced as one opaque node."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.register_buffer("shift", torch.randn(d))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return F.softplus(x * self.gain + self.shift) * self.gain.sum()


class PairOut(nn.Module):
    """An opaque layer returning a tuple."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d)

    def forward(self, x):
        return torch.sin(x @ self.w), x.shape[0]


class FallbackNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.soft = nn.Softplus(beta=2.0)
        self.custom = ScaledSoftplus(6)
        self.pair = PairOut(6)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.b = nn.Linear(12, 3)

    def forward(self, x):
        h = self.custom(self.soft(self.a(x)))
        h, n = self.pair(h)
        h = torch.exp(-h.pow(2)) * torch.nn.functional.softmax(h, -1)  # generic functions
        h = self.conv(h.unsqueeze(1)).reshape(n, -1)
        return self.b(h)


def test_fallback_modules_and_functions():
    torch.manual_seed(13)
    model = FallbackNet().to(F64)
    lin = check_against_oracle(model, torch.randn(5, 4, dtype=F64))
    names = " ".join(lin.fallbacks)
    for part in ("soft", "custom", "pair", "exp"):
        assert part in names, (part, names)
    for ruled in ("conv", "softmax", "pow"):  # rules of their own (test_layer_rules.py)
        assert ruled not in names, (ruled, names)


def test_fallback_without_double_backward():
    """A custom autograd function with no double backward: JVP by torch.func.jvp instead."""

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])
            ctx.x = inputs[0]

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            with torch.no_grad():
                return g * 3 * x.detach() ** 2

        @staticmethod
        def jvp(ctx, t):
            return t * 3 * ctx.x ** 2

    class CubeLayer(nn.Module):
        def forward(self, x):
            return Cube.apply(x)

    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), CubeLayer(), nn.Linear(4, 2)).to(F64)
    lin = build_engine(model, (torch.randn(5, 3, dtype=F64),))
    assert lin.steps[1].forward_mode
    _adjoint(lin)


def test_shared_parameters():
    torch.manual_seed(15)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 5)
            self.b.weight = self.a.weight       # tied between two modules
            self.c = nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h = torch.tanh(self.a(h))           # the same module twice
            h = self.b(h) + F.linear(h, self.a.weight)
            return self.c(h)

    model = Net().to(F64)
    lin = check_against_oracle(model, torch.randn(4, 5, dtype=F64))
    assert len(lin.params) == 5


def test_frozen_parameters():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6),
                          nn.GELU(), nn.Linear(6, 3)).to(F64)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[3].requires_grad_(False)
    lin = check_against_oracle(model, torch.randn(5, 4, dtype=F64))
    assert len(lin.params) == 4
    # a fully frozen prefix: the first trainable layer gets no input tangent
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    check_against_oracle(model, torch.randn(5, 4, dtype=F64))


def test_no_trainable_dependence():
    model = nn.Sequential(nn.Linear(3, 2)).to(F64).requires_grad_(False)
    lin = build_engine(model, (torch.randn(4, 3, dtype=F64),))
    assert lin.params == []
    assert torch.equal(lin.jvp([]), torch.zeros(4, 2, dtype=F64))
    assert lin.vjp(torch.ones(4, 2, dtype=F64)) == []


def test_cnn_with_batchnorm_train_mode():
    """Conv, BatchNorm (batch statistics) and average pooling have rules: no fallback."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1),
                          nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4), nn.Tanh(),
                          nn.Linear(4, 3)).to(F64).train()
    lin = check_against_oracle(model, torch.randn(5, 2, 4, 4, dtype=F64))
    assert lin.fallbacks == []


class TinyTransformer(nn.Module):
    """Embedding, attention (a torch.nn layer without a rule, returning a tuple), LN, MLP."""

    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.emb(idx) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h[:, -1])


def test_tiny_transformer():
    """CPU attention has no forward AD: the oracle JVP is a dense reverse-mode Jacobian."""
    torch.manual_seed(22)
    model = TinyTransformer().to(F64)
    idx = torch.randint(0, 13, (3, 5))
    lin = build_engine(model, (idx,))
    assert lin.fallbacks == []  # MultiheadAttention opened by the ATen capture: all rules
    f, params = oracle(model, (idx,))
    jac = torch.autograd.functional.jacobian(f, params)
    v = [torch.randn_like(p) for p in params]
    want = sum(torch.tensordot(j, t, dims=t.dim()) for j, t in zip(jac, v))
    torch.testing.assert_close(lin.jvp(v), want, rtol=1e-10, atol=1e-10)
    u = torch.randn_like(lin.outputs)
    for g, w in zip(lin.vjp(u), vjp(f, *params)[1](u)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_trace_is_cached():
    model = mlp(nn.Tanh).to(F64)
    x = torch.randn(3, 5, dtype=F64)
    clear_trace_cache(model)
    with _CountCalls(_Tracer, "trace") as traces:
        build_engine(model, (x,))
        build_engine(model, (x,))
        build_engine(model, (x,), cache_trace=False)
    assert traces.count == 2


def test_cached_trace_and_plan_do_not_keep_the_model_alive():
    """The trace cache is keyed weakly by the model and the build plan cached with the graph
    holds the model only weakly: dropping the model frees it and its cache entry."""
    import gc
    import weakref

    from ngtriton.linearize.engine import _TRACE_CACHE

    model = mlp(nn.Tanh).to(F64)
    x = torch.randn(3, 5, dtype=F64)
    lin = build_engine(model, (x,))
    build_engine(model, (x,))  # the second build reuses the cached trace and plan
    assert model in _TRACE_CACHE
    ref = weakref.ref(model)
    del model, lin
    gc.collect()
    assert ref() is None


def test_float32():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32),
                          nn.Tanh(), nn.Softplus(), nn.Linear(32, 4))
    check_against_oracle(model, torch.randn(20, 16), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Adjoint identity on random models
# --------------------------------------------------------------------------------------------

def _adjoint(lin, seed=0, rtol=1e-10):
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in lin.params]
    u = torch.randn(lin.outputs.shape, generator=gen, dtype=lin.outputs.dtype)
    lhs = (u * lin.jvp(v)).sum()
    rhs = sum((a * b).sum() for a, b in zip(lin.vjp(u), v))
    torch.testing.assert_close(lhs, rhs, rtol=rtol, atol=rtol)


def _random_model(gen_seed: int) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(gen_seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    d_in = int(torch.randint(2, 6, (1,), generator=g))
    layers, d = [], d_in
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        d_out = int(torch.randint(2, 8, (1,), generator=g))
        layers.append(nn.Linear(d, d_out, bias=bool(torch.rand(1, generator=g) < 0.7)))
        layers.append(pick([nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Softplus,
                            nn.Identity, lambda d=d_out: nn.LayerNorm(d), nn.ELU])())
        d = d_out
    layers.append(nn.Linear(d, 3))
    return nn.Sequential(*layers).to(F64), torch.randn(6, d_in, dtype=F64, generator=g)


@pytest.mark.parametrize("seed", range(8))
def test_adjoint_identity_random_models(seed):
    torch.manual_seed(seed)
    model, x = _random_model(seed)
    _adjoint(build_engine(model, (x,)), seed)


# --------------------------------------------------------------------------------------------
# One forward, ops routing, errors
# --------------------------------------------------------------------------------------------

class _CountCalls:
    """Count calls of ``cls.name`` inside the ``with`` block."""

    def __init__(self, cls, name):
        self.cls, self.name, self.count = cls, name, 0

    def __enter__(self):
        self.orig = getattr(self.cls, self.name)
        orig = self.orig

        def wrapped(*args, **kwargs):
            self.count += 1
            return orig(*args, **kwargs)

        setattr(self.cls, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.name, self.orig)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.calls[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def test_one_forward_only():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), ScaledSoftplus(6), nn.Linear(6, 6),
                          nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    build_engine(model, (x,))  # a new trace is checked once against an eager forward
    model[2].calls = 0
    with _CountOps() as build_count:
        lin = build_engine(model, (x,))
    assert model[2].calls == 1                       # the opaque module: run once
    assert build_count.calls["tanh"] + build_count.calls["tanh_"] == 2  # each activation once
    assert build_count.calls["addmm"] == 3           # each Linear evaluated once
    v = [torch.randn_like(p) for p in lin.params]
    calls = collections.Counter()
    module_call = nn.Module.__call__

    def counting_call(self, *args, **kwargs):
        calls.update([type(self).__name__])
        return module_call(self, *args, **kwargs)
    with _CountOps() as product_count, mock.patch.object(nn.Module, "__call__", counting_call):
        for _ in range(5):
            lin.vjp(lin.jvp(v))
    assert model[2].calls == 1                       # no forward of any module in products
    assert sum(calls.values()) == 0
    assert product_count.calls["tanh"] + product_count.calls["tanh_"] == 0
    assert product_count.calls["softplus"] == 0
    assert product_count.calls["addmm"] == 0         # F.linear forwards never run again


def test_ops_module_is_used():
    calls = collections.Counter()

    def counting(name):
        fn = getattr(ops_torch, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    ops = types.ModuleType("counting_ops")
    for name in ("linear_jvp", "linear_vjp", "layernorm_jvp", "layernorm_vjp"):
        setattr(ops, name, counting(name))
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 3),
                          nn.Tanh(), nn.Linear(3, 2)).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    lin = build_engine(model, (x,), ops)
    f, params = oracle(model, (x,))
    v = tuple(torch.randn_like(p) for p in params)
    torch.testing.assert_close(lin.jvp(list(v)), jvp(f, params, v)[1])
    assert calls == {"linear_jvp": 3, "layernorm_jvp": 1}
    lin.vjp(torch.randn(5, 2, dtype=F64))
    assert calls["linear_vjp"] == 3 and calls["layernorm_vjp"] == 1


def test_untraceable_model_raises():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return h

    with pytest.raises(EngineUnsupported, match="trace") as info:
        build_engine(Branchy(), (torch.randn(2, 4),))
    assert "Branchy" in info.value.reason


def test_validation_and_staleness():
    model = mlp(nn.Tanh).to(F64)
    lin = build_engine(model, torch.randn(3, 5, dtype=F64))
    assert isinstance(lin, EngineLinearization)
    v = [torch.randn_like(p) for p in lin.params]
    with pytest.raises(ValueError, match="tangents"):
        lin.jvp(v[:-1])
    with pytest.raises(ValueError, match="tangents"):
        lin.jvp([*v[:-1], torch.zeros(2)])
    with pytest.raises(ValueError, match="cotangent"):
        lin.vjp(torch.zeros(3, 2, dtype=F64))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        lin.jvp(v)


def test_optional_inputs_and_trace_cache():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, mask=None, scale=1.0):
            h = self.drop(self.a(x))
            if mask is not None:
                h = h * mask
            return h * scale

    torch.manual_seed(20)
    model = WithMask().to(F64).eval()
    x, mask = torch.randn(5, 4, dtype=F64), torch.rand(5, 3, dtype=F64)
    clear_trace_cache()
    check_against_oracle(model, (x,))
    check_against_oracle(model, (x, mask, 3.0))
    check_against_oracle(model, (x, None, 2.0))
    ref = copy.deepcopy(model)
    model.train()  # a different train flag: traced again (dropout stays the identity)
    check_against_oracle(model, (x, mask), oracle_model=ref)


class _Batch(nn.Module):
    """Inputs as containers: a dict with a nested tuple, a list, None and numbers inside."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, batch, extra, offsets=(0.5, None)):
        mask, bias = batch["pair"]
        h = self.a(batch["x"]) * batch["scale"] + bias
        if mask is not None:
            h = h * mask
        h = h + self.b(extra[0]) + offsets[0]
        return torch.tanh(h) if batch["mode"] == "tanh" else h


def _batch(n, mode="tanh", mask=True):
    return ({"x": torch.randn(n, 4, dtype=F64), "scale": 2.0, "mode": mode,
             "pair": (torch.rand(n, 3, dtype=F64) if mask else None, 1)},
            [torch.randn(n, 2, dtype=F64)])


def test_container_inputs_are_traced_by_structure():
    torch.manual_seed(21)
    model = _Batch().to(F64)
    clear_trace_cache()
    with _CountCalls(_Tracer, "trace") as traces:
        lin = check_against_oracle(model, _batch(5))
        assert isinstance(lin, EngineLinearization)
        check_against_oracle(model, _batch(6), seed=1)  # new tensors, same structure: cached
        assert traces.count == 1
        check_against_oracle(model, _batch(5, mode="id"))  # a string leaf changed: traced again
        check_against_oracle(model, _batch(5, mask=False))  # None where a tensor was
        check_against_oracle(model, (*_batch(5), (torch.tensor(0.25, dtype=F64), None)))
        assert traces.count == 4
    with _CountCalls(_Tracer, "trace") as traces:  # the last structure stays cached
        check_against_oracle(model, (*_batch(4), (torch.tensor(-1.0, dtype=F64), None)), seed=2)
        assert traces.count == 0


class _IsTensorBatch(nn.Module):
    """A dict batch read through ``torch.is_tensor``: fx's stand-ins are not tensors, so the
    trace takes the other branch than eager PyTorch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, batch):
        batch = {k: v * 2 if torch.is_tensor(v) else v for k, v in batch.items()}
        return self.a(batch["x"])


def test_a_container_trace_is_checked_once_against_an_eager_forward():
    from ngtriton.linearize import linearize

    model = _IsTensorBatch().to(F64)
    inputs = ({"x": torch.randn(5, 4, dtype=F64)},)
    clear_trace_cache()
    f, params = oracle(model, inputs)
    # fx's trace is another function (the check finds out); the ATen capture runs the real
    # Python branch, so the build goes there
    torch.testing.assert_close(build_engine(model, inputs).outputs, f(*params))
    with _CountCalls(_Builder, "build") as builds:
        build_engine(model, inputs)  # the cached trace is known wrong: only the capture builds
    assert builds.count == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to whole-model autograd
        lin = linearize(model, inputs, backend="torch")
    torch.testing.assert_close(lin.outputs, f(*params))
    class Counted(_Batch):
        def forward(self, batch, extra, offsets=(0.5, None)):
            self.calls.append(1)  # a deque: a counter or a list would change the trace key
            return super().forward(batch, extra, offsets)

    good = Counted().to(F64)  # traced right: one eager forward at its first build, then none
    good.calls = collections.deque()
    build_engine(good, _batch(5))
    assert len(good.calls) == 2  # the trace and the check
    check_against_oracle(good, _batch(6))
    good.calls.clear()
    assert isinstance(build_engine(good, _batch(7)), EngineLinearization)
    assert len(good.calls) == 0  # cached and checked: no forward of the model at all

    class Noisy(nn.Module):  # samples in forward: the check draws what the build drew
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, batch):
            h = self.a(batch["x"])
            return h + torch.randn_like(h)

    noisy, inputs = Noisy().to(F64), ({"x": torch.randn(5, 4, dtype=F64)},)
    after = []
    for _ in range(2):  # checked, then cached: the generator moves by the build's draws alone
        torch.manual_seed(5)
        assert isinstance(build_engine(noisy, inputs), EngineLinearization)
        after.append(torch.get_rng_state())
    assert torch.equal(*after)


def test_star_args_and_keyword_only_forwards():
    """``*args`` takes the extra inputs as one tuple (it took the first input alone, and the
    output came out with the wrong shape); keyword-only parameters take their defaults."""

    class Star(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x, *rest, scale=2.0, **options):
            return self.a(x) * scale + self.b(rest[0]) + rest[1]

    model = Star().to(F64)
    x, z, c = torch.randn(5, 4, dtype=F64), torch.randn(5, 2, dtype=F64), torch.randn(5, 3,
                                                                                     dtype=F64)
    lin = check_against_oracle(model, (x, z, c))
    assert isinstance(lin, EngineLinearization)


class _NormedBatch(nn.Module):
    """BatchNorm and a constant buffer behind a dict input: the eager check must not disturb
    what the build's per-node autograd steps saved (it restores the buffers in place)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.register_buffer("mix", torch.randn(6, 6))

    def forward(self, batch):
        h = self.bn(self.a(batch["x"]))
        return self.out(torch.tanh(torch.matmul(h, self.mix)))


@pytest.mark.parametrize("train", [True, False])
def test_a_checked_container_trace_keeps_buffers_and_products_intact(train):
    torch.manual_seed(22)
    model = _NormedBatch().to(F64).train(train)
    inputs = ({"x": torch.randn(8, 4, dtype=F64)},)
    clear_trace_cache()
    ref = copy.deepcopy(model)
    twin = copy.deepcopy(model)
    twin.bn.track_running_stats = False  # the same function, without updates torch.func refuses
    f, params = oracle(twin, inputs)
    lin = build_engine(model, inputs)  # the check runs here
    ref(*inputs)  # one forward: the build's own
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buf, rtol=0, atol=0)
    v = tuple(torch.randn_like(p) for p in params)  # products of this very build
    out, jv = jvp(f, params, v)
    u = torch.randn_like(out)
    torch.testing.assert_close(lin.jvp(list(v)), jv)
    for got, want in zip(lin.vjp(u), vjp(f, *params)[1](u)):
        torch.testing.assert_close(got, want)


def test_tensors_in_star_args_are_checked_too():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x, *extra):
            return self.a(x) + (extra[0] if torch.is_tensor(extra[0]) else 0.0)

    model, x, b = Extra().to(F64), torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)
    clear_trace_cache()
    check_against_oracle(model, (x, 2.0))  # a number: the trace is right, and checked
    # the same graph, a tensor: checked again and found wrong, so the ATen capture builds
    check_against_oracle(model, (x, b))
    clear_trace_cache()
    check_against_oracle(model, (x, b))


class _Smoothed(nn.Module):
    """A leaf layer whose forward reassigns its buffer (a running mean), and one with a buffer
    that is an expanded view (no in-place write may touch it)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("mu", torch.zeros(4))
        self.register_buffer("shift", torch.randn(1, 4).expand(5, 4))

    def forward(self, x):
        if self.training:
            self.mu = 0.5 * self.mu + 0.5 * x.detach().mean(0)
        return (x - self.mu + self.shift) @ self.w


def test_the_eager_check_leaves_reassigned_buffers_and_survives_its_own_failures():
    class Outer(nn.Module):
        def __init__(self, retain):
            super().__init__()
            self.inner, self.retain = _Smoothed(), retain

        def forward(self, batch):
            h = self.inner(batch["x"])
            if self.retain:
                h.retain_grad()  # needs a tensor requiring grad: the build (no grad) fails
            return h

    from ngtriton.linearize import AutogradLinearization, linearize

    torch.manual_seed(23)
    x = torch.randn(5, 4, dtype=F64) + 3
    model = Outer(retain=False).to(F64)
    model.inner.shift = torch.randn(1, 4, dtype=F64).expand(5, 4)  # .to() made it contiguous
    ref = copy.deepcopy(model)
    ref({"x": x})  # one forward's update of the running mean
    lin = build_engine(model, ({"x": x},))
    assert isinstance(lin, EngineLinearization)
    torch.testing.assert_close(model.inner.mu, ref.inner.mu, rtol=0, atol=0)
    model = Outer(retain=True).to(F64)
    with pytest.warns(UserWarning, match="retain_grad.*falling back to whole-model autograd"):
        lin = linearize(model, ({"x": x},), backend="torch")
    assert isinstance(lin, AutogradLinearization) and lin.outputs.shape == (5, 4)


class _Ema(nn.Module):
    """A layer (an opaque node) that updates a buffer requiring grad in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ema", torch.zeros(3, dtype=F64, requires_grad=True))

    def forward(self, y):
        with torch.no_grad():
            self.ema.mul_(0.5).add_(y.mean(0), alpha=0.5)
        return y * 2.0


class _KeepsLast(nn.Module):
    """A forward that stores its output in a buffer, before the layer above."""

    def __init__(self):
        super().__init__()
        self.a, self.smooth = nn.Linear(4, 3), _Ema()
        self.register_buffer("last", None)

    def forward(self, x):
        y = self.a(x["x"] if isinstance(x, dict) else x)
        self.last = y.detach()
        return self.smooth(y)


@pytest.mark.parametrize("container", [False, True])
def test_the_trace_and_the_check_leave_buffers_as_the_build_alone_would(container):
    model, x = _KeepsLast().to(F64), torch.randn(5, 4, dtype=F64)
    model(torch.randn(5, 4, dtype=F64))
    last = model.last
    ref = copy.deepcopy(model)
    ref(x)
    clear_trace_cache()
    build_engine(model, ({"x": x},) if container else (x,))
    # The trace left a stand-in in `last`, and the eager check updated `ema` once more: the
    # build runs the opaque layer once (one update) and no Python of the traced forward.
    assert model.last is last
    torch.testing.assert_close(model.smooth.ema, ref.smooth.ema, rtol=0, atol=0)
    copy.deepcopy(model).double()


def test_a_checked_build_keeps_earlier_linearizations_of_the_model_valid():
    torch.manual_seed(24)
    model = _NormedBatch().to(F64)  # train mode: BatchNorm saves its running statistics
    x = torch.randn(8, 4, dtype=F64)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner({"x": x})
    clear_trace_cache()
    first = build_engine(Plain(), (x,))
    u = torch.randn_like(first.outputs)
    before = first.vjp(u)
    build_engine(model, ({"x": x},))  # checked: the eager forward's updates are put back
    for a, b in zip(before, first.vjp(u)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_trace_key_tells_1_from_true():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x, opts):
            return self.a(x) * (2.0 if opts[0] is True else 1.0)

    model, x = Flagged().to(F64), torch.randn(5, 4, dtype=F64)
    clear_trace_cache()
    for flag in (1, True, 1.0):
        check_against_oracle(model, (x, [flag]))


def test_object_input_is_traced_at_every_build():
    """An object fx cannot look into is baked into the trace: never reused from the cache."""

    class Holder:
        def __init__(self, x):
            self.x = x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, holder):
            return self.a(holder.x)

    model = Model().to(F64)
    holder = Holder(torch.randn(5, 4, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx's "not able to add assertion" stays quiet
        check_against_oracle(model, (holder,))
        holder.x = torch.randn(5, 4, dtype=F64)
        check_against_oracle(model, (holder,), seed=1)


def test_linearize_dispatch_uses_engine():
    from ngtriton.linearize import linearize

    model = mlp(nn.Tanh).to(F64)
    lin = linearize(model, (torch.randn(3, 5, dtype=F64),), backend="torch")
    assert isinstance(lin, EngineLinearization)


def test_inputs_the_model_rejects_raise_its_error_without_a_fallback_warning():
    """A wrong input shape fails in the engine and in the fallback alike: the user sees torch's
    own error (with the engine's reason as a note), not a warning about the engine first."""
    from ngtriton.linearize import linearize

    model = mlp(nn.Tanh).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
            linearize(model, (torch.randn(3, 4, dtype=F64),), backend="torch")
    assert any("engine had failed first" in note for note in info.value.__notes__)


class _MutatesSharedValue(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.lin, self.out, self.mode = nn.Linear(4, 6), nn.Linear(6, 3), mode

    def forward(self, x):
        h = self.lin(x)
        if self.mode == "method":
            h.mul_(2)
            return self.out(h)
        a = torch.nn.functional.relu(h, inplace=True)
        return self.out(a + h)


@pytest.mark.parametrize("mode", ["method", "inplace-kwarg"])
def test_visible_in_place_mutation_is_ordered_by_the_aten_capture(mode):
    from ngtriton.linearize import AutogradLinearization

    torch.manual_seed(0)
    model = _MutatesSharedValue(mode).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    # fx's graph cannot hold the mutation; the ATen capture orders it, so the engine builds
    lin = build_engine(model, (x,))
    assert isinstance(lin, EngineLinearization)
    ref = AutogradLinearization(model, (x,))
    v = [torch.randn_like(p) for p in model.parameters()]
    torch.testing.assert_close(lin.outputs, ref.outputs)
    torch.testing.assert_close(lin.jvp(v), ref.jvp(v))
    u = torch.randn_like(ref.outputs)
    for a, b in zip(lin.vjp(u), ref.vjp(u)):
        torch.testing.assert_close(a, b)


class _MutatesThroughAView(nn.Module):
    """An in-place op on a value a view was taken of: the view sees the change in eager
    PyTorch, which a graph evaluated out of place cannot reproduce."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        flat = h.view(-1)
        h.mul_(2)
        return self.out(flat.view(h.shape))


def test_in_place_mutation_seen_through_a_view_is_refused_never_wrong():
    from ngtriton.linearize import AutogradLinearization, linearize

    model = _MutatesThroughAView().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(EngineUnsupported, match="in place"):
        build_engine(model, (x,))
    with pytest.warns(UserWarning, match="in place"):
        lin = linearize(model, (x,), backend="torch")
    ref = AutogradLinearization(model, (x,))
    v = [torch.randn_like(p) for p in model.parameters()]
    torch.testing.assert_close(lin.jvp(v), ref.jvp(v))


def test_inplace_relu_in_sequential_stays_on_the_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    build_engine(model, (x,))  # the mutated value has no other reader: exact out of place


def test_forward_signature_read_like_inspect_for_every_kind_of_forward():
    # The per-class cache must give what inspect.signature(model.forward) gives: plain methods,
    # static/class methods, partials, callable objects and per-instance overrides.
    import functools
    import inspect

    from ngtriton.linearize.engine import _forward_params

    def f(self, x, mask=None):
        return x

    class Call:
        def __call__(self, x, mask=None):
            return x

    class Plain(nn.Module):
        def forward(self, x, mask=None):
            return x

    class Static(nn.Module):
        @staticmethod
        def forward(x, mask=None):
            return x

    class Cls(nn.Module):
        @classmethod
        def forward(cls, x, mask=None):
            return x

    class Partial(nn.Module):
        forward = functools.partial(f, None)

    class Obj(nn.Module):
        forward = Call()

    override = Plain()
    override.forward = lambda y: y
    for m in (Plain(), Plain(), Static(), Cls(), Partial(), Obj(), override):
        want = list(inspect.signature(m.forward).parameters.values())
        assert _forward_params(m) == want


# --------------------------------------------------------------------------------------------
# Modules whose call is not their class's forward, and forwards that read Python attributes
# --------------------------------------------------------------------------------------------

class _Symmetric(nn.Module):
    def forward(self, w):
        return w + w.T


def _with_weight_norm(m):
    m[0] = torch.nn.utils.parametrizations.weight_norm(m[0])


def _with_symmetric_weight(m):
    torch.nn.utils.parametrize.register_parametrization(m[2], "weight", _Symmetric())


def _hook_on_linear(m):
    m[0].register_forward_hook(lambda mod, args, out: out * 3)


def _pre_hook_on_activation(m):
    m[1].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))


def _forward_on_instance(m):
    lin = m[2]
    lin.forward = lambda x: F.linear(x, lin.weight, lin.bias) * 2  # per-instance override


@pytest.mark.parametrize("change", [_with_weight_norm, _with_symmetric_weight, _hook_on_linear,
                                    _pre_hook_on_activation, _forward_on_instance])
def test_parametrized_hooked_and_overridden_modules_are_differentiated_as_they_run(change):
    """A rule would compute the class's forward of the module's own parameters; a module with a
    parametrization, a hook or its own forward runs as an opaque node instead."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 3)).to(F64)
    change(model)
    x = torch.randn(6, 4, dtype=F64)
    lin = check_against_oracle(model, (x,), reverse_only=True)  # weight_norm: no forward AD
    torch.testing.assert_close(lin.outputs, model(x), rtol=0, atol=0)


def test_hooks_on_the_model_itself_or_global_hooks_are_not_traced():
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    handle = model.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(EngineUnsupported, match="Sequential itself has forward hooks"):
        build_engine(model, (x,))
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        with pytest.raises(EngineUnsupported, match="global module forward hooks"):
            build_engine(model, (x,))
    finally:
        handle.remove()
    check_against_oracle(model, (x,))


def test_the_cached_trace_follows_the_attributes_forward_reads():
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
            self.temperature, self.skip = 1.0, False

        def forward(self, x):
            h = torch.tanh(self.a(x))
            z = self.b(h) / self.temperature
            return z + self.b(h * 2) if self.skip else z

    torch.manual_seed(22)
    model = Tempered().to(F64)
    x = torch.randn(6, 4, dtype=F64)
    check_against_oracle(model, (x,))
    model.temperature, model.skip = 4.0, True
    check_against_oracle(model, (x,))
    model.temperature = 0.5
    check_against_oracle(model, (x,))


def test_a_hooked_dropout_is_still_the_identity():
    """A hook (say, logging on every module) makes Dropout an opaque node; it must still be
    the identity, as every dropout is in the linearization, not draw a mask."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(F64)
    model[2].register_forward_hook(lambda mod, args, out: None)
    x = torch.randn(7, 4, dtype=F64)
    without = nn.Sequential(model[0], model[1], model[3])
    lin = check_against_oracle(model, (x,), oracle_model=without)
    v = [torch.randn_like(p) for p in lin.params]
    torch.testing.assert_close(build_engine(model, (x,)).jvp(v), lin.jvp(v), rtol=0, atol=0)


class _Square(torch.autograd.Function):  # no jvp: forward mode would fail on it
    @staticmethod
    def forward(w):
        return w * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return 2 * w * g


class _Shift(nn.Module):  # a user layer without submodules: an opaque node
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, dtype=F64))

    def forward(self, x):
        return x + _Square.apply(self.w)  # d/dx is the cotangent itself: no grad_fn


def test_an_opaque_layer_whose_input_passes_straight_through():
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(3, 4), _Shift(), nn.Linear(4, 2)).to(F64)
    check_against_oracle(model, (torch.randn(5, 3, dtype=F64),), reverse_only=True)
