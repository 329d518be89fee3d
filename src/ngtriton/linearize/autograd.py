"""Whole-model linearization through autograd: works for any differentiable model.

One forward pass builds the graph of ``z(θ)``. A second, create-graph backward builds
``θ̄(u) = Jᵀ u`` as a graph that is linear in a dummy cotangent ``u``. Then

* ``vjp(u)`` differentiates ``z`` again (``retain_graph``): ``Jᵀ u``;
* ``jvp(v)`` differentiates ``θ̄(u)`` with respect to ``u`` with cotangent ``v``:
  ``∂⟨Jᵀu, v⟩/∂u = J v`` (the "double-backward" R-operator).

No product runs the model's forward again and nothing is retraced. It is the fallback for
models the per-module engine cannot trace, and the oracle the engine is compared with.

Like the engine, it linearizes the network without dropout (every ``F.dropout``-family call is
the identity during its forward) and runs scaled-dot-product attention through its math
backend, the one with a double backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import check_tangents
from .rules import WithoutDropout, depends_on, math_attention, reaching


class AutogradLinearization:
    """Linearization of ``model(*inputs)`` by autograd on a retained graph."""

    def __init__(self, model: nn.Module, inputs: Sequence[object]) -> None:
        self.params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad(), math_attention():
            with WithoutDropout():
                out = model(*inputs)
            if not isinstance(out, Tensor):
                raise TypeError(f"model: expected the forward to return a Tensor, "
                                f"got {type(out).__name__}")
            self._out = out
            # Any u works (Jᵀu is linear in it); ones make a severed dependency visible below.
            self._dummy = torch.ones_like(out, requires_grad=True)
            grads = torch.autograd.grad(out, self.params, self._dummy, create_graph=True,
                                        allow_unused=True)
        self.outputs = out.detach()
        # Jᵀu is linear in u: a gradient that does not depend on u must be zero (an unused
        # parameter, or one behind a zero derivative such as round). A non-zero one means its
        # graph to u was cut (e.g. a custom Function with @once_differentiable), and J v would
        # silently miss that parameter.
        on_u = reaching([gr.grad_fn for gr in grads if gr is not None], self._dummy)
        severed = [i for i, gr in enumerate(grads) if gr is not None
                   and not depends_on(gr, on_u) and bool(gr.any())]
        if severed:
            raise RuntimeError(
                f"model: the gradient of {len(severed)} parameter(s) (the first has shape "
                f"{tuple(self.params[severed[0]].shape)}) cannot be differentiated again, so "
                "J·v cannot be formed by double backward (a custom autograd.Function with "
                "@once_differentiable, or a backward that is not differentiable?); give it a "
                "differentiable backward or make the model traceable by the per-module engine")
        self._linked = [i for i, gr in enumerate(grads)
                        if gr is not None and depends_on(gr, on_u)]
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
