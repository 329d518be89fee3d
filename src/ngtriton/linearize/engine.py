"""The per-module linearization engine: an fx-traced graph, one forward, per-node rules.

:func:`build_engine` traces the model with :mod:`torch.fx`, runs ONE forward pass at the current
parameters (no autograd graph, except inside per-node fallbacks) and keeps, per node, only what
that node's JVP and VJP need (see :mod:`ngtriton.linearize.rules`). Products then walk the node
list forwards (``jvp``) or backwards (``vjp``) without running the model again.

What the engine differentiates:

* the trainable parameters ``[p for p in model.parameters() if p.requires_grad]``; a parameter
  used by several modules (tied weights) gets one tangent and the sum of its cotangents; frozen
  parameters and buffers are constants;
* the deterministic network: every dropout (module or ``F.dropout``, any mode) is the identity,
  in the forward and in both products, so the Fisher is the one of the network without dropout.
  (A dropout inside a module without a rule is the identity too: opaque nodes run with the
  ``F.dropout`` family switched off.) Attention's ``dropout_p`` (scaled-dot-product attention,
  ``nn.MultiheadAttention``) is 0 likewise (:mod:`~ngtriton.linearize.dropout`);
* a custom ``torch.autograd.Function`` by its own derivatives: it is one node, never traced
  through (:mod:`~ngtriton.linearize.functions`);
* the tensor the model returns, or the one ``output=`` picks from a tuple, dict or
  ``ModelOutput`` (:mod:`~ngtriton.linearize.outputs`).

Which modules are traced through and which are nodes: modules with a rule (Linear, LayerNorm,
Embedding, activations, dropout, Flatten/Unflatten, Identity) and torch.nn's other built-in layers
are nodes; containers (Sequential, ModuleList, ModuleDict) and user modules with submodules are
traced through; user modules without submodules are nodes (opaque: per-node autograd fallback).
A module with forward hooks or a parametrization (``weight_norm``, ``register_parametrization``)
never gets a rule: it runs as an opaque node, by calling it, so its hooks and parametrizations
act as in eager PyTorch; hooks on the model itself or global module hooks make the build raise
:class:`EngineUnsupported` (the caller falls back to whole-model autograd). The trace is cached
per model and invalidated when a plain Python attribute (number, flag, string) of a module it
traces through changes, since ``forward`` may branch on it; globals it reads are not watched.
The cache holds references to the parameters; updating them in place invalidates it (products
then raise); build a new linearization after each optimizer step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import ops_torch
from .base import EngineUnsupported, check_tangents
from .builder import _Builder
from .capture import capture
from .check import _agrees, _eager_forward
from .classify import _has_module_rule, _plain
from .function_rules import module_rule
from .outputs import OutputSelector, prune_steps, select_output
from .precision import AutocastArg, autocast_context, resolve_autocast
from .record import ForwardRecord
from .rules import LinearStep, OutputEpilogue, Step
from .trace import (
    _TRACE_CACHE,
    _forward_params,
    _signature_inputs,
    _trace,
    _Tracer,
    clear_trace_cache,
)

__all__ = ["EngineLinearization", "EngineUnsupported", "build_engine", "clear_trace_cache"]
# re-exported for tests and tools that reach into the engine
_REEXPORTED = (_Builder, _Tracer, _TRACE_CACHE, _forward_params)


# --------------------------------------------------------------------------------------------
# The linearization
# --------------------------------------------------------------------------------------------

class EngineLinearization:
    """A model linearized by per-node rules (see the module docstring).

    ``params``, ``outputs``, ``jvp`` and ``vjp`` follow :class:`~ngtriton.linearize.Linearization`.
    ``steps`` lists the rules in execution order; ``fallbacks`` names the nodes that use the
    per-node autograd fallback (no dedicated rule). ``autocast``: the low-precision dtype the
    forward ran in and the products run in (None: full precision); ``outputs``, ``J v`` and
    ``Jᵀ u`` are in the parameters' dtype either way (:mod:`~ngtriton.linearize.precision`).
    """

    def __init__(self, params: list[Tensor], outputs: Tensor, steps: list[Step],
                 n_slots: int, out_slot: int | None, fallbacks: list[str],
                 autocast: torch.dtype | None = None) -> None:
        self.params = params
        self.autocast = autocast
        self._param_dtypes = [p.dtype for p in params]  # as built (what products return)
        self._dtype = params[0].dtype if params else outputs.dtype
        self._device_type = (params[0] if params else outputs).device.type
        if autocast is not None and outputs.is_floating_point():
            outputs = outputs.to(self._dtype)
        self.outputs = outputs
        self.steps = steps = prune_steps(steps, out_slot)
        self.fallbacks = fallbacks
        self._n_slots = n_slots
        self._out_slot = out_slot
        self._versions = tuple(p._version for p in params)
        last: dict[int, int] = {}
        for i, step in enumerate(steps):
            for s in step.in_slots:
                last[s] = i
        frees: list[list[int]] = [[] for _ in steps]
        for s, i in last.items():
            if s != out_slot:
                frees[i].append(s)
        self._plan = [(step, step.in_slots, step.out_slot, tuple(f))
                      for step, f in zip(steps, frees)]
        # each slot's dtype (its value's, or its parameter's): where a model changes dtype
        # (an fp32 island in a bf16 model), tangents and cotangents follow it
        self._slot_dtypes: list[torch.dtype | None] = [p.dtype for p in params]
        self._slot_dtypes += [None] * (n_slots - len(params))
        for step in steps:
            self._slot_dtypes[step.out_slot] = getattr(step, "out_dtype", None)
        # the step that writes the output (the one an output epilogue goes to), if any
        self._out_step = next((i for i, st in enumerate(steps) if st.out_slot == out_slot), -1)

    def with_ops(self, ops: ModuleType) -> EngineLinearization:
        """The same linearization (same cached values, no new forward) whose Linear and
        LayerNorm steps call ``ops``: e.g. :mod:`~ngtriton.linearize.ops_torch` for products
        that ``torch.func.vmap`` batches, which Triton kernels cannot be."""
        twin = copy.copy(self)
        twin.steps = [copy.copy(st) for st in self.steps]
        for st in twin.steps:
            if hasattr(st, "ops"):
                st.ops = ops
        twin._plan = [(st, *rest) for st, (_, *rest) in zip(twin.steps, self._plan)]
        return twin

    def _check_fresh(self) -> None:
        if tuple(p._version for p in self.params) != self._versions:
            raise RuntimeError("EngineLinearization: parameters were modified in place after "
                               "the linearization was built; build a new one")

    def accepts_epilogue(self, epilogue: OutputEpilogue) -> bool:
        """Whether :meth:`jvp` can fuse ``epilogue``: the outputs are written, unreshaped, by a
        Linear step (with its activation) whose ops module has ``linear_jvp_fvp``."""
        if self._out_step < 0:
            return False
        step = self.steps[self._out_step]
        return (isinstance(step, LinearStep) and step.out_shape == self.outputs.shape
                and step.accepts(epilogue))

    def jvp(self, tangents: Sequence[Tensor], epilogue: OutputEpilogue | None = None) -> Tensor:
        """``J v``: one tangent per parameter → a tensor shaped like :attr:`outputs`.

        With ``epilogue`` (only where :meth:`accepts_epilogue`; ValueError otherwise) the last
        Linear applies it before its store: the result is ``scale · F_R (J v)`` per output row,
        the output-Fisher product without a second pass over ``J v``.
        """
        check_tangents(self.params, tangents)
        self._check_fresh()
        with autocast_context(self.autocast, self._device_type):
            res = self._jvp(tangents, epilogue)
        if self.autocast is None or res.dtype == self.outputs.dtype:
            return res
        return res.to(self.outputs.dtype)

    def _jvp(self, tangents: Sequence[Tensor], epilogue: OutputEpilogue | None) -> Tensor:
        fused = -1
        if epilogue is not None:
            if not self.accepts_epilogue(epilogue):
                raise ValueError("epilogue: the model's output is not written by a Linear step "
                                 "that can apply it (see accepts_epilogue)")
            fused = self._out_step
        if self._out_slot is None:
            return torch.zeros_like(self.outputs)
        vals: list[Any] = [None] * self._n_slots
        vals[:len(tangents)] = tangents
        for i, (step, ins, out, free) in enumerate(self._plan):
            args = [vals[s] for s in ins]
            t = step.jvp(args) if i != fused else step.jvp(args, epilogue)
            dtype = self._slot_dtypes[out]
            if dtype is not None and isinstance(t, Tensor) and t.dtype != dtype:
                t = t.to(dtype)  # a tangent in its value's dtype (a model's dtype changes)
            vals[out] = t
            for s in free:
                vals[s] = None
        res = vals[self._out_slot]
        if not res.is_contiguous():
            res = res.contiguous()
        elif self._out_slot < len(self.params):  # the output is a parameter: do not alias
            res = res.clone()
        return res

    def vjp(self, cotangent: Tensor) -> list[Tensor]:
        """``Jᵀ u``: a cotangent shaped like :attr:`outputs` → one tensor per parameter."""
        if not isinstance(cotangent, Tensor) or cotangent.shape != self.outputs.shape:
            shape = (tuple(cotangent.shape) if isinstance(cotangent, Tensor)
                     else type(cotangent).__name__)
            raise ValueError(f"cotangent: expected shape {tuple(self.outputs.shape)}, "
                             f"got {shape}")
        self._check_fresh()
        if self._out_slot is None:
            return [torch.zeros_like(p) for p in self.params]
        with autocast_context(self.autocast, self._device_type):
            grads = self._vjp(cotangent)
        if self.autocast is None:
            return grads
        return [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads, self._param_dtypes)]

    def _vjp(self, cotangent: Tensor) -> list[Tensor]:
        cots: list[Any] = [None] * self._n_slots
        owned = [False] * self._n_slots
        cots[self._out_slot] = cotangent
        for step, ins, out, _ in reversed(self._plan):
            g = cots[out]
            if g is None:
                continue
            cots[out] = None
            for s, c in zip(ins, step.vjp(g)):
                if c is not None:
                    dtype = self._slot_dtypes[s]
                    if dtype is not None and isinstance(c, Tensor) and c.dtype != dtype:
                        c = c.to(dtype)  # a cotangent in its input's dtype
                    _accumulate(cots, owned, s, c)
        grads = []
        for i, p in enumerate(self.params):
            g = cots[i]
            if g is None:
                g = torch.zeros_like(p)
            elif not owned[i] and (g is cotangent or not g.is_contiguous()):
                g = g.contiguous() if not g.is_contiguous() else g.clone()
            grads.append(g)
        return grads


def _accumulate(cots: list[Any], owned: list[bool], s: int, c: Any) -> None:
    old = cots[s]
    if old is None:
        cots[s] = c
    elif isinstance(old, tuple):
        cots[s] = tuple(b if a is None else a if b is None else a + b for a, b in zip(old, c))
    elif owned[s]:
        old.add_(c)
    else:
        cots[s] = old + c
        owned[s] = True


# --------------------------------------------------------------------------------------------
# Building: trace, one forward, rules
# --------------------------------------------------------------------------------------------

def build_engine(model: nn.Module, inputs: Sequence[Any] | Tensor,
                 ops: ModuleType = ops_torch, *, cache_trace: bool = True,
                 record: ForwardRecord | None = None,
                 output: OutputSelector = None,
                 autocast: AutocastArg = None) -> EngineLinearization:
    """Trace ``model``, run ``model(*inputs)`` once and return its rule-based linearization.

    ``ops`` provides ``linear_jvp``, ``linear_vjp``, ``layernorm_jvp`` and ``layernorm_vjp``
    (:mod:`ngtriton.linearize.ops_torch` or :mod:`ngtriton.kernels.ops`). Raises
    :class:`EngineUnsupported` with a reason when the model cannot be traced or a node cannot
    be linearized.

    The fx graph is traced once per model and reused by later builds while the module tree,
    the train/eval flags and the non-tensor inputs stay the same (``cache_trace=False`` or
    :func:`clear_trace_cache` after changing a Python attribute that ``forward`` branches on).
    Inputs may be tuples, lists or dicts of tensors (nested): they are traced by structure,
    with their tensors as inputs (see :func:`_signature_inputs`).

    ``record``: a :class:`~ngtriton.linearize.record.ForwardRecord` of ``model(*inputs)`` at the
    current parameters; Linear and activation outputs it holds are reused, not recomputed.

    ``output``: which tensor of a tuple, dict or ``ModelOutput`` the model returns is
    linearized (:func:`~ngtriton.linearize.outputs.select_output`); only what it needs is kept.

    ``autocast``: the precision (see :mod:`~ngtriton.linearize.precision`).
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    first = next(iter(model.parameters()), torch.empty(0))
    device = first.device
    precision = resolve_autocast(autocast, device, first.dtype)
    with autocast_context(precision, device.type):
        return _build_engine(model, inputs, ops, cache_trace, record, output, precision)


def _build_engine(model: nn.Module, inputs: tuple[Any, ...], ops: ModuleType, cache_trace: bool,
                  record: ForwardRecord | None, output: OutputSelector,
                  precision: torch.dtype | None) -> EngineLinearization:
    if not _plain(model):  # the trace starts at model.forward: its own hooks would not run
        raise EngineUnsupported(f"{type(model).__name__} itself has forward hooks, a "
                                "parametrization or a forward set on the instance")
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        raise EngineUnsupported("global module forward hooks are registered (the rules do not "
                                "run them)")
    graph: fx.Graph | None = None
    flat: tuple[Any, ...] = ()
    reason = ""
    try:
        concrete, flat_list, star, hidden = _signature_inputs(model, inputs)
        flat = tuple(flat_list)
        graph = _trace(model, concrete, cache=cache_trace, check=hidden, star=star)
        if getattr(graph, "_ngtriton_wrong", None):  # this cached trace failed its check
            raise EngineUnsupported(graph._ngtriton_wrong)  # type: ignore[attr-defined]
    except EngineUnsupported as err:
        graph, reason = None, err.reason
    if graph is not None and not _prefers_capture(graph, model):
        try:
            return _build(model, graph, flat, inputs, ops, record, output,
                          precision=precision)
        except EngineUnsupported as err:
            if not getattr(graph, "_ngtriton_wrong", None):
                raise
            graph, reason = None, err.reason  # the trace is another function: capture instead
    try:
        captured = capture(model, inputs, output, cache=cache_trace)
    except EngineUnsupported as err:
        if graph is None:
            raise EngineUnsupported(f"{reason}; {err.reason}") from err
        return _build(model, graph, flat, inputs, ops, record, output,  # opaque modules stay
                      precision=precision)
    return _build(model, captured.graph, captured.flat, inputs, ops, record, None, output,
                  precision=precision)


def _prefers_capture(graph: fx.Graph, model: nn.Module) -> bool:
    """Whether the fx graph leaves one of torch.nn's own layers with trainable parameters
    opaque (no rule: ``MultiheadAttention``, ``TransformerEncoderLayer``, recurrent layers), which
    the ATen capture opens up. A user's layer without submodules stays one node (its per-node
    fallback is exact, and keeps the fx graph's record of Linear outputs); a module with hooks or
    a parametrization stays opaque on purpose (it runs as called), so it never asks for the
    capture. Cached with the graph."""
    cached = getattr(graph, "_ngtriton_capture", None)
    if cached is not None:
        return cached
    wanted = False
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = model.get_submodule(str(node.target))
        if _has_module_rule(mod) or module_rule(mod) is not None:
            continue
        if not _plain(mod):
            wanted = False
            break
        if type(mod).__module__.startswith("torch.nn.") and any(
                p.requires_grad for p in mod.parameters()):
            wanted = True
    graph._ngtriton_capture = wanted  # type: ignore[attr-defined]
    return wanted


def _build(model: nn.Module, graph: fx.Graph, flat: tuple[Any, ...], inputs: tuple[Any, ...],
           ops: ModuleType, record: ForwardRecord | None, output: OutputSelector,
           check_output: OutputSelector = None, *,
           precision: torch.dtype | None = None) -> EngineLinearization:
    """Build from ``graph``; at a graph's first build, check it against the eager forward
    (``check_output`` selects from the eager result where the graph selected already)."""
    # The eager check's forward runs first, so that restoring the buffers cannot touch what
    # the build's autograd nodes saved; it draws from, and leaves, the generators as they are.
    check = not getattr(graph, "_ngtriton_checked", True)
    eager = _eager_forward(model, inputs) if check else None
    lin = EngineLinearization(*_Builder(model, graph, flat, ops, record, output).build(),
                              autocast=precision)
    if check:
        try:
            eager = select_output(eager, output if output is not None else check_output)
        except TypeError as err:
            raise EngineUnsupported(str(err)) from err
        try:
            graph._ngtriton_checked = _agrees(  # type: ignore[attr-defined]
                eager, lin.outputs, precision)
        except EngineUnsupported as err:  # the graph itself is wrong: refuse it from now on
            graph._ngtriton_wrong = str(err)  # type: ignore[attr-defined]
            raise
    return lin
