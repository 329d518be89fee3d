"""Mixed precision: products of a model run under ``torch.autocast`` (bf16 on the CPU).

The bf16 products are compared with the fp32 ones at the same parameters; the bound is the one
``docs/mixed_precision.md`` documents (measured there per model). The outputs of every product,
the output Fisher and NGD's solve stay in fp32; a forward recorded under autocast is reused by a
build under the same autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngtriton.optim.step as step_module
from ngtriton import FisherOperator
from ngtriton.linearize import ForwardRecord, linearize
from ngtriton.optim import NGD

BF16 = torch.bfloat16
BOUND = 2e-2  # relative error of a bf16 product against the fp32 one (smooth models)
KINK_BOUND = 1e-1  # ReLU / max-pool: units whose pre-activation rounds across the kink switch


class Block(nn.Module):
    """A nanoGPT block: causal self-attention through F.scaled_dot_product_attention, MLP."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, block: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.block, self.ln, self.head = Block(d), nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.block(x))).view(-1, self.vocab)


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    """A model, its inputs and class targets (fp32)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 10))
        return model, (torch.randn(32, 20, generator=g),), torch.randint(0, 10, (32,), generator=g)
    if name == "mlp_relu":
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 10))
        return model, (torch.randn(32, 20, generator=g),), torch.randint(0, 10, (32,), generator=g)
    if name == "gpt":
        return (TinyGPT(), (torch.randint(0, 50, (4, 16), generator=g),),
                torch.randint(0, 50, (64,), generator=g))
    if name == "encoder":
        model = nn.Sequential(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
            nn.Flatten(), nn.Linear(32 * 8, 10))
        return model, (torch.randn(8, 8, 32, generator=g),), torch.randint(0, 10, (8,), generator=g)
    act, pool = (nn.GELU, nn.AvgPool2d) if name == "cnn" else (nn.ReLU, nn.MaxPool2d)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), pool(2),
                          nn.Conv2d(8, 16, 3), act(), nn.Flatten(), nn.Linear(16 * 2 * 2, 10))
    return model, (torch.randn(16, 3, 8, 8, generator=g),), torch.randint(0, 10, (16,), generator=g)


SMOOTH = ["mlp", "gpt", "encoder", "cnn"]
KINKED = ["mlp_relu", "cnn_relu"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def errors(name: str, backend: str = "torch", dtype: torch.dtype = BF16, seed: int = 0
           ) -> dict[str, float]:
    """Relative errors of the low-precision F v, J v and Jᵀ w against fp32 (one random v, w)."""
    model, inputs, y = make(name, seed)
    ref = FisherOperator(model, inputs, targets=y, backend=backend)
    low = FisherOperator(model, inputs, targets=y, backend=backend, autocast=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    v = torch.randn(ref.num_params, generator=g)
    w = torch.randn(ref.outputs.shape, generator=g)
    fv, jv, jtw = low.fisher_matvec(v), low.jvp(v), low.vjp(w)
    for t in (fv, jv, jtw, low.outputs, low.gradient()):
        assert t.dtype == torch.float32
    assert low.linearization.outputs.dtype == torch.float32
    return {"Fv": rel(fv, ref.fisher_matvec(v)), "Jv": rel(jv, ref.jvp(v)),
            "JTw": rel(jtw, ref.vjp(w))}


@pytest.mark.parametrize("backend", ["torch", "autograd"])
@pytest.mark.parametrize("name", SMOOTH)
def test_bf16_products_are_close_to_fp32(name, backend):
    errs = errors(name, backend)
    assert max(errs.values()) < BOUND, errs
    assert max(errs.values()) > 0  # the products did run in bf16


@pytest.mark.parametrize("name", KINKED)
def test_bf16_products_with_kinks_are_close_to_fp32(name):
    errs = errors(name)
    assert max(errs.values()) < KINK_BOUND, errs


def test_fp16_products_are_close_to_fp32():
    try:
        errs = errors("mlp", dtype=torch.float16)
    except (RuntimeError, NotImplementedError) as err:  # an op without a CPU half kernel
        pytest.skip(f"fp16 autocast on the CPU: {err}")
    assert max(errs.values()) < 1e-2, errs


@pytest.mark.parametrize("name", ["mlp", "encoder", "cnn"])
def test_engine_runs_under_autocast_without_fallbacks(name):
    model, inputs, _ = make(name)
    lin = linearize(model, inputs, "torch", autocast=BF16)
    assert lin.autocast == BF16 and lin.fallbacks == []
    assert lin.outputs.dtype == torch.float32
    tangents = [torch.randn_like(p) for p in lin.params]
    assert lin.jvp(tangents).dtype == torch.float32
    assert all(g.dtype == p.dtype for g, p in zip(lin.vjp(torch.ones_like(lin.outputs)),
                                                  lin.params))


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_fp32_products_are_unchanged_when_autocast_is_off(name):
    model, inputs, y = make(name)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    before = FisherOperator(model, inputs, targets=y).fisher_matvec(v)
    FisherOperator(model, inputs, targets=y, autocast=BF16).fisher_matvec(v)  # caches a capture
    after = FisherOperator(model, inputs, targets=y).fisher_matvec(v)
    off = FisherOperator(model, inputs, targets=y, autocast=False).fisher_matvec(v)
    assert torch.equal(before, after) and torch.equal(before, off)
    with torch.autocast("cpu", dtype=BF16):  # False: full precision inside an autocast block
        inside = FisherOperator(model, inputs, targets=y, autocast=False)
        assert inside.autocast is None
        assert torch.equal(inside.fisher_matvec(v), before)


def test_ambient_autocast_is_followed():
    model, inputs, y = make("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    explicit = FisherOperator(model, inputs, targets=y, autocast=BF16)
    with torch.autocast("cpu", dtype=BF16):
        ambient = FisherOperator(model, inputs, targets=y)
    assert ambient.autocast == BF16
    assert torch.equal(ambient.fisher_matvec(v), explicit.fisher_matvec(v))
    with torch.autocast("cpu", dtype=BF16):  # products keep the build's precision anywhere
        assert torch.equal(FisherOperator(model, inputs, targets=y).fisher_matvec(v),
                           explicit.fisher_matvec(v))


@pytest.mark.parametrize("value", [True, "bf16", 3, torch.float32, torch.int8])
def test_bad_autocast_is_named(value):
    model, inputs, y = make("mlp")
    with pytest.raises((TypeError, ValueError), match="autocast"):
        FisherOperator(model, inputs, targets=y, autocast=value)
    with pytest.raises((TypeError, ValueError), match="autocast"):
        linearize(model, inputs, autocast=value)


@pytest.fixture
def lookups(monkeypatch):
    """The results of every ForwardRecord.lookup (True: a hit)."""
    found: list[bool] = []
    original = ForwardRecord.lookup

    def lookup(self, module, x):
        out = original(self, module, x)
        found.append(out is not None)
        return out

    monkeypatch.setattr(ForwardRecord, "lookup", lookup)
    return found


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_record_hits_under_the_same_autocast(name, lookups):
    model, inputs, y = make(name)
    with ForwardRecord(model) as record, torch.autocast("cpu", dtype=BF16):
        F.cross_entropy(model(*inputs), y).backward()
    recorded = FisherOperator(model, inputs, targets=y, autocast=BF16, record=record)
    assert sum(lookups) >= 3, lookups  # Linear, activations, convolutions, BatchNorm
    lookups.clear()
    fresh = FisherOperator(model, inputs, targets=y, autocast=BF16)
    v = torch.randn(recorded.num_params)
    torch.testing.assert_close(recorded.fisher_matvec(v), fresh.fisher_matvec(v),
                               rtol=1e-5, atol=1e-6)
    FisherOperator(model, inputs, targets=y, record=record)  # fp32 build: another precision
    assert not any(lookups)


def test_ngd_follows_an_autocast_closure(lookups, monkeypatch):
    model, (x,), y = make("mlp")
    opt = NGD(model, lr=0.5, damping=1e-2)
    seen: list[tuple] = []
    solve = step_module.solve

    def watched(op, g, **kw):
        seen.append((op.autocast, g.dtype, op.damped_matvec(g).dtype))
        return solve(op, g, **kw)

    monkeypatch.setattr(step_module, "solve", watched)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert seen and all(s == (BF16, torch.float32, torch.float32) for s in seen), seen
    assert any(lookups)  # the closure's bf16 forward was reused by the build
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_ngd_without_autocast_builds_in_full_precision(monkeypatch):
    model, (x,), y = make("mlp")
    opt = NGD(model, lr=0.5, damping=1e-2)
    seen = []
    solve = step_module.solve
    monkeypatch.setattr(step_module, "solve",
                        lambda op, g, **kw: seen.append(op.autocast) or solve(op, g, **kw))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=BF16, enabled=False):
        opt.step(closure)
    assert seen == [None]


def test_natural_gradient_takes_autocast():
    from ngtriton import natural_gradient

    model, (x,), y = make("mlp")
    ref = natural_gradient(model, x, y, damping=0.1)
    # bf16 products are symmetric and consistent to ~1e-3 only: tol 1e-6 is out of reach
    low = natural_gradient(model, x, y, damping=0.1, autocast=BF16, on_unconverged="ignore")
    assert all(t.dtype == torch.float32 for t in low)
    assert rel(torch.cat([t.flatten() for t in low]), torch.cat([t.flatten() for t in ref])) < BOUND


def test_rms_norm_under_bf16_matches_the_autograd_fallback():
    """RMSNorm's statistics and default ε are fp32's under autocast, as torch's own."""
    from ngtriton.linearize import linearize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.SiLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    full = linearize(model, (x,), backend="torch")
    low = linearize(model, (x,), backend="torch", autocast=torch.bfloat16)
    fallback = linearize(model, (x,), backend="autograd", autocast=torch.bfloat16)
    v = [torch.randn_like(p) for p in full.params]
    want = full.jvp(v)

    def rel(a):
        return float((a - want).norm() / want.norm())

    assert low.fallbacks == []
    assert rel(low.jvp(v)) < 2e-2 and rel(low.jvp(v)) < 2 * rel(fallback.jvp(v)) + 1e-3


def test_ngd_takes_a_loss_on_the_upcast_logits():
    """``loss_fn(logits.float(), y)`` under autocast is the loss of the model's outputs (an
    exact upcast): NGD accepts it; a real cast down is still refused."""
    model, (x,), y = make("mlp")
    loss_fn = nn.CrossEntropyLoss()
    opt = NGD(model, loss=loss_fn, lr=0.5, damping=1e-2)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(3)]
    assert losses[-1] < losses[0], losses

    def down():
        opt.zero_grad()
        loss = loss_fn(model(x).to(BF16).float(), y)  # a rounding in between: another loss
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="loss: its input is not the model's output"):
        opt.step(down)


def test_a_float64_model_stays_float64_under_autocast():
    """Autocast leaves float64 ops alone: so does the linearization."""
    from ngtriton.linearize import linearize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    low = linearize(model, (x,), backend="torch", autocast=torch.bfloat16)
    full = linearize(model, (x,), backend="torch")
    v = [torch.randn_like(p) for p in full.params]
    assert torch.equal(low.jvp(v), full.jvp(v))
