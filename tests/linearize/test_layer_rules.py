"""The layer rules beyond Linear and LayerNorm, each against torch.func in float64.

Convolutions (geometry, groups, frozen parts), batch norm in both regimes, max pooling,
scaled-dot-product attention (causal, masks, partial activity), softmax, matmul, powers and the
transposed-weight Linear (``addmm``/``mm``): every one must be exact, and none may fall back.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_engine import check_against_oracle
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ngtriton.linearize import linearize
from ngtriton.linearize.engine import build_engine

F64 = torch.float64


def exact_without_fallback(model, inputs, **kw):
    with sdpa_kernel(SDPBackend.MATH):  # the oracle's forward-mode AD needs the math backend
        lin = check_against_oracle(model, inputs, **kw)
    assert lin.fallbacks == [], lin.fallbacks
    return lin


@pytest.mark.parametrize("conv", [
    dict(stride=1, padding=1), dict(stride=2, padding=0), dict(padding="same", dilation=2),
    dict(padding="valid", groups=2), dict(stride=(2, 1), padding=(1, 0), bias=False),
])
def test_conv2d_module_geometries(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, **conv), nn.Tanh(), nn.Conv2d(4, 4, 3, **conv),
                          nn.Flatten(), nn.LazyLinear(3)).to(F64)
    x = torch.randn(3, 2, 9, 8, dtype=F64)
    model(x)  # materialise the lazy layer
    exact_without_fallback(model, x)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims):
    torch.manual_seed(1)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    model = nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), conv(3, 2, 2, stride=2),
                          nn.Flatten()).to(F64)
    x = torch.randn(2, 2, *(6,) * dims, dtype=F64)
    exact_without_fallback(model, x)


def test_frozen_conv_parts_and_a_functional_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1)
            self.w = nn.Parameter(torch.randn(3, 3, 1, 1))

        def forward(self, x):
            return F.conv2d(torch.tanh(self.a(x)), self.w, stride=1).flatten(1)

    torch.manual_seed(2)
    model = Net().to(F64)
    model.a.weight.requires_grad_(False)  # only the bias of the first conv is trainable
    exact_without_fallback(model, torch.randn(2, 2, 5, 5, dtype=F64))


@pytest.mark.parametrize("mode", ["train", "eval", "no-running-stats", "no-affine",
                                  "frozen-affine"])
@pytest.mark.parametrize("dims", [1, 2])
def test_batch_norm_both_regimes(mode, dims):
    torch.manual_seed(3)
    conv, bn = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d))[dims - 1]
    norm = bn(4, affine=mode != "no-affine", track_running_stats=mode != "no-running-stats")
    model = nn.Sequential(conv(2, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3)).to(F64)
    x = torch.randn(4, 2, *(5,) * dims, dtype=F64)
    model(x)
    if mode == "frozen-affine":
        norm.requires_grad_(False)
    with torch.no_grad():  # running statistics away from the batch's
        if norm.running_mean is not None:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    model.train(mode != "eval")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lin = linearize(model, (x,), backend="torch")  # keeps the buffers, as NGD's builds do
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    exact_without_fallback(model, x, oracle_model=_without_statistics_updates(model))
    torch.testing.assert_close(lin.outputs, model(x) if mode != "eval" else lin.outputs)


def _without_statistics_updates(model):
    """The same function for torch.func (which refuses the in-place statistics update): in
    train mode batch norm normalises by the batch alone, so the running statistics can go."""
    if not model.training:
        return model
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return twin


def test_batch_norm_on_features_and_the_functional_form():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w, self.b = nn.Linear(3, 5), nn.Parameter(torch.rand(5) + 0.5), \
                nn.Parameter(torch.randn(5))

        def forward(self, x):
            return F.batch_norm(self.a(x), None, None, self.w, self.b, training=True)

    torch.manual_seed(4)
    exact_without_fallback(Net().to(F64), torch.randn(6, 3, dtype=F64))
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh()).to(F64)
    exact_without_fallback(model, torch.randn(6, 3, dtype=F64),
                           oracle_model=_without_statistics_updates(model))


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1),
                                  nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2),
                                  nn.AdaptiveAvgPool2d(2)])
def test_pooling(pool):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), pool, nn.Flatten()).to(F64)
    exact_without_fallback(model, torch.randn(2, 2, 7, 7, dtype=F64))


class _Attention(nn.Module):
    def __init__(self, d=8, heads=2, causal=False, frozen_kv=False):
        super().__init__()
        self.q, self.kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.heads, self.causal = heads, causal
        if frozen_kv:
            self.kv.requires_grad_(False)

    def forward(self, x, mask=None):
        b, t, d = x.shape
        split = (b, t, self.heads, d // self.heads)
        q = self.q(x).view(split).transpose(1, 2)
        k, v = (h.reshape(split).transpose(1, 2) for h in self.kv(x).chunk(2, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return o.transpose(1, 2).reshape(b, t, d)


@pytest.mark.parametrize("case", ["plain", "causal", "bool-padding", "float-mask", "frozen-kv"])
def test_scaled_dot_product_attention(case):
    torch.manual_seed(6)
    model = _Attention(causal=case == "causal", frozen_kv=case == "frozen-kv").to(F64)
    x = torch.randn(2, 5, 8, dtype=F64)
    mask = None
    if case == "bool-padding":
        mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        mask[0, ..., 3:] = False
    elif case == "float-mask":
        mask = torch.randn(1, 2, 5, 5, dtype=F64)
    inputs = (x,) if mask is None else (x, mask)
    lin = exact_without_fallback(model, inputs)
    assert any(type(s).__name__ == "AttentionStep" for s in lin.steps)


def test_eager_attention_products_softmax_and_powers():
    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            s = torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) / 6 ** 0.5
            h = torch.bmm(F.softmax(s, dim=-1), self.v(x))
            return 0.5 * h * (1 + torch.tanh(h + 0.04 * h ** 3)) + h.pow(2)

    torch.manual_seed(7)
    exact_without_fallback(Eager().to(F64), torch.randn(3, 4, 6, dtype=F64))


def test_addmm_and_mm_take_the_weight_transposed():
    class Conv1D(nn.Module):  # Hugging Face's GPT-2 layer: weight stored (in, out)
        def __init__(self, n_in, n_out, bias=True):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
            self.bias = nn.Parameter(torch.randn(n_out)) if bias else None

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None \
                else torch.mm(flat, self.weight)
            return out.view(*x.shape[:-1], -1)

    torch.manual_seed(8)
    model = nn.Sequential(Conv1D(4, 6), nn.Tanh(), Conv1D(6, 3, bias=False)).to(F64)
    # user layers without submodules are opaque in fx: traced as functions here instead
    lin = build_engine(model, (torch.randn(2, 5, 4, dtype=F64),))
    assert len(lin.fallbacks) == 2
    with sdpa_kernel(SDPBackend.MATH):
        from ngtriton.linearize.capture import capture
        cap = capture(model, (torch.randn(2, 5, 4, dtype=F64),))
    assert any("addmm" in str(n.target) for n in cap.graph.nodes)


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_module_and_function(affine):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm = nn.Linear(4, 6), nn.RMSNorm(6, elementwise_affine=affine)
            self.w = nn.Parameter(torch.rand(2, 3) + 0.5)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            h = F.silu(self.norm(self.a(x)))
            h = F.rms_norm(h.view(*h.shape[:-1], 2, 3), (2, 3), self.w, eps=1e-5)
            return self.b(h.flatten(-2))

    torch.manual_seed(9)
    exact_without_fallback(Net().to(F64), torch.randn(3, 5, 4, dtype=F64))


class _ConvAttention(nn.Module):
    """q, k, v from a 1×1 convolution, as diffusion UNets build them: stride(-1) is the
    sequence length, not 1 (torch's CPU flash kernel must not see them so)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Conv1d(16, 48, 1)

    def forward(self, x):
        b, n = x.shape[0], x.shape[2]
        q, k, v = self.qkv(x).view(b, 3, 2, 8, n).transpose(-1, -2).unbind(1)
        return F.scaled_dot_product_attention(q, k, v).flatten(1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_attention_on_operands_strided_in_their_last_dim(dtype):
    torch.manual_seed(10)
    model, x = _ConvAttention().to(dtype), torch.randn(4, 16, 10, dtype=dtype)
    lin = linearize(model, (x,), backend="torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(lin.outputs, model(x), rtol=tol, atol=tol)
    if dtype == F64:
        exact_without_fallback(model, x)


def test_every_new_graph_is_checked_against_the_eager_forward(monkeypatch):
    """A rule that went wrong in its forward is caught at the graph's first build: the model
    falls back to whole-model autograd, with a warning, instead of a silent wrong answer."""
    from ngtriton.linearize import attention as attention_rule
    from ngtriton.linearize.trace import clear_trace_cache

    real = attention_rule._cpu_flash

    def broken(*args, **kwargs):
        found = real(*args, **kwargs)
        return None if found is None else (found[0] * 2, found[1])  # a wrong output

    monkeypatch.setattr(attention_rule, "_cpu_flash", broken)
    torch.manual_seed(11)
    model, x = _Attention().to(F64), torch.randn(2, 5, 8, dtype=F64)
    clear_trace_cache(model)
    with pytest.warns(UserWarning, match="another function than the model"):
        lin = linearize(model, (x,), backend="torch")
    torch.testing.assert_close(lin.outputs, model(x))
