"""The convolution rule: ``y = conv(x, W) + b`` for 1-, 2- and 3-D convolutions.

JVP: ``ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ``, two convolutions (one where the input or the weight
is constant: a first layer has no ``ẋ``). VJP: ATen's ``convolution_backward``, which forms the
input, weight and bias cotangents in one call and only those asked for. Nothing is saved but the
input, the weight and the geometry: no autograd graph is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .precision import lowp
from .rules import Step, _active_cotangents, _positions

__all__ = ["ConvStep", "conv_forward", "conv_geometry"]

_aten = torch.ops.aten


def conv_geometry(weight: Tensor, stride: int | Sequence[int], padding: int | str | Sequence[int],
                  dilation: int | Sequence[int]) -> tuple[list[int], list[int], list[int]] | None:
    """``(stride, padding, dilation)`` as lists of ints, one per spatial dim; None where the
    padding (``"same"`` with an odd total) cannot be written as symmetric zero padding."""
    dims = weight.dim() - 2

    def ints(v: int | Sequence[int]) -> list[int]:
        return [int(v)] * dims if isinstance(v, int) else [int(e) for e in v]

    stride_, dilation_ = ints(stride), ints(dilation)
    if padding == "valid":
        return stride_, [0] * dims, dilation_
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation_, weight.shape[2:])]
        if any(t % 2 for t in totals) or any(s != 1 for s in stride_):
            return None
        return stride_, [t // 2 for t in totals], dilation_
    if isinstance(padding, str):
        return None
    return stride_, ints(padding), dilation_


def conv_forward(x: Tensor, w: Tensor, bias: Tensor | None, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """The convolution's value; under autocast in its dtype, as ``F.conv2d`` runs there
    (ATen's ``convolution`` is not on autocast's list)."""
    x, w, bias = lowp(x, w, bias)
    return _aten.convolution(x, w, bias, stride, padding, dilation, False, [0] * len(stride),
                             groups)


class ConvStep(Step):
    """A convolution (channels first, zero padding, any groups); input, weight or bias active."""

    def __init__(self, x: Tensor, weight: Tensor, x_slot: int | None, w_slot: int | None,
                 b_slot: int | None, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, out_shape: torch.Size) -> None:
        self.x, self.weight = lowp(x, weight)  # under autocast: its dtype (a no-op otherwise)
        self.in_slots, (self.xp, self.wp, self.bp) = _positions((x_slot, w_slot, b_slot))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.out_shape = out_shape
        self._bias_view = (1, weight.shape[0]) + (1,) * (weight.dim() - 2)

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        if x.dtype != w.dtype:  # under autocast: a full-precision tangent
            x, w = lowp(x, w)
        return _aten.convolution(x, w, None, self.stride, self.padding, self.dilation, False,
                                 [0] * len(self.stride), self.groups)

    def jvp(self, dots):
        out = None
        if self.xp is not None:
            out = self._conv(dots[self.xp], self.weight)
        if self.wp is not None:
            term = self._conv(self.x, dots[self.wp])
            out = term if out is None else out.add_(term)
        if self.bp is not None:
            bias = dots[self.bp].view(self._bias_view)
            out = bias.expand(self.out_shape).clone() if out is None else out.add_(bias)
        return out

    def vjp(self, g):
        mask = [self.xp is not None, self.wp is not None, self.bp is not None]
        if g.dtype != self.x.dtype:  # under autocast: a full-precision cotangent
            g = lowp(g)[0]
        gx, gw, gb = _aten.convolution_backward(
            g, self.x, self.weight, [self.weight.shape[0]] if mask[2] else None, self.stride,
            self.padding, self.dilation, False, [0] * len(self.stride), self.groups, mask)
        return _active_cotangents((self.xp, self.wp, self.bp), (gx, self.x.shape),
                                  (gw, self.weight.shape), (gb, (self.weight.shape[0],)))
