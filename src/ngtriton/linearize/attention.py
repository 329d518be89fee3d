"""The attention rule: ``o = softmax(scale · q kᵀ + mask) v`` (scaled-dot-product attention).

JVP: ``ops.attention_jvp``, forward mode through the softmax from the saved log-sum-exp of each
row, never forming the T×S matrix (the flash-attention JVP kernel on the GPU, a chunked torch
reference elsewhere). VJP: ``ops.attention_vjp`` (the flash-attention backward kernels) where
the ops module has it and it can launch; otherwise torch's own SDPA backward (its fused kernels)
through the autograd graph of one SDPA call (on the CPU the build's own forward, which also
gives the log-sum-exp). Dropout is off in every linearization, so
``dropout_p`` is 0 here too; the mask is a constant (a mask that depends on the parameters, or
grouped-query shapes, take the per-node fallback).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import Step, _positions

__all__ = ["AttentionStep", "attention_supported"]


def attention_supported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the rule covers these operands: 4-D ``(B, H, T, D)`` with the same batch and
    heads, one float dtype, and a mask that broadcasts to ``(B, H, T, S)``."""
    if not (q.dim() == k.dim() == v.dim() == 4) or q.shape[:2] != k.shape[:2]:
        return False
    if k.shape != (*v.shape[:3], k.shape[3]) or q.shape[3] != k.shape[3]:
        return False
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()):
        return False
    if mask is None:
        return True
    if mask.dim() < 2:  # torch's SDPA refuses these: the fallback then raises torch's error
        return False
    try:
        torch.broadcast_shapes(mask.shape, (*q.shape[:3], k.shape[2]))
    except RuntimeError:
        return False
    return mask.dim() <= 4


class AttentionStep(Step):
    """SDPA with any of q, k, v active (see the module docstring)."""

    def __init__(self, ops: ModuleType, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                 causal: bool, scale: float | None, slots: tuple[int | None, int | None,
                                                                  int | None]) -> None:
        self.ops = ops
        self.q, self.k, self.v, self.mask, self.causal = q, k, v, mask, causal
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        self.in_slots, self.pos = _positions(slots)
        self.need = tuple(s is not None for s in slots)
        self.graph_out: Tensor | None = None
        with torch.enable_grad():
            # torch's CPU flash kernel reads its operands as contiguous in the last dim (the
            # public SDPA routes other layouts elsewhere): give it such leaves
            leaves = [(t.detach() if t.stride(-1) == 1 else t.detach().contiguous())
                      .requires_grad_(s is not None) for t, s in zip((q, k, v), slots)]
            # the torch backend on the CPU: torch's flash kernel gives o, lse and the graph; a
            # backend with the VJP kernel (Triton) runs its own forward and backward
            found = (None if hasattr(ops, "attention_vjp")
                     else _cpu_flash(leaves, mask, causal, self.scale))
        if found is not None:  # one forward gives the output, its graph and the lse
            self.graph_out, lse = found
            self.leaves = leaves
            self.o, self.lse = self.graph_out.detach(), lse.detach()
        else:
            self.o, self.lse = ops.attention_forward(q, k, v, scale=self.scale, causal=causal,
                                                     mask=mask)

    @property
    def value(self) -> Tensor:
        """The output; on the CPU torch's own, strides included (a captured graph runs ``view``
        as ``reshape``, so other layouts are fine too)."""
        return self.o

    def jvp(self, dots):
        dq, dk, dv = (None if p is None else dots[p] for p in self.pos)
        return self.ops.attention_jvp(self.q, self.k, self.v, self.o, self.lse, dq, dk, dv,
                                      scale=self.scale, causal=self.causal, mask=self.mask)

    def vjp(self, g):
        kernel = getattr(self.ops, "attention_vjp", None)
        if kernel is not None and self.graph_out is None:  # the flash-attention VJP kernel
            grads = kernel(self.q, self.k, self.v, self.o, self.lse, g, scale=self.scale,
                           causal=self.causal, mask=self.mask, need=self.need)
            if grads is not None:
                return [t for t, n in zip(grads, self.need) if n]
        if self.graph_out is None:  # torch's SDPA backward, through one more forward, once
            with torch.enable_grad():
                self.leaves = [t.detach().requires_grad_(n)
                               for t, n in zip((self.q, self.k, self.v), self.need)]
                self.graph_out = F.scaled_dot_product_attention(
                    *self.leaves, attn_mask=self.mask, dropout_p=0.0, is_causal=self.causal,
                    scale=self.scale)
        active = [leaf for leaf, n in zip(self.leaves, self.need) if n]
        with torch.enable_grad():
            return list(torch.autograd.grad(self.graph_out, active, g, retain_graph=True))


def _cpu_flash(leaves: list[Tensor], mask: Tensor | None, causal: bool,
               scale: float) -> tuple[Tensor, Tensor] | None:
    """``(output, lse)`` from torch's flash-attention CPU kernel, differentiable, when it takes
    these operands (float32/float64 on the CPU, an additive mask); None otherwise."""
    q = leaves[0]
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return None
    if mask is not None:
        if mask.dim() and mask.stride(-1) != 1:
            mask = mask.contiguous()
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        elif mask.dtype != q.dtype:
            return None
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *leaves, 0.0, causal, attn_mask=mask, scale=scale)
    except (RuntimeError, NotImplementedError):  # a build without it, a mask it refuses
        return None
    if lse.shape != q.shape[:3]:
        return None
    return out, lse
