"""Torch references of the engine's per-layer primitives: Linear (with a fused activation)
and LayerNorm, JVP and VJP.

These define what each Triton kernel in this package computes, are what the kernels are tested
against, and are the torch fallback :mod:`ngtriton.kernels.ops` calls where a kernel cannot
launch; :mod:`ngtriton.linearize.ops_torch` (the CPU backend) re-exports them. Pure torch: this
module imports no triton and nothing above :mod:`ngtriton.kernels`.

Every function takes 2-D activations ``(rows, features)``; callers flatten leading dimensions.
``dact`` is the cached derivative of an activation that follows the linear layer (``σ′(s)``,
shaped like the layer's output), or ``None`` for no activation: fusing it here is what lets the
Triton kernels apply it in their epilogue.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["layernorm_jvp", "layernorm_vjp", "linear_jvp", "linear_jvp_fvp", "linear_vjp"]


def linear_jvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
               bias_dot: Tensor | None, dact: Tensor | None) -> Tensor:
    """Tangent of ``σ(x Wᵀ + b)``: ``σ′ ⊙ (ẋ Wᵀ + x Ẇᵀ + ḃ)``.

    ``x_dot`` is ``None`` when the input does not depend on the parameters (the first layer);
    ``weight_dot``/``bias_dot`` are ``None`` for frozen parameters.
    """
    out = None
    if x_dot is not None:
        out = x_dot @ weight.t()
    if weight_dot is not None:
        out = x @ weight_dot.t() if out is None else out.addmm_(x, weight_dot.t())
    if out is None:
        out = x.new_zeros(x.shape[0], weight.shape[0])
    if bias_dot is not None:
        out.add_(bias_dot)
    if dact is not None:
        out.mul_(dact)
    return out


def linear_jvp_fvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
                   bias_dot: Tensor | None, dact: Tensor | None, state: Tensor, kind: str,
                   scale: float) -> Tensor:
    """``scale · F_R ẏ`` per row, ``ẏ`` the :func:`linear_jvp` tangent of the model's last layer.

    ``kind``: ``"categorical"`` (``state`` = probabilities p: ``p ⊙ ẏ − p (p·ẏ)``) or
    ``"bernoulli"`` (``state`` = s: ``s(1−s) ⊙ ẏ``); ``state`` is shaped like the output.
    """
    from . import output  # its torch references (importing it imports triton if present)

    if kind == "categorical":
        fvp = output.categorical_fvp_reference
    elif kind == "bernoulli":
        fvp = output.bernoulli_fvp_reference
    else:
        raise ValueError(f"kind: expected 'categorical' or 'bernoulli', got {kind!r}")
    return fvp(state, linear_jvp(x, x_dot, weight, weight_dot, bias_dot, dact)) * scale


def linear_vjp(x: Tensor, weight: Tensor, grad_out: Tensor, dact: Tensor | None,
               need_input: bool, need_weight: bool, need_bias: bool
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents of ``σ(x Wᵀ + b)`` for input, weight and bias from the output cotangent."""
    g = grad_out * dact if dact is not None else grad_out
    gx = g @ weight if need_input else None
    gw = g.t() @ x if need_weight else None
    gb = g.sum(0) if need_bias else None
    return gx, gw, gb


def layernorm_jvp(xhat: Tensor, rstd: Tensor, x_dot: Tensor | None, weight: Tensor | None,
                  weight_dot: Tensor | None, bias_dot: Tensor | None) -> Tensor:
    """Tangent of LayerNorm over the last dim; ``xhat`` the normalised input, ``rstd`` (rows, 1)."""
    out = None
    if x_dot is not None:
        mean_dot = x_dot.mean(-1, keepdim=True)
        proj = (x_dot * xhat).mean(-1, keepdim=True)
        xhat_dot = (x_dot - mean_dot - xhat * proj) * rstd
        out = xhat_dot * weight if weight is not None else xhat_dot
    if weight_dot is not None:
        term = xhat * weight_dot
        out = term if out is None else out + term
    if out is None:
        out = torch.zeros_like(xhat)
    if bias_dot is not None:
        out = out + bias_dot
    return out


def layernorm_vjp(xhat: Tensor, rstd: Tensor, grad_out: Tensor, weight: Tensor | None,
                  need_input: bool, need_weight: bool, need_bias: bool
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents of LayerNorm for input, weight and bias."""
    gx = gw = gb = None
    if need_input:
        gxhat = grad_out * weight if weight is not None else grad_out
        mean_g = gxhat.mean(-1, keepdim=True)
        proj = (gxhat * xhat).mean(-1, keepdim=True)
        gx = (gxhat - mean_g - xhat * proj) * rstd
    if need_weight:
        gw = (grad_out * xhat).sum(0)
    if need_bias:
        gb = grad_out.sum(0)
    return gx, gw, gb
