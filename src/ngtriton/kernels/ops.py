"""Triton backend of the linearization primitives: drop-in for :mod:`ngtriton.linearize.ops_torch`.

Same functions, same signatures, same results (to floating-point tolerance). Each call goes to the
Triton kernels when its inputs allow it:

- triton importable and runnable (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
- all tensors on one device with one dtype among float32 / float16 / bfloat16 (no bfloat16 in the
  interpreter);
- 2-D activations (1-D parameter vectors); LayerNorm rows with unit feature stride and at most
  ``MAX_BLOCK_D`` features; every tensor's strided span (its last addressed element, not its
  element count: a transposed or sliced view reaches further) below 2³¹, as the kernels' offsets
  are 32-bit;

and to the torch reference otherwise. float64 deliberately stays on torch: Triton's fp64
``tl.dot`` runs on the FMA path, no faster than cuBLAS DGEMM, and float64 is the precision of the
reference checks, where the reference implementation itself is what we want. The kernel modules
are imported on first use, so importing this module needs no triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as _ref
from ._config import can_launch, offsets_fit

__all__ = ["attention_forward", "attention_jvp", "attention_vjp", "layernorm_jvp",
           "layernorm_vjp", "linear_jvp", "linear_jvp_fvp", "linear_vjp"]

_MAX_BLOCK_D = 16384  # == layernorm.MAX_BLOCK_D (kept here so dispatch needs no triton import)
_FVP_MAX_N = 256  # == linear.FVP_MAX_N: widest categorical row fused into the JVP epilogue


def _small(*ts: Tensor | None) -> bool:
    """32-bit offsets reach every element of each tensor, through its strides."""
    return offsets_fit(*ts)


def _dims(ts: tuple[Tensor | None, ...], ndims: tuple[int, ...]) -> bool:
    return all(t is None or t.dim() == d for t, d in zip(ts, ndims))


def _unit_rows(*ts: Tensor | None) -> bool:
    return all(t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 for t in ts)


def _shape(t: Tensor | None, shape: tuple[int, ...]) -> bool:
    return t is None or tuple(t.shape) == shape


def _linear_shapes(x: Tensor, weight: Tensor, *rest: Tensor | None) -> bool:
    (M, K), (N, K2) = x.shape, weight.shape
    x_dot, weight_dot, bias_dot, *outs = rest
    return (K == K2 and _shape(x_dot, (M, K)) and _shape(weight_dot, (N, K))
            and _shape(bias_dot, (N,)) and all(_shape(t, (M, N)) for t in outs))


def _ln_shapes(xhat: Tensor, rows: tuple[Tensor | None, ...], vecs: tuple[Tensor | None, ...]
               ) -> bool:
    D = xhat.shape[-1]
    return (all(_shape(t, tuple(xhat.shape)) for t in rows)
            and all(_shape(t, (D,)) for t in vecs))


def linear_jvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
               bias_dot: Tensor | None, dact: Tensor | None) -> Tensor:
    """Tangent of ``σ(x Wᵀ + b)``: ``σ′ ⊙ (ẋ Wᵀ + x Ẇᵀ + ḃ)`` (one fused kernel)."""
    ts = (x, x_dot, weight, weight_dot, bias_dot, dact)
    if (_dims(ts, (2, 2, 2, 2, 1, 2)) and _small(*ts) and can_launch(*ts)
            and _linear_shapes(x, weight, x_dot, weight_dot, bias_dot, dact)):
        from . import linear

        return linear.linear_jvp(x, x_dot, weight, weight_dot, bias_dot, dact)
    return _ref.linear_jvp(x, x_dot, weight, weight_dot, bias_dot, dact)


def linear_jvp_fvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
                   bias_dot: Tensor | None, dact: Tensor | None, state: Tensor, kind: str,
                   scale: float) -> Tensor:
    """``scale · F_R ẏ`` per row of the Linear tangent ``ẏ`` (see :func:`linear_jvp`).

    ``kind``/``state``: ``"categorical"`` with probabilities p or ``"bernoulli"`` with s, (M, N).
    One kernel (the output-Fisher product in the JVP's epilogue) when the inputs allow it and,
    for categorical, ``N ≤ 256``; otherwise :func:`linear_jvp` then the separate row kernel.
    """
    if kind not in ("categorical", "bernoulli"):
        raise ValueError(f"kind: expected 'categorical' or 'bernoulli', got {kind!r}")
    ts = (x, x_dot, weight, weight_dot, bias_dot, dact, state)
    if ((kind == "bernoulli" or weight.shape[0] <= _FVP_MAX_N)
            and _dims(ts, (2, 2, 2, 2, 1, 2, 2)) and _small(*ts) and can_launch(*ts)
            and _linear_shapes(x, weight, x_dot, weight_dot, bias_dot, dact, state)):
        from . import linear

        return linear.linear_jvp_fvp(x, x_dot, weight, weight_dot, bias_dot, dact, state, kind,
                                     scale)
    from . import output

    u = linear_jvp(x, x_dot, weight, weight_dot, bias_dot, dact)
    fvp = output.categorical_fvp if kind == "categorical" else output.bernoulli_fvp
    return fvp(state, u).mul_(scale)


def linear_vjp(x: Tensor, weight: Tensor, grad_out: Tensor, dact: Tensor | None,
               need_input: bool, need_weight: bool, need_bias: bool
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents of ``σ(x Wᵀ + b)`` for input, weight and bias from the output cotangent."""
    ts = (x, weight, grad_out, dact)
    if (_dims(ts, (2, 2, 2, 2)) and _small(*ts) and can_launch(*ts)
            and _linear_shapes(x, weight, None, None, None, dact, grad_out)):
        from . import linear

        return linear.linear_vjp(x, weight, grad_out, dact, need_input, need_weight, need_bias)
    return _ref.linear_vjp(x, weight, grad_out, dact, need_input, need_weight, need_bias)


def _rstd_ok(rstd: Tensor, xhat: Tensor) -> bool:
    rows = xhat.shape[0] if xhat.dim() == 2 else -1
    if rstd.dim() not in (1, 2) or rstd.shape[0] != rows or rstd.numel() != rows:
        return False
    return rstd.dtype in (torch.float32, xhat.dtype) and can_launch(rstd)


def layernorm_jvp(xhat: Tensor, rstd: Tensor, x_dot: Tensor | None, weight: Tensor | None,
                  weight_dot: Tensor | None, bias_dot: Tensor | None) -> Tensor:
    """Tangent of LayerNorm over the last dimension (row-wise kernel)."""
    ts = (xhat, x_dot, weight, weight_dot, bias_dot)
    if (_dims(ts, (2, 2, 1, 1, 1)) and xhat.shape[-1] <= _MAX_BLOCK_D and _small(*ts)
            and _unit_rows(xhat, x_dot) and can_launch(*ts) and _rstd_ok(rstd, xhat)
            and _ln_shapes(xhat, (x_dot,), (weight, weight_dot, bias_dot))):
        from . import layernorm

        return layernorm.layernorm_jvp(xhat, rstd, x_dot, weight, weight_dot, bias_dot)
    return _ref.layernorm_jvp(xhat, rstd, x_dot, weight, weight_dot, bias_dot)


def layernorm_vjp(xhat: Tensor, rstd: Tensor, grad_out: Tensor, weight: Tensor | None,
                  need_input: bool, need_weight: bool, need_bias: bool
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents of LayerNorm for input, weight and bias (row-wise kernel, deterministic sums)."""
    ts = (xhat, grad_out, weight)
    if (_dims(ts, (2, 2, 1)) and xhat.shape[-1] <= _MAX_BLOCK_D and _small(*ts)
            and _unit_rows(xhat, grad_out) and can_launch(*ts) and _rstd_ok(rstd, xhat)
            and _ln_shapes(xhat, (grad_out,), (weight,))):
        from . import layernorm

        return layernorm.layernorm_vjp(xhat, rstd, grad_out, weight, need_input, need_weight,
                                       need_bias)
    return _ref.layernorm_vjp(xhat, rstd, grad_out, weight, need_input, need_weight, need_bias)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      causal: bool = False, mask: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """``(o, lse)`` of attention ``softmax(scale · q kᵀ + mask) v`` (flash-attention kernel).

    q: (B, H, T, D), k, v: (B, H, S, D); ``mask`` broadcastable to (B, H, T, S), additive float
    or boolean (True = keep); ``causal``: keep key j for query i when ``j ≤ i`` (as torch's
    SDPA). lse: (B, H, T), fp32 (the input dtype for float64). Fully masked rows: o = 0,
    lse = -inf. The kernel needs ``D ≤ 256``, ``B·H ≤ 65535`` and a bool or kernel-dtype mask
    on q's device; anything else runs :mod:`.attention_reference`.
    """
    from . import attention_reference as ar

    ts = (q, k, v)
    if (ar.shapes_ok(q, k, v, mask) and 0 < q.shape[-1] <= 256
            and q.shape[0] * q.shape[1] <= 65535 and _small(*ts, mask) and can_launch(*ts)
            and (mask is None or (mask.device == q.device and can_launch(
                mask, dtypes=None if mask.is_floating_point() else (torch.bool,))))):
        from . import attention

        return attention.attention_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    return ar.attention_forward_reference(q, k, v, scale=scale, causal=causal, mask=mask)


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dq: Tensor | None,
                  dk: Tensor | None, dv: Tensor | None, *, scale: float | None = None,
                  causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """Tangent ``do`` of attention along ``(dq, dk, dv)`` (each ``None`` = zero) from the
    forward's ``o`` and ``lse`` (:func:`attention_forward`; one kernel pass over the keys).
    Same conditions as :func:`attention_forward`, ``lse`` fp32 on q's device, and on a GPU
    fp32 heads of at most 64 (``"ieee"``) / 128 (``"tf32"``) columns
    (:func:`ngtriton.kernels.attention.jvp_head_limit`)."""
    from . import attention_reference as ar

    ts = (q, k, v, o, dq, dk, dv)
    if (ar.shapes_ok(q, k, v, mask, o, lse, dq, dk, dv) and 0 < q.shape[-1] <= 256
            and q.shape[0] * q.shape[1] <= 65535 and _small(*ts, lse, mask) and can_launch(*ts)
            and lse.device == q.device and can_launch(lse, dtypes=(torch.float32,))
            and (mask is None or (mask.device == q.device and can_launch(
                mask, dtypes=None if mask.is_floating_point() else (torch.bool,))))):
        from . import attention
        from ._config import dot_precision

        limit = attention.jvp_head_limit(q.dtype, dot_precision(q.dtype))
        if attention.head_block(q.shape[-1]) <= limit:
            return attention.attention_jvp(q, k, v, o, lse, dq, dk, dv, scale=scale,
                                           causal=causal, mask=mask)
    return ar.attention_jvp_reference(q, k, v, o, lse, dq, dk, dv, scale=scale, causal=causal,
                                      mask=mask)


def attention_vjp(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, g: Tensor, *,
                  scale: float | None = None, causal: bool = False, mask: Tensor | None = None,
                  need: tuple[bool, bool, bool] = (True, True, True)
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """Cotangents ``(dq, dk, dv)`` of attention (``None`` for those ``need`` leaves out) for the
    output cotangent ``g``, from the forward's ``o`` and fp32 ``lse`` (:func:`attention_forward`;
    FlashAttention-2 kernels, :mod:`.attention_backward`). Same conditions as
    :func:`attention_jvp` (``g`` shaped like q). Returns ``None`` when the kernels cannot take
    the operands: the caller then uses torch's own SDPA backward."""
    from . import attention_reference as ar

    ts = (q, k, v, o, g)
    if (ar.shapes_ok(q, k, v, mask, o, lse, g) and 0 < q.shape[-1] <= 256
            and q.shape[0] * q.shape[1] <= 65535 and _small(*ts, lse, mask) and can_launch(*ts)
            and lse.device == q.device and can_launch(lse, dtypes=(torch.float32,))
            and (mask is None or (mask.device == q.device and can_launch(
                mask, dtypes=None if mask.is_floating_point() else (torch.bool,))))):
        from . import attention_backward as ab
        from ._config import dot_precision

        if ab.head_block(q.shape[-1]) <= ab.vjp_head_limit(q.dtype, dot_precision(q.dtype)):
            return ab.attention_vjp(q, k, v, o, lse, g, scale=scale, causal=causal, mask=mask,
                                    need=need)
    return None
