"""The damped quadratic model of the loss around θ, and the step that minimises it.

``m(δ) = gᵀδ + ½ δᵀ(F + λI + W)δ`` (``W``: the weight decay's curvature). With
``momentum="auto"`` NGD moves along ``δ = a·Δ₁ + b·Δ₂``, ``Δ₁`` the (rate-scaled) negative
natural gradient and ``Δ₂`` the previous step, with ``a`` and ``b`` minimising ``m`` over that
plane (Martens & Grosse 2015, §7): step size and momentum chosen by the curvature itself. It
needs ``(F + λI)Δ₂``, one Fisher product; ``(F + λI)Δ₁`` comes from the solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class PlaneStep:
    """The minimiser of ``m`` over ``a·Δ₁ + b·Δ₂`` and its predicted change ``m(δ)`` (< 0)."""

    a: float
    b: float
    predicted: float


def minimise_on_plane(c1: float, c2: float, g11: float, g12: float, g22: float,
                      scale: float = 1.0) -> PlaneStep | None:
    """``(a, b) = −scale·G⁻¹c`` for ``G = [[g11, g12], [g12, g22]]``, ``c = (c1, c2)``
    (``c = gᵀΔ``, ``G = ΔᵀAΔ``); along Δ₁ alone when the plane is degenerate (Δ₂ = 0 or
    parallel to Δ₁). ``scale`` (the user's ``lr``) shrinks or stretches the optimal step; the
    model's value is then ``m* (2·scale − scale²)``. None when no descent exists (``g11 ≤ 0``
    or non-finite numbers)."""
    values = (c1, c2, g11, g12, g22)
    if not all(math.isfinite(v) for v in values) or not g11 > 0:
        return None
    det = g11 * g22 - g12 * g12
    if g22 > 0 and det > 1e-10 * g11 * g22:
        a = -(g22 * c1 - g12 * c2) / det
        b = -(g11 * c2 - g12 * c1) / det
    else:
        a, b = -c1 / g11, 0.0
    m_star = 0.5 * (a * c1 + b * c2)
    if not m_star < 0:
        return None
    return PlaneStep(a * scale, b * scale, m_star * (2 * scale - scale * scale))


def decay_quadratic(decay: Tensor | None, u: Tensor, v: Tensor) -> float:
    """``uᵀWv`` for the diagonal weight-decay curvature ``W = diag(decay)`` (0 without)."""
    if decay is None:
        return 0.0
    return float((u * decay).dot(v))
