"""FLOPs in Triton (issue 18): the share of one Fisher-vector product's FLOPs of a GPT-2-small
block that the Triton backend would run in its own kernels, counted.

The block (d = 768, 12 heads, MLP 4d, two LayerNorms, causal SDPA, batch 1, T = 1024, float32)
is linearized on the CPU with ``build_engine(model, (x,), torch_ops_with_vjp())``: the engine
builds the same Steps, with the same ``ops`` call sites, as the Triton backend, only its ``ops``
module holds the torch references the kernels are tested against
(:mod:`ngtriton.linearize.ops_torch`, plus ``attention_vjp`` =
:func:`ngtriton.kernels.attention_reference.attention_vjp_reference`, which ops_torch lacks).
With ``attention_vjp`` in its ops module, ``AttentionStep`` takes the Triton backend's path:
its forward is ``ops.attention_forward`` (not torch's CPU flash kernel) and its VJP
``ops.attention_vjp`` (not torch's SDPA backward through an autograd graph).
One product ``lin.vjp(lin.jvp(v))`` is run under ``torch.utils.flop_counter.FlopCounterMode``
and a second dispatch mode of ours, and every FLOP is attributed to the region that issued it:

* an ``ops`` call (``linear_jvp``, ``linear_jvp_fvp``, ``linear_vjp``, ``layernorm_jvp``,
  ``layernorm_vjp``, ``attention_forward``, ``attention_jvp``, ``attention_vjp``), which the
  Triton backend (:mod:`ngtriton.kernels.ops`) sends to a Triton kernel when its dispatch
  conditions hold;
* the rest of a Step (its own torch code: the residual adds, the GELU's elementwise steps,
  reshapes), by Step type and direction;
* the engine between Steps (cotangent accumulation, the final copies).

Whether an ops call would launch a kernel is decided by running :mod:`ngtriton.kernels.ops`'s
own dispatch code on the recorded arguments, with the kernels and the torch fallbacks replaced
by stubs that only say which one was chosen, and ``can_launch`` answering as on a CUDA device
(same dtype and device for all tensors, float32/float16/bfloat16): scenarios ``cuda-fp32-ieee``
(torch's default fp32 matmul precision), ``cuda-fp32-tf32`` and ``cuda-bf16`` (the floating
arguments cast to bfloat16, ``lse``/``rstd`` kept fp32 as a bf16 model has them). Calls that
fall back count as torch; for ``attention_vjp`` that is a ``None`` return (no kernel: the
step then runs torch's SDPA backward, on a GPU a fused kernel forming the same five products
per score). The attention kernels' head limits (``attention.jvp_head_limit``,
``attention_backward.vjp_head_limit``) answer as on a GPU, their interpreter branch switched
off: fp32 heads up to 64 columns (``ieee``) / 128 (``tf32``), 256 for bf16.

What is counted, and how:

* matmuls (``mm``, ``addmm``, ``bmm``, ...): ``FlopCounterMode`` (2 FLOPs per multiply-add);
  checked against the analytic ``2·rows·in·out`` per Linear matmul;
* everything ``FlopCounterMode`` counts as 0 (it only knows matmuls, convolutions and SDPA):
  elementwise ops are estimated at 1 FLOP per output element (``addcmul``/``addcdiv`` 2;
  ``logsumexp``/softmax 3), reductions at 1 per input element, copies/views/allocations/
  selections (``masked_fill``, ``where``, ``cat``, ``clone``, ...) at 0 (:data:`ELEMENTWISE`);
  ops that match no rule are estimated at 1 FLOP per element and listed as ``unknown``;
* in-place matmuls (``addmm_``, which ops_torch.linear_jvp uses for its second product, and
  ``baddbmm_``/``addbmm_``): ``FlopCounterMode``'s registry has only the out-of-place ops, so
  it counts them as 0; added analytically by its own formula (``2·M·K·N``);
* the attention VJP: the reference's matmuls, counted by ``FlopCounterMode`` (``bmm``) and
  checked against 5 products of 2·D FLOPs per score it forms (recomputed ``s = q kᵀ``,
  ``dp = g vᵀ``, ``dv = pᵀ g``, ``dq = ds k``, ``dk = dsᵀ q``; fewer where ``need`` drops
  one), which over the full score matrix is torch's own count for its SDPA backward
  (``flop_counter.sdpa_backward_flop_count``); its elementwise steps (scale, ``− lse``,
  ``exp``, ``− Δ``, ``⊙ p``: 5 per score) by the estimate above;
* torch's CPU flash-attention backward (``_scaled_dot_product_flash_attention_for_cpu_backward``),
  reached only by an attention step whose ops module has no ``attention_vjp`` (not here),
  which ``FlopCounterMode`` does not count at all (its registry has the CUDA SDPA backwards
  only): added analytically with ``sdpa_backward_flop_count``, plus
  :data:`SDPA_BWD_EW_PER_PAIR` elementwise FLOPs per score.

Attention is reported in two conventions: ``dense`` counts every (query, key) pair of the T×S
score matrix (torch's convention for SDPA, causal mask ignored), ``causal`` only the pairs a
causal mask keeps (T(T+1)/2 per head), which is about what block-skipping GPU kernels (the
Triton JVP and VJP kernels, cuDNN/flash/efficient SDPA backward) execute. The torch
references of the attention JVP and VJP skip the masked keys by chunk of queries, so their
measured count lies between: it is reported as ``measured``; the ``dense`` and ``causal``
columns rescale it (matmuls by the per-score formula, the elementwise part in proportion) to
the stated pair counts.

Result (``flops-cpu-2026-12-07``): with the attention VJP in Triton, every ``ops`` call of
the product launches a kernel in all three scenarios, 99.99 % of the FLOPs (``causal`` and
``dense`` alike; Hugging Face's block 99.988 %, the nanoGPT block 99.998 %). What stays on
torch is elementwise Step code: the residual adds' tangents and the engine's final copies
(1.6 MFLOP), and for Hugging Face's block its GELU (one collapsed ``ElementwiseStep``,
6.3 MFLOP with its VJP).

Run: ``python benchmarks/bench_flops.py [--quick] [--out DIR] [--threads N] [--model M]``
writes ``benchmarks/results/flops-<device>-<date>.{json,md}`` (``--quick``: d = 64, T = 64,
to a temporary folder unless ``--out``); tests/test_bench_flops.py runs the quick path in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
import tempfile
import time
import types
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter as fcm
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from ngtriton.kernels.attention_reference import attention_vjp_reference  # noqa: E402
from ngtriton.linearize import ops_torch  # noqa: E402
from ngtriton.linearize.engine import build_engine  # noqa: E402

# ops functions the Triton backend implements as Triton kernels (kernels/ops.py)
TRITON_OPS = ("linear_jvp", "linear_jvp_fvp", "linear_vjp", "layernorm_jvp", "layernorm_vjp",
              "attention_forward", "attention_jvp", "attention_vjp")
SCENARIOS = (("cuda-fp32-ieee", torch.float32, "ieee"), ("cuda-fp32-tf32", torch.float32, "tf32"),
             ("cuda-bf16", torch.bfloat16, "tf32"))
HEADLINE_SCENARIO = "cuda-fp32-ieee"
CONVENTIONS = ("measured", "dense", "causal")
HEADLINE_CONVENTION = "causal"
TARGET = 0.95
# elementwise FLOPs per score of the flash backward (recomputed p = exp(s − lse): 2; dS = p ⊙
# (dP − Δ): 2; the scale: 1); the matmuls are torch's sdpa_backward_flop_count
SDPA_BWD_EW_PER_PAIR = 5
_CPU_SDPA_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"
_CPU_SDPA_FWD = "_scaled_dot_product_flash_attention_for_cpu"

# FLOPs per element of the elementwise estimate (by aten overload packet name, trailing "_" of
# in-place variants dropped); 0 for data movement, allocation, selection and metadata
_ZERO = frozenset({
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "detach", "alias",
    "as_strided", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze",
    "unbind", "flatten", "unflatten", "view_as", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "narrow", "chunk",
    "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "diagonal",
    "clone", "copy", "_to_copy", "to", "contiguous", "cat", "stack", "zeros", "zeros_like",
    "ones", "ones_like", "new_zeros", "new_ones", "full", "full_like", "new_full", "fill",
    "zero", "arange", "scalar_tensor", "masked_fill", "where", "index", "index_select",
    "slice_scatter", "select_scatter", "as_strided_scatter", "_conj", "resolve_conj",
    "resolve_neg", "lift", "detach_", "set_", "resize_", "_has_compatible_shallow_copy_type",
    "expand_copy", "view_copy", "permute_copy", "transpose_copy", "t_copy", "alias_copy",
    "split_copy", "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy",
    "isneginf", "isinf", "isnan", "gt", "ge", "lt", "le", "eq", "ne", "logical_not",
    "bitwise_not", "promote_types", "result_type"})
_POINTWISE = {
    "add": 1, "sub": 1, "mul": 1, "div": 1, "neg": 1, "exp": 1, "log": 1, "tanh": 1,
    "pow": 1, "sqrt": 1, "rsqrt": 1, "reciprocal": 1, "sigmoid": 1, "relu": 1, "abs": 1,
    "square": 1, "rsub": 1, "gelu": 1, "gelu_backward": 1, "tanh_backward": 1,
    "threshold_backward": 1, "sigmoid_backward": 1, "clamp": 1, "maximum": 1, "minimum": 1,
    "addcmul": 2, "addcdiv": 2, "lerp": 2, "_softmax": 3, "_log_softmax": 3,
    "_softmax_backward_data": 3, "_log_softmax_backward_data": 3}
_REDUCTION = {"sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "logsumexp": 3,
              "var": 2, "std": 2, "norm": 2, "prod": 1, "dot": 2, "vdot": 2}
# matmuls whose in-place variants FlopCounterMode's registry lacks (it has ``addmm``, not
# ``addmm_``): counted as it counts the out-of-place op (2 FLOPs per multiply-add, the added
# ``self`` not counted)
_MATMUL_MISSED: dict[str, Callable[..., int]] = {
    "addmm": lambda s, a, b, *_, **__: 2 * a.shape[0] * a.shape[1] * b.shape[1],
    "baddbmm": lambda s, a, b, *_, **__: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
    "addbmm": lambda s, a, b, *_, **__: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]}
ELEMENTWISE = dict(zero=sorted(_ZERO), pointwise=_POINTWISE, reduction=_REDUCTION)


def torch_ops_with_vjp() -> types.ModuleType:
    """The torch backend's ops plus ``attention_vjp`` (its torch reference): with it,
    ``AttentionStep`` takes the Triton backend's path (forward by ``ops.attention_forward``, VJP
    by ``ops.attention_vjp``) instead of torch's CPU flash kernel and its SDPA backward."""
    mod = types.ModuleType("ops_torch_with_attention_vjp")
    for name in ops_torch.__all__:
        setattr(mod, name, getattr(ops_torch, name))
    mod.attention_vjp = attention_vjp_reference
    mod.__all__ = [*ops_torch.__all__, "attention_vjp"]
    return mod


# --- the models -------------------------------------------------------------------------------

class Block(nn.Module):
    """A GPT-2 block written out (nanoGPT's layout): pre-LN, causal SDPA, tanh-GELU MLP 4d."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class HFBlock(nn.Module):
    """Hugging Face's ``GPT2Block`` (Conv1D layers, NewGELU, SDPA) returning its hidden states."""

    def __init__(self, d: int, heads: int, positions: int) -> None:
        super().__init__()
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        cfg = GPT2Config(n_embd=d, n_head=heads, n_layer=1, n_positions=positions,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg._attn_implementation = "sdpa"
        self.block = GPT2Block(cfg, layer_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out


def build_model(kind: str, d: int, heads: int, T: int) -> nn.Module:
    torch.manual_seed(0)
    model = HFBlock(d, heads, T) if kind == "hf" else Block(d, heads)
    return model.eval()


def sizes(quick: bool) -> tuple[int, int, int]:
    """(d, heads, T): GPT-2 small's block at T = 1024, or a CI-sized one."""
    return (64, 4, 64) if quick else (768, 12, 1024)


# --- counting ---------------------------------------------------------------------------------

def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return max((_numel(y) for y in x), default=0)
    return 0


def _name(func: Any) -> str:
    return func.overloadpacket.__name__


class Elementwise(TorchDispatchMode):
    """What FlopCounterMode leaves at 0: the elementwise estimate, and the CPU SDPA backward
    (analytic). Also tallies every op by name and how it was counted."""

    def __init__(self, meter: Meter) -> None:
        super().__init__()
        self.meter = meter
        self.ew = 0  # elementwise estimate
        self.analytic = 0  # matmul FLOPs added by formula (the CPU SDPA backward)
        self.ops: dict[str, Counter] = defaultdict(Counter)  # how -> op -> calls
        self.op_flops: Counter[str] = Counter()  # op -> our FLOPs (not FlopCounterMode's)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
        if func.overloadpacket in fcm.flop_registry:
            self.ops["flop_counter"][name] += 1
        elif base in _MATMUL_MISSED:
            self.ops["analytic"][name] += 1
            f = _MATMUL_MISSED[base](*args)
            self.analytic += f
            self.op_flops[name] += f
        elif name == _CPU_SDPA_BWD:
            self.ops["analytic"][name] += 1
            self._sdpa_backward(args, kwargs)
        elif base in _ZERO or name in _ZERO:
            self.ops["zero"][name] += 1
        else:
            n_out, n_in = _numel(out), max((_numel(a) for a in args), default=0)
            if base in _REDUCTION:
                f, how = _REDUCTION[base] * n_in, "reduction"
            elif base in _POINTWISE:
                f, how = _POINTWISE[base] * max(n_out, n_in), "pointwise"
            else:
                f, how = max(n_out, n_in), "unknown"
            self.ops[how][name] += 1
            self.op_flops[name] += f
            self.ew += f
        return out

    def _sdpa_backward(self, args, kwargs) -> None:
        # (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask, scale)
        g, q, k, v = args[:4]
        causal = bool(args[7]) if len(args) > 7 else bool(kwargs.get("is_causal", False))
        mm = fcm.sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
        B, H, T, D = q.shape
        S = k.shape[2]
        pairs = B * H * T * S
        self.analytic += mm
        self.ew += SDPA_BWD_EW_PER_PAIR * pairs
        self.op_flops[_CPU_SDPA_BWD] += mm + SDPA_BWD_EW_PER_PAIR * pairs
        self.meter.note(attn=dict(kind="sdpa_vjp", B=B, H=H, T=T, S=S, D=D, causal=causal,
                                  mm_dense=mm, ew_dense=SDPA_BWD_EW_PER_PAIR * pairs))


class Meter:
    """Nested regions; each region's exclusive FLOPs (its own, less its sub-regions')."""

    def __init__(self) -> None:
        self.fc = fcm.FlopCounterMode(display=False)
        self.ew = Elementwise(self)
        self.frames: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def totals(self) -> tuple[int, int, int]:
        return self.fc.get_total_flops(), self.ew.ew, self.ew.analytic

    @contextlib.contextmanager
    def counting(self) -> Iterator[Meter]:
        with self.fc, self.ew, self.region(step="engine", label="", dir="product", op=None):
            yield self

    def note(self, **info: Any) -> None:
        self.frames[-1]["info"].update(info)

    @contextlib.contextmanager
    def region(self, **info: Any) -> Iterator[dict[str, Any]]:
        frame = dict(start=self.totals(), child=[0, 0, 0], info=dict(info))
        self.frames.append(frame)
        try:
            yield frame["info"]
        finally:
            self.frames.pop()
            end = self.totals()
            delta = [e - s for e, s in zip(end, frame["start"])]
            if self.frames:
                parent = self.frames[-1]["child"]
                for i in range(3):
                    parent[i] += delta[i]
            own = [d - c for d, c in zip(delta, frame["child"])]
            self.records.append(dict(frame["info"], mm=own[0] + own[2], ew=own[1],
                                     mm_counter=own[0], mm_analytic=own[2]))

    def in_op(self) -> bool:
        return any(f["info"].get("op") for f in self.frames)


def _linear_expected(name: str, args: tuple) -> int:
    """The analytic matmul FLOPs of a Linear ops call: 2·M·K·N per product it forms."""
    if name in ("linear_jvp", "linear_jvp_fvp"):
        x, x_dot, weight, weight_dot = args[:4]
        n = (x_dot is not None) + (weight_dot is not None)
    else:  # linear_vjp(x, weight, grad_out, dact, need_input, need_weight, need_bias)
        x, weight = args[:2]
        n = bool(args[4]) + bool(args[5])
    M, K = x.shape
    return 2 * M * K * weight.shape[0] * n


def _attention_jvp_info(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Geometry of an attention JVP call, its matmuls per score, and the scores the torch
    reference forms (chunks of queries, keys past a chunk's last query skipped under causal)."""
    from ngtriton.kernels import attention_reference as ar

    q, k, _v, _o, _lse, dq, dk, dv = args[:8]
    causal = bool(kwargs.get("causal", False))
    B, H, T, D = q.shape
    S = k.shape[2]
    # s = q kᵀ; ds = [dq q]·[k dk]ᵀ (D per tangent present); (p ⊙ ds) v; p dv
    per_pair_mm = 2 * D * (1 + (dq is not None) + (dk is not None)
                           + (dq is not None or dk is not None) + (dv is not None))
    ref_pairs = _reference_pairs(q, S, causal, ar._chunk_rows(q, S))
    return dict(kind="jvp", B=B, H=H, T=T, S=S, D=D, causal=causal, per_pair_mm=per_pair_mm,
                ref_pairs=B * H * ref_pairs, expected_mm=per_pair_mm * B * H * ref_pairs)


def _reference_pairs(q: torch.Tensor, S: int, causal: bool, step: int) -> int:
    """Scores per head the chunked torch references form: chunks of ``step`` queries, under
    ``causal`` the keys past a chunk's last query skipped."""
    T = q.shape[2]
    return sum((min(T, r0 + step) - r0) * (min(S, min(T, r0 + step)) if causal else S)
               for r0 in range(0, T, step))


def _attention_vjp_info(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Geometry of an attention VJP call, its matmuls per score (those the reference and the
    FlashAttention-2 kernels form), and the scores the torch reference forms (as the JVP's)."""
    from ngtriton.kernels import attention_reference as ar

    q, k, v, _o, _lse, g = args[:6]
    causal = bool(kwargs.get("causal", False))
    need_q, need_k, need_v = (bool(n) for n in kwargs.get("need", (True, True, True)))
    B, H, T, D = q.shape
    S = k.shape[2]
    # s = q kᵀ (recomputed); dv = pᵀ g; dp = g vᵀ (for ds); dq = ds k; dk = dsᵀ q
    per_pair_mm = 2 * D * (1 + need_v + (need_q or need_k) + need_q + need_k)
    ref_pairs = _reference_pairs(q, S, causal, ar._chunk_rows(q, S))
    # torch's count for its (dense) SDPA backward: the same five products when all are needed
    torch_dense = fcm.sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
    return dict(kind="vjp", B=B, H=H, T=T, S=S, D=D, causal=causal, need=[need_q, need_k, need_v],
                per_pair_mm=per_pair_mm, ref_pairs=B * H * ref_pairs,
                expected_mm=per_pair_mm * B * H * ref_pairs, torch_sdpa_bwd_dense=torch_dense)


def kept_pairs(T: int, S: int, causal: bool) -> int:
    """(query, key) pairs per head that a causal mask keeps (top-left aligned, j ≤ i)."""
    if not causal:
        return T * S
    return sum(min(S, i + 1) for i in range(T))


@contextlib.contextmanager
def instrumented(lin: Any, meter: Meter) -> Iterator[list[dict[str, Any]]]:
    """Wraps every Step's jvp/vjp and the ops module's functions in ``meter`` regions; yields
    the list of ops calls (their arguments kept, for the dispatch decisions)."""
    calls: list[dict[str, Any]] = []
    modules = {id(st.ops): st.ops for st in lin.steps if hasattr(st, "ops")}
    saved: list[tuple[Any, str, Any]] = []

    def wrap_op(name: str, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            if meter.in_op():  # an ops function calling another: the outer call's FLOPs
                return fn(*args, **kwargs)
            with meter.region(op=name) as info:
                info["call"] = len(calls)
                calls.append(dict(op=name, args=args, kwargs=kwargs))
                if name.startswith("linear"):
                    info["expected_mm"] = _linear_expected(name, args)
                elif name == "attention_jvp":
                    info["attn"] = _attention_jvp_info(args, kwargs)
                elif name == "attention_vjp":
                    info["attn"] = _attention_vjp_info(args, kwargs)
                return fn(*args, **kwargs)
        return counted

    for mod in modules.values():
        for name in TRITON_OPS:
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, wrap_op(name, getattr(mod, name)))

    def wrap_step(step: Any, direction: str) -> None:
        fn = getattr(step, direction)

        def counted(*args, **kwargs):
            with meter.region(step=type(step).__name__, label=getattr(step, "label", ""),
                              dir=direction, op=None):
                return fn(*args, **kwargs)
        setattr(step, direction, counted)

    for st in lin.steps:
        wrap_step(st, "jvp")
        wrap_step(st, "vjp")
    try:
        yield calls
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        for st in lin.steps:
            for direction in ("jvp", "vjp"):
                st.__dict__.pop(direction, None)


# --- dispatch decisions -----------------------------------------------------------------------

class _Chosen(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _stub(what: str, **extra: Any) -> types.ModuleType:
    mod = types.ModuleType(f"stub_{what}")

    def chosen(*args, **kwargs):
        raise _Chosen(what)
    for name in (*TRITON_OPS, "attention_forward_reference", "attention_jvp_reference",
                 "attention_vjp_reference", "categorical_fvp", "bernoulli_fvp"):
        setattr(mod, name, chosen)
    for k, v in extra.items():
        setattr(mod, k, v)
    return mod


def _cuda_can_launch(*tensors: torch.Tensor | None,
                     dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """``kernels._config.can_launch`` as on a CUDA device: one dtype among ``dtypes`` (default
    fp32/fp16/bf16, the kernels' on a GPU), one device."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return False
    allowed = (torch.float32, torch.float16, torch.bfloat16) if dtypes is None else dtypes
    dtype, device = ts[0].dtype, ts[0].device
    return dtype in allowed and all(t.dtype == dtype and t.device == device for t in ts)


def _real_attention() -> types.ModuleType | None:
    """The Triton attention module (None without triton), imported before any patching."""
    try:
        import ngtriton.kernels.attention as real
    except ImportError:
        return None
    return real


def _real_attention_backward() -> types.ModuleType | None:
    """The Triton attention-VJP module (None without triton), imported before any patching."""
    try:
        import ngtriton.kernels.attention_backward as real
    except ImportError:
        return None
    return real


def _head_limit(real: types.ModuleType | None, dtype: torch.dtype, precision: str,
                fn: str = "jvp_head_limit") -> int:
    """kernels.attention.jvp_head_limit (``fn="vjp_head_limit"``: kernels.attention_backward's)
    on a GPU (its interpreter branch switched off)."""
    if real is None:  # no triton: the same rule, from its docstring
        return 256 if dtype != torch.float32 else (64 if precision == "ieee" else 128)
    saved = real.INTERPRET
    real.INTERPRET = False
    try:
        return getattr(real, fn)(dtype, precision)
    finally:
        real.INTERPRET = saved


def _head_block(D: int) -> int:
    return max(16, 1 << max(D - 1, 0).bit_length())


def _cast(name: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """The call's floating tensors in ``dtype``; ``lse`` and ``rstd`` (fp32 statistics in a
    half-precision model) kept as they are."""
    keep = {"attention_jvp": (4,), "attention_vjp": (4,), "layernorm_jvp": (1,),
            "layernorm_vjp": (1,)}.get(name, ())

    def cast(i, a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in keep:
            return a.to(dtype)
        return a
    return tuple(cast(i, a) for i, a in enumerate(args)), {
        k: cast(-1, v) if k != "mask" or v is None or v.is_floating_point() else v
        for k, v in kwargs.items()}


def decide(call: dict[str, Any], dtype: torch.dtype, precision: str) -> str:
    """``"triton"`` or ``"torch"``: what kernels/ops.py's dispatch picks for this call on a
    CUDA device, with ``dtype`` operands and fp32 matmul ``precision``. ``attention_vjp``
    returning ``None`` (no kernel) is ``"torch"``: the step then runs torch's SDPA backward."""
    import ngtriton.kernels as K
    from ngtriton.kernels import _config
    from ngtriton.kernels import attention_reference as real_ar
    from ngtriton.kernels import ops as kops

    name = call["op"]
    args, kwargs = call["args"], call["kwargs"]
    if dtype != torch.float32:
        args, kwargs = _cast(name, args, kwargs, dtype)
    real, real_bwd = _real_attention(), _real_attention_backward()
    fake_attention = _stub("triton", jvp_head_limit=lambda dt, p: _head_limit(real, dt, p),
                           head_block=_head_block)
    fake_backward = _stub("triton", head_block=_head_block, vjp_head_limit=lambda dt, p:
                          _head_limit(real_bwd, dt, p, "vjp_head_limit"))
    fake_ar = _stub("torch", shapes_ok=real_ar.shapes_ok)
    patches = [(K, "linear", _stub("triton")), (K, "layernorm", _stub("triton")),
               (K, "attention", fake_attention), (K, "attention_backward", fake_backward),
               (K, "attention_reference", fake_ar),
               (K, "output", _stub("triton")), (kops, "_ref", _stub("torch")),
               (kops, "can_launch", _cuda_can_launch)]
    saved = [(obj, attr, getattr(obj, attr, None)) for obj, attr, _ in patches]
    saved_precision = _config._matmul_precision
    for obj, attr, new in patches:
        setattr(obj, attr, new)
    _config.set_matmul_precision(precision)
    try:
        returned = getattr(kops, name)(*args, **kwargs)
    except _Chosen as chosen:
        return chosen.what
    finally:
        for obj, attr, old in saved:
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        _config._matmul_precision = saved_precision
    if name == "attention_vjp" and returned is None:  # no kernel: torch's SDPA backward
        return "torch"
    raise RuntimeError(f"{name}: the dispatch chose neither a kernel nor the reference")


# --- one model --------------------------------------------------------------------------------

def flops_of(rec: dict[str, Any], convention: str) -> tuple[float, float]:
    """(matmul, elementwise) FLOPs of a region record in ``convention``."""
    attn = rec.get("attn")
    if attn is None or convention == "measured":
        return rec["mm"], rec["ew"]
    B, H, T, S = attn["B"], attn["H"], attn["T"], attn["S"]
    pairs = B * H * (kept_pairs(T, S, attn["causal"]) if convention == "causal" else T * S)
    if attn["kind"] in ("jvp", "vjp"):  # rescale the reference's scores to the convention's
        mm_attn = attn["per_pair_mm"] * pairs
        ratio = pairs / attn["ref_pairs"]
        return rec["mm"] - attn["expected_mm"] + mm_attn, rec["ew"] * ratio
    dense = B * H * T * S  # sdpa_vjp: the analytic dense count, scaled to the pairs
    ratio = pairs / dense
    return (rec["mm"] - attn["mm_dense"] + attn["mm_dense"] * ratio,
            rec["ew"] - attn["ew_dense"] + attn["ew_dense"] * ratio)


def measure(kind: str, quick: bool) -> dict[str, Any]:
    d, heads, T = sizes(quick)
    model = build_model(kind, d, heads, T)
    x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    lin = build_engine(model, (x,), torch_ops_with_vjp())
    build_s = time.perf_counter() - t0
    if not hasattr(lin, "steps"):
        raise RuntimeError(f"the engine fell back to {type(lin).__name__}")
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g) for p in lin.params]
    meter = Meter()
    t0 = time.perf_counter()
    with instrumented(lin, meter) as calls, meter.counting():
        out = lin.vjp(lin.jvp(v))
    product_s = time.perf_counter() - t0
    assert len(out) == len(lin.params)
    decisions = {s: [decide(c, dt_, p) for c in calls] for s, dt_, p in SCENARIOS}
    regions = []
    for rec in meter.records:
        r = {k: v for k, v in rec.items() if k not in ("call",)}
        if rec.get("op"):
            r["decisions"] = {s: decisions[s][rec["call"]] for s in decisions}
        regions.append(r)
    _attach_parents(meter.records, regions)
    steps = Counter(type(st).__name__ for st in lin.steps)
    attn_steps = [st for st in lin.steps if type(st).__name__ == "AttentionStep"]
    # the VJP went through ops.attention_vjp (no torch graph built) in every attention step
    vjp_via_ops = all(st.graph_out is None for st in attn_steps)
    return dict(
        model=kind, d=d, heads=heads, T=T, batch=1, dtype="float32",
        params=sum(p.numel() for p in lin.params), steps=dict(steps),
        fallbacks=list(getattr(lin, "fallbacks", [])),
        attention=[dict(causal=st.causal, mask=st.mask is not None) for st in attn_steps],
        attention_vjp_via_ops=vjp_via_ops,
        build_s=round(build_s, 3), product_s=round(product_s, 3), regions=regions,
        flop_counter_by_op={str(k): v for k, v in meter.fc.get_flop_counts()["Global"].items()},
        estimated_by_op=dict(meter.ew.op_flops.most_common()),
        ops_by_method={how: dict(c.most_common()) for how, c in meter.ew.ops.items()},
        summary=summarize(regions))


def _attach_parents(records: list[dict], regions: list[dict]) -> None:
    """Each ops region gets its Step's type, label and direction (records are appended when a
    region closes, so an ops call's Step is the next step record after it)."""
    for i, r in enumerate(regions):
        if r.get("op"):
            parent = next((p for p in regions[i + 1:] if p.get("step")), None)
            r["step"] = parent["step"] if parent else "engine"
            r["label"] = parent.get("label", "") if parent else ""
            r["dir"] = parent.get("dir", "") if parent else ""


def bucket(r: dict[str, Any]) -> str:
    """Breakdown key: ``Step type.direction[: ops function]``."""
    key = f"{r['step']}.{r['dir']}"
    return f"{key}: {r['op']}" if r.get("op") else key


def summarize(regions: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for conv in CONVENTIONS:
        per: dict[str, Any] = {}
        total = sum(sum(flops_of(r, conv)) for r in regions)
        for s, *_ in SCENARIOS:
            tri = sum(sum(flops_of(r, conv)) for r in regions
                      if r.get("op") and r["decisions"][s] == "triton")
            eligible = sum(sum(flops_of(r, conv)) for r in regions if r.get("op"))
            per[s] = dict(triton=tri, share=tri / total if total else 0.0)
        buckets: dict[str, dict[str, Any]] = {}
        for r in regions:
            mm, ew = flops_of(r, conv)
            b = buckets.setdefault(bucket(r), dict(mm=0, ew=0, calls=0, decisions=Counter()))
            b["mm"] += mm
            b["ew"] += ew
            b["calls"] += 1
            if r.get("op"):
                b["decisions"][r["decisions"][HEADLINE_SCENARIO]] += 1
        for b in buckets.values():
            b["flops"] = b["mm"] + b["ew"]
            b["share"] = b["flops"] / total if total else 0.0
            b["decisions"] = dict(b["decisions"])
        out[conv] = dict(total=total, in_ops_calls=eligible,
                         matmul=sum(flops_of(r, conv)[0] for r in regions),
                         elementwise=sum(flops_of(r, conv)[1] for r in regions),
                         scenarios=per, buckets=dict(sorted(
                             buckets.items(), key=lambda kv: -kv[1]["flops"])),
                         to_target=to_target(regions, conv, total))
    return out


def to_target(regions: list[dict[str, Any]], conv: str, total: float) -> dict[str, Any]:
    """The torch-side buckets (headline scenario), largest first, and the share after moving
    each into Triton in turn, until the target is reached."""
    torch_side: Counter[str] = Counter()
    tri = 0.0
    for r in regions:
        f = sum(flops_of(r, conv))
        if r.get("op") and r["decisions"][HEADLINE_SCENARIO] == "triton":
            tri += f
        elif f:
            torch_side[bucket(r)] += f
    moves, share = [], tri / total if total else 0.0
    for key, f in torch_side.most_common():
        if share >= TARGET:
            break
        tri += f
        share = tri / total
        moves.append(dict(bucket=key, flops=f, share_after=share))
    return dict(reached=share >= TARGET, moves=moves, torch_side=dict(torch_side.most_common()))


# --- checks, report ---------------------------------------------------------------------------

def checks(result: dict[str, Any]) -> dict[str, Any]:
    """Consistency: FlopCounterMode's Linear counts equal the analytic ones, the attention
    JVP and VJP references' equal their per-score formulas (the VJP's, over the full score
    matrix, also torch's count for its SDPA backward), the buckets sum to the total."""
    lin_ok = all(r["mm"] == r["expected_mm"] for r in result["regions"]
                 if r.get("op", "") and r["op"].startswith("linear"))
    attn_ok = all(r["mm"] == r["attn"]["expected_mm"] for r in result["regions"]
                  if r.get("op") == "attention_jvp")
    vjps = [r for r in result["regions"] if r.get("op") == "attention_vjp"]
    vjp_ok = bool(vjps) and all(
        r["mm"] == r["attn"]["expected_mm"]
        and (not all(r["attn"]["need"]) or r["attn"]["per_pair_mm"] * r["attn"]["B"]
             * r["attn"]["H"] * r["attn"]["T"] * r["attn"]["S"]
             == r["attn"]["torch_sdpa_bwd_dense"]) for r in vjps)
    sums_ok = all(math.isclose(sum(b["flops"] for b in s["buckets"].values()), s["total"],
                               rel_tol=1e-9) for s in result["summary"].values())
    return dict(linear_matmuls_match_analytic=lin_ok, attention_jvp_matches_formula=attn_ok,
                attention_vjp_matches_formula=vjp_ok, buckets_sum_to_total=sums_ok)


def _g(f: float) -> str:
    return f"{f / 1e9:.3f}"


def render(report: dict[str, Any]) -> str:
    lines = ["# FLOPs of one Fisher-vector product in Triton kernels (issue 18)", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["machine"].items()]
    lines += [f"- **target**: {TARGET:.0%} of the product's FLOPs in Triton kernels; headline "
              f"scenario `{HEADLINE_SCENARIO}`, attention convention `{HEADLINE_CONVENTION}`",
              "", "Product: `lin.vjp(lin.jvp(v))` of the block's linearization (the Triton "
              "backend's Steps and ops call sites, the torch references inside: "
              "`ops_torch` plus `attention_vjp_reference` as `ops.attention_vjp`). GFLOP = 1e9 "
              "FLOPs; a multiply-add is 2 FLOPs. See the module "
              "docstring of benchmarks/bench_flops.py for what is counted and how.", ""]
    for res in report["results"]:
        if "error" in res:
            lines += [f"## {res['model']}: error", "", res["error"], ""]
            continue
        lines += [f"## {res['model']} block: d={res['d']}, heads={res['heads']}, T={res['T']}, "
                  f"batch 1, fp32 ({res['params']:,} parameters)", "",
                  f"Steps: {', '.join(f'{k} ×{v}' for k, v in res['steps'].items())}; "
                  f"per-node fallbacks: {res['fallbacks'] or 'none'}; attention: "
                  f"{res['attention']}, VJP through `ops.attention_vjp`: "
                  f"{res.get('attention_vjp_via_ops', False)}; product {res['product_s']} s on "
                  "the CPU (counting on).", "",
                  "| attention convention | total GFLOP | matmul | elementwise | "
                  + " | ".join(f"share in Triton, {s}" for s, *_ in SCENARIOS) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(SCENARIOS)]
        for conv, s in res["summary"].items():
            lines.append(f"| {conv} | {_g(s['total'])} | {_g(s['matmul'])} | "
                         f"{_g(s['elementwise'])} | "
                         + " | ".join(f"{s['scenarios'][n]['share']:.3%}"
                                      for n, *_ in SCENARIOS) + " |")
        head = res["summary"][HEADLINE_CONVENTION]
        share = head["scenarios"][HEADLINE_SCENARIO]["share"]
        dense_share = res["summary"]["dense"]["scenarios"][HEADLINE_SCENARIO]["share"]
        missed = {k: res["estimated_by_op"].get(k, 0)
                  for k in res["ops_by_method"].get("analytic", {})}
        lines += ["", f"**Share in Triton kernels: {share:.3%}** (`{HEADLINE_CONVENTION}`, "
                  f"`{HEADLINE_SCENARIO}`; {dense_share:.3%} with `dense` attention): the "
                  f"{TARGET:.0%} target is {'met' if share >= TARGET else 'not met'}. "
                  "FLOPs FlopCounterMode did not count, added analytically: "
                  + ", ".join(f"`{k}` {_g(v)} GFLOP" + (" (dense)" if "attention" in k else "")
                              for k, v in missed.items())
                  + "."]
        lines += ["", f"Breakdown (`{HEADLINE_CONVENTION}`; Triton = the `{HEADLINE_SCENARIO}`"
                  " dispatch launches a kernel for these calls):", "",
                  "| Step.direction: ops call | calls | GFLOP | matmul | elementwise | share "
                  "| runs in |", "|---|---:|---:|---:|---:|---:|---|"]
        for key, b in head["buckets"].items():
            if not b["flops"]:
                continue
            where = (", ".join(f"{k} ×{v}" for k, v in b["decisions"].items())
                     if b["decisions"] else "torch")
            lines.append(f"| {key} | {b['calls']} | {_g(b['flops'])} | {_g(b['mm'])} | "
                         f"{_g(b['ew'])} | {b['share']:.2%} | {where} |")
        tt = head["to_target"]
        left = ", ".join(f"`{k}` {v / 1e6:.3f} MFLOP" for k, v in tt["torch_side"].items())
        lines += ["", f"Left on torch (`{HEADLINE_CONVENTION}`, `{HEADLINE_SCENARIO}`): "
                  f"{left or 'nothing'}.", "",
                  f"To reach {TARGET:.0%} (`{HEADLINE_CONVENTION}`, "
                  f"`{HEADLINE_SCENARIO}`): "
                  + ("already reached." if not tt["moves"] else
                     "; ".join(f"move `{m['bucket']}` ({_g(m['flops'])} GFLOP) → "
                               f"{m['share_after']:.2%}" for m in tt["moves"])
                     + ("" if tt["reached"] else " (not reached even then)")), ""]
        dense = res["summary"]["dense"]["to_target"]
        lines += ["Same with `dense` attention: "
                  + ("already reached." if not dense["moves"] else
                     "; ".join(f"move `{m['bucket']}` ({_g(m['flops'])} GFLOP) → "
                               f"{m['share_after']:.2%}" for m in dense["moves"])), ""]
        unknown = res["ops_by_method"].get("unknown", {})
        lines += [f"Checks: {res['checks']}. Ops FlopCounterMode counted: "
                  f"{res['ops_by_method'].get('flop_counter', {})}; added analytically: "
                  f"{res['ops_by_method'].get('analytic', {})}; ops without an estimate rule "
                  f"(1 FLOP/element): {unknown or 'none'}.", ""]
    return "\n".join(lines) + "\n"


def collect(quick: bool, models: tuple[str, ...] = ("hf", "nano")) -> list[dict[str, Any]]:
    results = []
    for kind in models:
        try:
            res = measure(kind, quick)
        except ImportError as e:  # transformers missing: the hand-written block still runs
            results.append(dict(model=kind, error=f"{type(e).__name__}: {e}"))
            continue
        res["checks"] = checks(res)
        head = res["summary"][HEADLINE_CONVENTION]
        print(f"  [{kind}] T={res['T']} total {_g(head['total'])} GFLOP ({HEADLINE_CONVENTION}), "
              + ", ".join(f"{c}: {res['summary'][c]['scenarios'][HEADLINE_SCENARIO]['share']:.2%}"
                          for c in CONVENTIONS)
              + f" in Triton ({HEADLINE_SCENARIO}); checks {res['checks']}", flush=True)
        results.append(res)
    return results


def write(results: list[dict[str, Any]], out: Path) -> Path:
    from run import device_tag, machine, results_stem

    tag = device_tag() if torch.cuda.is_available() else "cpu"
    report = dict(machine=machine(), device_tag=tag, target=TARGET,
                  headline=dict(scenario=HEADLINE_SCENARIO, convention=HEADLINE_CONVENTION),
                  elementwise_rules=ELEMENTWISE, sdpa_bwd_ew_per_pair=SDPA_BWD_EW_PER_PAIR,
                  results=results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"flops-{results_stem(tag, dt.date.today())}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(report))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d = 64, T = 64 (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temporary one for "
                        "--quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--model", choices=("hf", "nano", "both"), default="both",
                   help="Hugging Face's GPT2Block, the hand-written block, or both")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (Path(tempfile.mkdtemp(prefix="flops_")) if args.quick
                       else HERE / "results")
    models = ("hf", "nano") if args.model == "both" else (args.model,)
    path = write(collect(args.quick, models), out)
    print(f"wrote {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
