"""``F v`` with the output-Fisher product fused into the last Linear's JVP epilogue.

On the Triton backend, an exact categorical/bernoulli Fisher whose outputs come straight out of a
Linear (+ activation) runs ``F_R/N`` inside that layer's JVP kernel; everything else keeps the
separate output kernel. Both must agree with the torch backend.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngtriton import FisherOperator
from ngtriton.demo import make_mlp
from ngtriton.kernels import linear as k_linear
from ngtriton.kernels import output as k_output
from ngtriton.kernels import triton_available
from ngtriton.linearize.engine import build_engine
from ngtriton.linearize.rules import OutputEpilogue

needs_triton = pytest.mark.skipif(not triton_available(),
                                  reason="needs triton (CUDA or interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: (2e-4, 2e-5), torch.float16: (3e-2, 3e-3), torch.bfloat16: (6e-2, 1e-2)}
WIDTH = {"categorical": 10, "bernoulli": 7}


def close(a, b, dtype):
    rtol, atol = TOL[dtype]
    scale = b.float().abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * max(scale, 1.0))


def spy(monkeypatch, forbid_separate: bool) -> dict[str, int]:
    """Count the fused kernel's launches; with ``forbid_separate`` the separate output-Fisher
    kernels raise (patch before building the operator: it looks them up when built)."""
    calls: dict[str, int] = {}
    for mod, name in [(k_linear, "linear_jvp_fvp"), (k_output, "categorical_fvp"),
                      (k_output, "bernoulli_fvp")]:
        orig = getattr(mod, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            if forbid_separate and _name != "linear_jvp_fvp":
                raise AssertionError(f"the separate {_name} kernel ran")
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)
    return calls


def operators(model, x, likelihood, **kw):
    ref = FisherOperator(model, x, likelihood, backend="torch", **kw)
    return ref, FisherOperator(model, x, likelihood, backend="triton", **kw)


def direction(op, dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(op.num_params, generator=gen) / 4).to(DEVICE, dtype)


@needs_triton
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU], ids=lambda a: a.__name__)
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_product_matches_torch(dtype, likelihood, act, monkeypatch):
    calls = spy(monkeypatch, forbid_separate=True)
    model = make_mlp((12, 16, 16, WIDTH[likelihood]), seed=1, activation=act).to(DEVICE, dtype)
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    ref, op = operators(model, x, likelihood, damping=1e-3)
    v = direction(op, dtype)
    close(op @ v, ref @ v, dtype)
    close(op.matvec(2 * v), ref.matvec(2 * v), dtype)
    assert calls == {"linear_jvp_fvp": 2}


@needs_triton
@pytest.mark.parametrize("likelihood,last", [("bernoulli", nn.Sigmoid), ("categorical", nn.Tanh)])
def test_activation_after_the_last_linear_is_fused_too(likelihood, last, monkeypatch):
    """σ′ of the final activation and F_R both go into the epilogue."""
    calls = spy(monkeypatch, forbid_separate=True)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), last()).to(DEVICE)
    x = torch.randn(9, 6, device=DEVICE)
    ref, op = operators(model, x, likelihood)
    v = direction(op, torch.float32)
    close(op @ v, ref @ v, torch.float32)
    assert calls == {"linear_jvp_fvp": 1}


@needs_triton
def test_sequence_outputs_fuse_over_flattened_rows(monkeypatch):
    """Outputs (B, T, C) from a Linear on (B, T, K): rows are the flattened leading dims."""
    calls = spy(monkeypatch, forbid_separate=True)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 7)).to(DEVICE)
    x = torch.randn(3, 5, 4, device=DEVICE)
    ref, op = operators(model, x, "categorical")
    v = direction(op, torch.float32)
    close(op @ v, ref @ v, torch.float32)
    assert calls == {"linear_jvp_fvp": 1}


@needs_triton
def test_categorical_wider_than_a_tile_uses_the_separate_kernel(monkeypatch):
    calls = spy(monkeypatch, forbid_separate=False)
    m = k_linear.FVP_MAX_N + 44
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, m)).to(DEVICE)
    x = torch.randn(4, 5, device=DEVICE)
    ref, op = operators(model, x, "categorical")
    v = direction(op, torch.float32)
    close(op @ v, ref @ v, torch.float32)
    assert calls == {"categorical_fvp": 1}


class Doubled(nn.Module):
    """Outputs from a scale, not a Linear: nothing to fuse into."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))

    def forward(self, x):
        return self.body(x) * 2.0


@needs_triton
@pytest.mark.parametrize("case", ["empirical", "mc", "gaussian", "not-a-linear", "layernorm"])
def test_not_fused_where_it_does_not_apply(case, monkeypatch):
    calls = spy(monkeypatch, forbid_separate=False)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).to(DEVICE)
    if case == "not-a-linear":
        model = Doubled().to(DEVICE)
    elif case == "layernorm":
        model.append(nn.LayerNorm(5).to(DEVICE))
    x = torch.randn(9, 6, device=DEVICE)
    y = torch.randint(0, 5, (9,), device=DEVICE)
    likelihood, kw = "categorical", dict(targets=y)
    if case in ("empirical", "mc"):
        kw["fisher"] = case
    elif case == "gaussian":
        likelihood, kw = "gaussian", {}
    # the same sampled labels on both backends (fisher="mc")
    ref, op = (FisherOperator(model, x, likelihood, backend=b, **kw,
                              generator=torch.Generator(DEVICE).manual_seed(0))
               for b in ("torch", "triton"))
    v = direction(op, torch.float32)
    close(op @ v, ref @ v, torch.float32)
    assert "linear_jvp_fvp" not in calls
    separate = case in ("not-a-linear", "layernorm")
    assert calls == ({"categorical_fvp": 1} if separate else {}), calls


def test_engine_epilogue_interface():
    """EngineLinearization.jvp(tangents, epilogue) on the torch ops: ``scale · F_R (J v)``."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    lin = build_engine(model, (x,))
    p = torch.softmax(lin.outputs, -1)
    tangents = [torch.randn_like(q) for q in lin.params]
    epi = OutputEpilogue("categorical", p, 0.2)
    assert lin.accepts_epilogue(epi)
    u = lin.jvp(tangents)
    want = (p * u - p * (p * u).sum(-1, keepdim=True)) * 0.2
    torch.testing.assert_close(lin.jvp(tangents, epi), want, rtol=1e-12, atol=1e-12)
    wrong = OutputEpilogue("categorical", p[:-1], 1.0)  # not one state row per output row
    assert not lin.accepts_epilogue(wrong)
    with pytest.raises(ValueError, match="epilogue"):
        lin.jvp(tangents, wrong)
    doubled = build_engine(Doubled().double(), (torch.randn(5, 6, dtype=torch.float64),))
    assert not doubled.accepts_epilogue(OutputEpilogue("bernoulli", torch.rand(5, 5), 1.0))
