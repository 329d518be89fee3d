"""The max-pooling rule: at the linearization point, max pooling picks one input per window.

The forward's indices (``return_indices=True``: the flat position of each window's maximum in
its ``(N, C)`` plane) make it a fixed selection, so ``ẏ = ẋ[indices]`` (a gather) and the VJP
scatters the cotangent back, adding where windows overlap. Ties pick the index torch picks, as
its own backward does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rules import Step

__all__ = ["MaxPoolStep", "max_pool_with_indices"]

_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def max_pool_with_indices(x: Tensor, mod: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(value, indices)`` of ``mod`` (an ``nn.MaxPool{1,2,3}d``) at a batched input; None for
    an unbatched one."""
    dims = int(type(mod).__name__[-2])
    if x.dim() != dims + 2:
        return None
    return _POOLS[dims](x, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        ceil_mode=mod.ceil_mode, return_indices=True)


class MaxPoolStep(Step):
    """``y = max_pool(x)`` with active ``x``, through the forward's indices."""

    def __init__(self, indices: Tensor, x_shape: torch.Size, x_slot: int) -> None:
        self.in_slots = (x_slot,)
        self.idx = indices.flatten(2)
        self.x_shape, self.out_shape = x_shape, indices.shape

    def jvp(self, dots):
        return dots[0].flatten(2).gather(2, self.idx).view(self.out_shape)

    def vjp(self, g):
        out = g.new_zeros(self.x_shape).flatten(2)
        out.scatter_add_(2, self.idx, g.reshape(self.idx.shape))
        return [out.view(self.x_shape)]
