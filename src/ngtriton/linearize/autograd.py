"""Whole-model linearization through autograd: works for any differentiable model.

One forward pass builds the graph of ``z(θ)``. A second, create-graph backward builds
``θ̄(u) = Jᵀ u`` as a graph that is linear in a dummy cotangent ``u``. Then

* ``vjp(u)`` differentiates ``z`` again (``retain_graph``): ``Jᵀ u``;
* ``jvp(v)`` differentiates ``θ̄(u)`` with respect to ``u`` with cotangent ``v``:
  ``∂⟨Jᵀu, v⟩/∂u = J v`` (the "double-backward" R-operator).

No product runs the model's forward again and nothing is retraced. It is the fallback for
models the per-module engine cannot trace, and the oracle the engine is compared with.

Like the engine, it linearizes the network without dropout (every ``F.dropout``-family call is
the identity during its forward, attention's ``dropout_p`` is 0) and runs scaled-dot-product
attention through its math backend, the one with a double backward. A custom
``autograd.Function`` whose backward cannot be differentiated again contributes its ``jvp`` by
forward-mode AD through the whole model (the forward runs again for each ``J v``); without one,
:class:`~ngtriton.linearize.functions.NotLinearizable` names it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .base import check_tangents
from .functions import custom_functions, forward_jvp, functions_without_jvp, not_linearizable
from .outputs import OutputSelector, select_output
from .precision import AutocastArg, autocast_context, resolve_autocast
from .rules import WithoutDropout, depends_on, math_attention, reaching
from .state import buffers_kept


class AutogradLinearization:
    """Linearization of ``model(*inputs)`` by autograd on a retained graph (``output``: which
    tensor of the model's output, see :func:`~ngtriton.linearize.outputs.select_output`;
    ``autocast``: the precision, see :mod:`~ngtriton.linearize.precision`: under autocast the
    forward, and so the graph the products differentiate, runs in that dtype, and the output is
    cast to the parameters' dtype in the graph)."""

    def __init__(self, model: nn.Module, inputs: Sequence[object],
                 output: OutputSelector = None, autocast: AutocastArg = None) -> None:
        self.params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        self._forward_ad: Callable[[Sequence[Tensor]], Tensor] | None = None
        device = (self.params[0] if self.params else torch.empty(0)).device
        self.autocast = precision = resolve_autocast(
            autocast, device, self.params[0].dtype if self.params else None)
        self._device_type = device.type
        with torch.enable_grad(), math_attention(), autocast_context(precision, device.type):
            with WithoutDropout():
                out = select_output(model(*inputs), output)
            if precision is not None and self.params and out.dtype != self.params[0].dtype \
                    and out.is_floating_point():
                out = out.to(self.params[0].dtype)  # the products' outputs: full precision
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
            functions = custom_functions([out.grad_fn])
            missing = functions_without_jvp(functions)
            if missing:
                raise not_linearizable(missing)
            if functions:  # their own jvp, by forward-mode AD through the whole model
                self._forward_ad = _whole_model_jvp(model, tuple(inputs), output, self.params,
                                                    precision)
                self._linked, self._grads = [], []
                return
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
        if self._forward_ad is not None:
            return self._forward_ad(tangents)
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
        if self._forward_ad is not None:
            return torch.stack([self.jvp([t[i] for t in tangents]) for i in range(c)])
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


def _whole_model_jvp(model: nn.Module, inputs: tuple[object, ...], output: OutputSelector,
                     params: list[Tensor], precision: torch.dtype | None = None
                     ) -> Callable[[Sequence[Tensor]], Tensor]:
    """``J v`` by forward-mode AD through ``model`` (its forward runs again for each product,
    without dropout, with its buffers and the random generators left as they were): for a
    custom Function whose backward cannot be differentiated again but that has a ``jvp``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    primals = [p.detach() for p in params]
    devices = sorted({p.device for p in params if p.is_cuda}, key=str)

    def run(*ps: Tensor) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps)), inputs)
        return select_output(out, output)

    def jvp(tangents: Sequence[Tensor]) -> Tensor:
        with buffers_kept(model), torch.random.fork_rng(devices=devices), WithoutDropout(), \
                math_attention(), autocast_context(precision, primals[0].device.type):
            out = forward_jvp(run, primals, list(tangents)).detach()
        return out.to(primals[0].dtype) if precision is not None else out

    return jvp
