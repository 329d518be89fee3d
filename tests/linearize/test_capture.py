"""The ATen capture (torch.export) and the models it must bring onto the engine.

Each model is checked against torch.func in float64 (outputs, J v, Jᵀ u), builds with no
whole-model fallback, and with no per-node fallback where every op has a rule. The capture's
own contract (caching, refusals, side effects, the record) is in ``test_capture_contract.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_engine import check_against_oracle
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ngtriton.linearize import linearize
from ngtriton.linearize.capture import capture, clear_capture_cache

F64 = torch.float64


class Logits(nn.Module):
    """The oracle's view of a model returning a ModelOutput: its logits."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, *inputs):
        return self.m(*inputs).logits


def exact(model, inputs, oracle_model=None, fallbacks=(), rtol=1e-9, atol=1e-10,
          reverse_only=False):
    """Exact against torch.func, through the engine (no whole-model fallback warning).
    ``reverse_only``: J v from the dense reverse-mode Jacobian, for models with an embedding's
    ``padding_idx`` (torch's forward mode moves its row, its reverse mode does not; the
    engine follows reverse mode, the gradient's convention)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*falling back to whole-model autograd")
        lin = linearize(model, inputs, backend="torch")
    assert lin.fallbacks == list(fallbacks) or set(
        f.split()[0] for f in lin.fallbacks) <= set(fallbacks), lin.fallbacks
    with sdpa_kernel(SDPBackend.MATH):
        check_against_oracle(model, inputs, oracle_model=oracle_model, rtol=rtol, atol=atol,
                             reverse_only=reverse_only)
    return lin


# -- Hugging Face ------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def test_gpt2_with_padding_in_train_mode():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=12,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(F64).eval()
    ids = torch.randint(0, 23, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    exact(model, (ids, None, mask), Logits(model))
    model.train()  # dropout in the model: the linearization is of the network without it
    lin = linearize(model, (ids, None, mask), backend="torch")
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(lin.outputs, model(ids, None, mask).logits)


def test_gpt2s_gelu_chain_becomes_one_op_with_a_rule():
    """``gelu_new`` is ten elementwise ATen ops; the capture makes it the tanh-GELU op."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=23, n_positions=12,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(F64).eval()
    ids = torch.randint(0, 23, (2, 7))
    clear_capture_cache()
    targets = [str(n.target) for n in capture(model, (ids,)).graph.nodes]
    assert "aten.gelu.default" in targets
    assert not any("tanh" in t or "pow" in t for t in targets)
    exact(model, (ids,), Logits(model), reverse_only=True)


def test_bert_classification_with_a_padding_mask():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                  intermediate_size=24, vocab_size=31,
                                  max_position_embeddings=16, num_labels=3)
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(cfg).to(F64).eval()
    ids = torch.randint(0, 31, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    exact(model, (ids, mask), Logits(model), reverse_only=True)  # pad_token_id 0


def test_vit_image_classification():
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                 intermediate_size=24, image_size=8, patch_size=4, num_labels=3)
    torch.manual_seed(2)
    model = transformers.ViTForImageClassification(cfg).to(F64).eval()
    exact(model, (torch.randn(2, 3, 8, 8, dtype=F64),), Logits(model))


# -- torch.nn's own attention layers -----------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_with_key_padding(norm_first):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True,
                                                    norm_first=norm_first)
            self.head = nn.Linear(8, 3)

        def forward(self, x, pad):
            return self.head(self.layer(x, src_key_padding_mask=pad))

    torch.manual_seed(3)  # train mode: eval's fast path has no forward AD for the oracle
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    exact(Encoder().to(F64), (torch.randn(2, 5, 8, dtype=F64), pad))


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention(need_weights):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)[0]

    torch.manual_seed(4)
    exact(Net().to(F64), (torch.randn(2, 5, 8, dtype=F64),))


# -- nanoGPT, ResNet ---------------------------------------------------------------------------

class NanoGPT(nn.Module):
    """nanoGPT's shape: positions from ``idx.size()``, causal SDPA, GELU MLP, tied head."""

    def __init__(self, vocab=11, d=16, heads=2, layers=2, block=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
            ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d)))
            for _ in range(layers))
        self.ln, self.head, self.heads = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False), heads
        self.head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.size()
        if t > self.wpe.num_embeddings:  # control flow on a size: fx cannot trace this
            raise ValueError("sequence too long")
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(x.size(-1), dim=2)
            q, k, v = (h.view(b, t, self.heads, -1).transpose(1, 2) for h in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).contiguous().view(b, t, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(self.ln(x))


def test_nanogpt():
    torch.manual_seed(5)
    lin = exact(NanoGPT().to(F64), (torch.randint(0, 11, (2, 6)),))
    assert sum(type(s).__name__ == "AttentionStep" for s in lin.steps) == 2


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """torchvision's ResNet layout at a small width (the stem, max pooling, two stages)."""

    def __init__(self, width=4, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("train", [True, False])
def test_resnet(train):
    import copy

    torch.manual_seed(6)
    model = ResNet().to(F64).train(train)
    x = torch.randn(3, 3, 16, 16, dtype=F64)
    oracle = copy.deepcopy(model)
    if train:  # torch.func refuses the statistics update; batch statistics need none
        for m in oracle.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean = m.running_var = m.num_batches_tracked = None
    exact(model, (x,), oracle)


def test_batch_norm_in_train_mode_through_the_capture():
    class Net(nn.Module):  # fx cannot trace the size test: the ATen capture takes it
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.out = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            if x.size(0) > 100:
                raise ValueError("batch too large")
            return self.out(F.relu(self.bn(self.c(x))).flatten(1))

    import copy

    torch.manual_seed(7)
    model = Net().to(F64).train()
    x = torch.randn(5, 3, 6, 6, dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oracle = copy.deepcopy(model)
    oracle.bn.running_mean = oracle.bn.running_var = oracle.bn.num_batches_tracked = None
    lin = linearize(model, (x,), backend="torch")
    for k, v in model.state_dict().items():  # linearize() keeps the running statistics
        assert torch.equal(v, before[k]), k
    assert any(type(s).__name__ == "BatchNormStep" for s in lin.steps)
    exact(model, (x,), oracle)


class _Fp32Island(nn.Module):
    """An fp32 stretch inside a lower- or higher-precision model (Hugging Face's RMSNorm and
    eager attention do this): tangents and cotangents must follow the dtype changes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] > 100:  # fx cannot trace this: the ATen capture takes it
            return x
        h = self.a(x)
        r = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (h * r).to(x.dtype)
        g = self.b(x)
        p = torch.softmax(h @ g.transpose(-1, -2), -1, dtype=torch.float32).to(x.dtype)
        return self.c(p @ g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64])
def test_dtype_changes_inside_the_model(dtype):
    from ngtriton.linearize import AutogradLinearization

    torch.manual_seed(8)
    model = _Fp32Island().to(dtype)
    x = torch.randn(2, 5, 4, dtype=dtype)
    lin = linearize(model, (x,), backend="torch")
    ref = AutogradLinearization(model, (x,))
    v = [torch.randn_like(p) for p in lin.params]
    u = torch.randn_like(ref.outputs)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.jvp(v).float(), ref.jvp(v).float(), **tol)
    for got, want in zip(lin.vjp(u), ref.vjp(u)):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)
