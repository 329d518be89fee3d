"""Counting one product's FLOPs for ``bench_flops.py``: FlopCounterMode for the matmuls, an
elementwise estimate for the rest, and regions per Step and per ops call (see that module's
docstring for what is counted and how)."""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import flop_counter as fcm
from torch.utils._python_dispatch import TorchDispatchMode

# ops functions the Triton backend implements as Triton kernels (kernels/ops.py)
TRITON_OPS = ("linear_jvp", "linear_jvp_fvp", "linear_vjp", "layernorm_jvp", "layernorm_vjp",
              "attention_forward", "attention_jvp", "attention_vjp")
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
