"""Rules for softmax and for products of two tensors that may both depend on the parameters.

* ``a @ b`` (``matmul``, ``bmm`` with equal batch dims): bilinear, so ``ẏ = ȧ b + a ḃ`` and the
  cotangents are ``g bᵀ`` and ``aᵀ g``; eager attention (``softmax(q kᵀ) v``) is made of these.
* ``softmax(x, dim)``: ``ẏ = p ⊙ (ẋ − Σ p ẋ)`` over ``dim``, a symmetric map, so the VJP is the
  same formula applied to the cotangent; only ``p`` is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rules import Step, _positions

__all__ = ["MatmulStep", "SoftmaxStep"]


class MatmulStep(Step):
    """``a @ b`` on operands of the same rank ≥ 2 and the same batch dims."""

    def __init__(self, a: Tensor, b: Tensor, a_slot: int | None, b_slot: int | None) -> None:
        self.a, self.b = a, b
        self.in_slots, (self.ap, self.bp) = _positions((a_slot, b_slot))

    def jvp(self, dots):
        out = None
        if self.ap is not None:
            out = dots[self.ap] @ self.b
        if self.bp is not None:
            term = self.a @ dots[self.bp]
            out = term if out is None else out.add_(term)
        return out

    def vjp(self, g):
        cots = []
        if self.ap is not None:
            cots.append(g @ self.b.transpose(-1, -2))
        if self.bp is not None:
            cots.append(self.a.transpose(-1, -2) @ g)
        return cots


class SoftmaxStep(Step):
    """``softmax(x, dim)`` with active ``x``; ``p`` is the forward's value."""

    def __init__(self, p: Tensor, dim: int, x_slot: int) -> None:
        self.p, self.dim = p, dim
        self.in_slots = (x_slot,)

    def _apply(self, t: Tensor) -> Tensor:
        pt = self.p * t
        return pt.sub_(self.p * pt.sum(self.dim, keepdim=True))

    def jvp(self, dots):
        return self._apply(dots[0])

    def vjp(self, g):
        return [self._apply(g)]


def matmul_operands_ok(a: object, b: object) -> bool:
    """Whether the rule covers ``a @ b``: float tensors of one rank ≥ 2, same batch dims."""
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == b.dim() >= 2
            and a.shape[:-2] == b.shape[:-2] and a.dtype == b.dtype and a.is_floating_point())


def softmax_value(x: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """``softmax(x, dim)`` as torch computes it (``dtype``: the result's, cast first)."""
    return torch.softmax(x if dtype is None else x.to(dtype), dim)
