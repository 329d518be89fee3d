"""The contract between a model's linearization and everything downstream of it.

A :class:`Linearization` is built from ONE forward pass of a model at its current parameters.
It holds the outputs ``z`` of that pass and the two linear maps of the network's Jacobian
``J = ∂z/∂θ`` at that point, evaluated without any further forward pass:

* ``jvp(tangents)``: ``J v`` — parameter tangents (shaped like the parameters) → output tangents;
* ``vjp(cotangent)``: ``Jᵀ u`` — output cotangents (shaped like ``outputs``) → parameter grads.

Every Fisher-vector product, every solver iteration and the optimizer reuse these two maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Linearization(Protocol):
    """A model linearized at its current parameters (see the module docstring)."""

    params: list[Tensor]
    """The parameters the maps differentiate with respect to, in ``model.parameters()`` order."""

    outputs: Tensor
    """The model's outputs at the linearization point, detached, shape ``(N, ..., m)``."""

    def jvp(self, tangents: Sequence[Tensor]) -> Tensor:
        """``J v``: one tangent per parameter → a tensor shaped like :attr:`outputs`."""
        ...

    def vjp(self, cotangent: Tensor) -> list[Tensor]:
        """``Jᵀ u``: a cotangent shaped like :attr:`outputs` → one tensor per parameter."""
        ...


def check_tangents(params: Sequence[Tensor], tangents: Sequence[Tensor]) -> None:
    """Raise a ValueError naming ``tangents`` when they do not match the parameters."""
    if len(tangents) != len(params):
        raise ValueError(f"tangents: expected {len(params)} tensors (one per parameter), "
                         f"got {len(tangents)}")
    for i, (p, t) in enumerate(zip(params, tangents)):
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"tangents[{i}]: expected shape {tuple(p.shape)}, got {shape}")


class EngineUnsupported(Exception):
    """The engine cannot linearize this model; ``reason`` says why (the caller falls back)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
