"""The batch-norm rule, in its two regimes, over channels-first inputs ``(N, C, *)``.

* Batch statistics (train mode, or no running statistics): ``y = x̂ w + b`` with
  ``x̂ = (x − μ) r``, ``μ`` and ``r = (σ² + ε)^(-1/2)`` per channel over the batch and the
  spatial dims. Every output depends on the whole batch, so the JVP goes through the
  statistics: ``x̂̇ = r (ẋ − mean ẋ − x̂ mean(ẋ x̂))``, and the VJP is its transpose (the same
  form, applied to ``g w``).
* Running statistics (eval mode): an affine map per channel, ``ẏ = ẋ (w r) + x̂ ẇ + ḃ``.

The running statistics a train-mode forward updates are buffers, not parameters: the rule never
writes them (the build keeps the model's buffers as they were).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rules import Step, _active_cotangents, _positions

__all__ = ["BatchNormStep"]


class BatchNormStep(Step):
    """Batch normalization with active input, weight or bias (see the module docstring)."""

    def __init__(self, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                 batch_stats: bool, x_slot: int | None, w_slot: int | None,
                 b_slot: int | None) -> None:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        self.dims = [0, *range(2, x.dim())]
        self.shape = x.shape
        self.batch_stats = batch_stats
        self.rstd = torch.rsqrt(var.to(torch.float32 if x.dtype in (
            torch.float16, torch.bfloat16) else x.dtype) + eps).to(x.dtype).view(shape)
        self.xhat = (x - mean.to(x.dtype).view(shape)) * self.rstd
        self.weight = None if weight is None else weight.view(shape)
        self.in_slots, (self.xp, self.wp, self.bp) = _positions((x_slot, w_slot, b_slot))
        self.channels = x.shape[1]

    def _normalise_tangent(self, t: Tensor) -> Tensor:
        """The linear map ``t ↦ r (t − mean t − x̂ mean(t x̂))``: its own transpose."""
        mean_t = t.mean(self.dims, keepdim=True)
        proj = (t * self.xhat).mean(self.dims, keepdim=True)
        return (t - mean_t - self.xhat * proj).mul_(self.rstd)

    def jvp(self, dots):
        out = None
        if self.xp is not None:
            xd = dots[self.xp]
            xhat_dot = self._normalise_tangent(xd) if self.batch_stats else xd * self.rstd
            out = xhat_dot if self.weight is None else xhat_dot.mul_(self.weight)
        if self.wp is not None:
            term = self.xhat * dots[self.wp].view_as(self.rstd)
            out = term if out is None else out.add_(term)
        if self.bp is not None:
            bias = dots[self.bp].view_as(self.rstd)
            out = bias.expand(self.shape).clone() if out is None else out.add_(bias)
        return out

    def vjp(self, g):
        gx = gw = gb = None
        if self.xp is not None:
            gxhat = g if self.weight is None else g * self.weight
            gx = (self._normalise_tangent(gxhat) if self.batch_stats
                  else gxhat * self.rstd)
        if self.wp is not None:
            gw = (g * self.xhat).sum(self.dims)
        if self.bp is not None:
            gb = g.sum(self.dims)
        return _active_cotangents((self.xp, self.wp, self.bp), (gx, self.shape),
                                  (gw, (self.channels,)), (gb, (self.channels,)))
