"""The Triton engine's whole product against the torch backend (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngtriton import FisherOperator, solve
from ngtriton.kernels import layernorm as k_layernorm
from ngtriton.kernels import linear as k_linear
from ngtriton.kernels import output as k_output
from ngtriton.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (CUDA or interpreter)")

ACTIVATIONS = [nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid, nn.SiLU]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: (2e-4, 2e-5), torch.float16: (3e-2, 3e-3), torch.bfloat16: (6e-2, 1e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mlp(act, layernorm: bool, m: int, dtype) -> nn.Module:
    layers = [nn.Linear(12, 16), act(), nn.Linear(16, 16)]
    if layernorm:
        layers.append(nn.LayerNorm(16))
    layers += [act(), nn.Linear(16, m)]
    return nn.Sequential(*layers).to(DEVICE, dtype)


def counting(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def close(a, b, dtype):
    rtol, atol = TOL[dtype]
    scale = b.float().abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
def test_triton_product_matches_torch_backend(act, layernorm, dtype, monkeypatch):
    torch.manual_seed(0)
    model = mlp(act, layernorm, 5, dtype)
    x = torch.randn(20, 12, device=DEVICE, dtype=dtype)
    y = torch.randint(0, 5, (20,), device=DEVICE)
    calls: dict[str, int] = {}
    for mod, name in [(k_linear, "linear_jvp"), (k_linear, "linear_vjp"),
                      (k_layernorm, "layernorm_jvp"), (k_layernorm, "layernorm_vjp"),
                      (k_linear, "linear_jvp_fvp"), (k_output, "categorical_fvp")]:
        counting(monkeypatch, mod, name, calls)
    ref = FisherOperator(model, x, targets=y, backend="torch")
    assert not calls  # the torch backend never touches the kernels
    op = FisherOperator(model, x, targets=y, backend="triton")
    v = torch.randn(op.num_params, device=DEVICE, dtype=dtype) / 4
    close(op @ v, ref @ v, dtype)
    close(op.gradient(), ref.gradient(), dtype)
    u = torch.randn(op.num_rows, device=DEVICE, dtype=dtype)
    close(op.factor_matvec(v), ref.factor_matvec(v), dtype)
    close(op.factor_rmatvec(u), ref.factor_rmatvec(u), dtype)
    # F v: the output-Fisher product runs in the last Linear's JVP epilogue, no separate kernel
    expected = {"linear_jvp", "linear_vjp", "linear_jvp_fvp"}
    if layernorm:
        expected |= {"layernorm_jvp", "layernorm_vjp"}
    assert expected <= set(calls) and "categorical_fvp" not in calls, calls


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_triton_other_likelihoods_and_a_solve(likelihood):
    torch.manual_seed(1)
    model = mlp(nn.Tanh, False, 3, torch.float32)
    x = torch.randn(16, 12, device=DEVICE)
    y = torch.rand(16, 3, device=DEVICE).round()
    kw = dict(targets=y, damping=1e-2)
    ref = FisherOperator(model, x, likelihood, backend="torch", **kw)
    op = FisherOperator(model, x, likelihood, backend="triton", **kw)
    for method in ("cg", "lsmr"):
        a = solve(op, method=method, tol=0.0, maxiter=8, on_unconverged="ignore")
        b = solve(ref, method=method, tol=0.0, maxiter=8, on_unconverged="ignore")
        close(a.x, b.x, torch.float32)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_triton_batched_factor_products_run_vmapped_through_torch(likelihood, monkeypatch):
    """A V and Aᵀ U on the Triton backend: one vmapped pass through the engine's torch ops (no
    Triton kernel, no column loop), equal to the torch backend's; the operator is unchanged
    afterwards and its single products go back to the kernels."""
    torch.manual_seed(3)
    model = mlp(nn.Tanh, True, 4 if likelihood == "categorical" else 1, torch.float32)
    x = torch.randn(10, 12, device=DEVICE)
    ref = FisherOperator(model, x, likelihood, backend="torch")
    op = FisherOperator(model, x, likelihood, backend="triton")
    V = torch.randn(op.num_params, 7, device=DEVICE)
    U = torch.randn(op.num_rows, 5, device=DEVICE)
    calls: dict[str, int] = {}
    for mod, name in [(k_linear, "linear_jvp"), (k_linear, "linear_vjp"),
                      (k_layernorm, "layernorm_jvp"), (k_output, "categorical_factor_t")]:
        counting(monkeypatch, mod, name, calls)
    close(op.factor_matmat(V), ref.factor_matmat(V), torch.float32)
    close(op.factor_rmatmat(U), ref.factor_rmatmat(U), torch.float32)
    assert calls == {}
    lin, kernels = op.linearization, op._kernels
    close(op.factor_matvec(V[:, 0]), ref.factor_matvec(V[:, 0]), torch.float32)
    assert calls.get("linear_jvp", 0) > 0
    assert op.linearization is lin and op._kernels is kernels
    direct = solve(op, op.fisher_matvec(V[:, 1]), method="dual-direct")
    close(direct.x, solve(ref, ref.fisher_matvec(V[:, 1]), method="dual-direct").x,
          torch.float32)


class _TinyAttention(nn.Module):
    """Embedding, causal SDPA over projections, LayerNorm and a head: every attention kernel."""

    def __init__(self, vocab=11, d=16, heads=2):
        super().__init__()
        self.emb, self.qkv, self.ln = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.LayerNorm(d)
        self.head, self.heads = nn.Linear(d, vocab), heads

    def forward(self, idx):
        x = self.emb(idx)
        b, t, d = x.shape
        q, k, v = (h.view(b, t, self.heads, -1).transpose(1, 2)
                   for h in self.qkv(x).split(d, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(self.ln(x + y.transpose(1, 2).reshape(b, t, d))).flatten(0, 1)


def test_attention_runs_its_forward_jvp_and_vjp_kernels(monkeypatch):
    from ngtriton.kernels import attention as k_attention
    from ngtriton.kernels import attention_backward as k_attention_backward

    torch.manual_seed(1)
    model = _TinyAttention().to(DEVICE)
    idx = torch.randint(0, 11, (3, 9), device=DEVICE)
    y = torch.randint(0, 11, (27,), device=DEVICE)
    calls: dict[str, int] = {}
    for mod, name in [(k_attention, "attention_forward"), (k_attention, "attention_jvp"),
                      (k_attention_backward, "attention_vjp")]:
        counting(monkeypatch, mod, name, calls)
    ref = FisherOperator(model, idx, targets=y, backend="torch")
    assert not calls
    op = FisherOperator(model, idx, targets=y, backend="triton")
    v = torch.randn(op.num_params, device=DEVICE) / 4
    close(op @ v, ref @ v, torch.float32)
    close(op.gradient(), ref.gradient(), torch.float32)
    assert set(calls) == {"attention_forward", "attention_jvp", "attention_vjp"}, calls


def test_autocast_products_run_in_the_kernels(monkeypatch):
    """Under fp16 autocast (bf16 on CUDA) the Linear and attention products take the kernels,
    in that precision, and agree with the torch backend under the same autocast."""
    low = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bf16
    torch.manual_seed(2)
    model = _TinyAttention().to(DEVICE)
    idx = torch.randint(0, 11, (3, 9), device=DEVICE)
    y = torch.randint(0, 11, (27,), device=DEVICE)
    calls: dict[str, int] = {}
    seen: set[torch.dtype] = set()
    original = k_linear.linear_jvp

    def jvp(x, *args, **kwargs):
        seen.add(x.dtype)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(k_linear, "linear_jvp", jvp)
    counting(monkeypatch, k_linear, "linear_vjp", calls)
    ref = FisherOperator(model, idx, targets=y, backend="torch", autocast=low)
    op = FisherOperator(model, idx, targets=y, backend="triton", autocast=low)
    v = torch.randn(op.num_params, device=DEVICE) / 4
    got, want = op @ v, ref @ v
    assert got.dtype == torch.float32  # the solver's side stays fp32
    close(got, want, torch.float16)
    assert seen == {low} and calls.get("linear_vjp", 0) > 0, (seen, calls)
