"""Whole-model linearization through autograd: works for any differentiable model.

One forward pass builds the graph of ``z(θ)``. A second, create-graph backward builds
``θ̄(u) = Jᵀ u`` as a graph that is linear in a dummy cotangent ``u``. Then

* ``vjp(u)`` differentiates ``z`` again (``retain_graph``): ``Jᵀ u``;
* ``jvp(v)`` differentiates ``θ̄(u)`` with respect to ``u`` with cotangent ``v``:
  ``∂⟨Jᵀu, v⟩/∂u = J v`` (the "double-backward" R-operator).

No product runs the model's forward again and nothing is retraced. It is the fallback for
models the per-module engine cannot trace, and the oracle the engine is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import check_tangents


class AutogradLinearization:
    """Linearization of ``model(*inputs)`` by autograd on a retained graph."""

    def __init__(self, model: nn.Module, inputs: Sequence[object]) -> None:
        self.params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad():
            out = model(*inputs)
            if not isinstance(out, Tensor):
                raise TypeError(f"model: expected the forward to return a Tensor, "
                                f"got {type(out).__name__}")
            self._out = out
            self._dummy = torch.zeros_like(out, requires_grad=True)
            grads = torch.autograd.grad(out, self.params, self._dummy, create_graph=True,
                                        allow_unused=True)
        self.outputs = out.detach()
        # Parameters whose gradient does not depend on u (unused ones) have a zero Jacobian.
        self._linked = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
        self._grads = [grads[i] for i in self._linked]

    def jvp(self, tangents: Sequence[Tensor]) -> Tensor:
        check_tangents(self.params, tangents)
        if not self._grads:
            return torch.zeros_like(self.outputs)
        (out,) = torch.autograd.grad(self._grads, self._dummy,
                                     [tangents[i] for i in self._linked],
                                     retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.outputs) if out is None else out

    def vjp(self, cotangent: Tensor) -> list[Tensor]:
        if cotangent.shape != self.outputs.shape:
            raise ValueError(f"cotangent: expected shape {tuple(self.outputs.shape)}, "
                             f"got {tuple(cotangent.shape)}")
        grads = torch.autograd.grad(self._out, self.params, cotangent, retain_graph=True,
                                    allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def jvp_batched(self, tangents: Sequence[Tensor]) -> Tensor:
        """``J v`` for a batch of c tangents (each parameter's with a leading dim c)."""
        c = tangents[0].shape[0]
        if not self._grads:
            return self.outputs.new_zeros((c, *self.outputs.shape))
        (out,) = torch.autograd.grad(self._grads, self._dummy,
                                     [tangents[i] for i in self._linked], retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)
        return self.outputs.new_zeros((c, *self.outputs.shape)) if out is None else out

    def vjp_batched(self, cotangents: Tensor) -> list[Tensor]:
        """``Jᵀ u`` for a batch of c cotangents ``(c, *outputs.shape)``."""
        grads = torch.autograd.grad(self._out, self.params, cotangents, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        c = cotangents.shape[0]
        return [p.new_zeros((c, *p.shape)) if g is None else g for p, g in zip(self.params, grads)]
