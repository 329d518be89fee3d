"""The RMSNorm rule: ``y = x̂ w`` with ``x̂ = x r`` and ``r = (mean(x²) + ε)^(-1/2)`` over the
trailing ``normalized_shape``.

JVP: ``ẏ = r (ẋ − x̂ mean(x̂ ẋ)) w + x̂ ẇ``; the map ``t ↦ r (t − x̂ mean(x̂ t))`` is symmetric, so
the VJP applies it to ``g w``, and the weight's cotangent is ``Σ g x̂`` over the leading dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rules import Step, _active_cotangents, _positions

__all__ = ["RMSNormStep", "rms_norm_parts"]


def rms_norm_parts(x: Tensor, dims: int, eps: float | None) -> tuple[Tensor, Tensor]:
    """``(x̂, r)`` over the last ``dims`` dims, as torch computes them (statistics in fp32 at
    least); ``eps=None`` is torch's default, the machine epsilon of the dtype it computes in."""
    ct = torch.promote_types(x.dtype, torch.float32)  # the statistics in fp32 at least
    # autocast runs rms_norm in fp32 (its input cast first, the default ε then fp32's);
    # otherwise torch computes in, and returns, the input's dtype
    dtype = ct if torch.is_autocast_enabled(x.device.type) else x.dtype
    if eps is None:
        eps = torch.finfo(dtype).eps
    axes = tuple(range(x.dim() - dims, x.dim()))
    xf = x.to(ct)
    r = torch.rsqrt(xf.square().mean(axes, keepdim=True).add_(eps))
    return (xf * r).to(dtype), r.to(dtype)


class RMSNormStep(Step):
    """RMSNorm with active input or weight (see the module docstring)."""

    def __init__(self, xhat: Tensor, r: Tensor, weight: Tensor | None, dims: int,
                 x_slot: int | None, w_slot: int | None) -> None:
        self.xhat, self.r, self.weight = xhat, r, weight
        self.axes = tuple(range(xhat.dim() - dims, xhat.dim()))
        self.lead = tuple(range(xhat.dim() - dims))
        self.in_slots, (self.xp, self.wp) = _positions((x_slot, w_slot))

    def _normalise_tangent(self, t: Tensor) -> Tensor:
        proj = (t * self.xhat).mean(self.axes, keepdim=True)
        return (t - self.xhat * proj).mul_(self.r)

    def jvp(self, dots):
        out = None
        if self.xp is not None:
            out = self._normalise_tangent(dots[self.xp])
            if self.weight is not None:
                out = out.mul_(self.weight)
        if self.wp is not None:
            term = self.xhat * dots[self.wp]
            out = term if out is None else out.add_(term)
        return out

    def vjp(self, g):
        gx = gw = None
        if self.xp is not None:
            gx = self._normalise_tangent(g if self.weight is None else g * self.weight)
        if self.wp is not None:
            gw = (g * self.xhat).sum(self.lead) if self.lead else g * self.xhat
        shape = self.xhat.shape
        wshape = shape[len(self.lead):]
        return _active_cotangents((self.xp, self.wp), (gx, shape), (gw, wshape))
