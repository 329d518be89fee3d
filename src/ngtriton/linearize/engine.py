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

import builtins
import contextlib
import copy
import enum
import inspect
import math
import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Node, map_arg
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from . import ops_torch
from .base import check_tangents
from .dropout import dropout_free
from .functions import NotLinearizable, traced_functions
from .outputs import OutputSelector, prune_steps, select_node, select_output
from .record import ForwardRecord
from .rules import (
    DROPOUT_FUNCS,
    Activation,
    AddStep,
    AutogradStep,
    ElementwiseStep,
    EmbeddingStep,
    IdentityStep,
    LayerNormStep,
    LinearStep,
    OutputEpilogue,
    ProductStep,
    ReshapeStep,
    ScaleStep,
    Step,
    TupleItemStep,
    WithoutDropout,
    build_linear_fn,
    math_attention,
)
from .state import buffers_kept as _buffers_kept

__all__ = ["EngineLinearization", "EngineUnsupported", "build_engine", "clear_trace_cache"]


class EngineUnsupported(Exception):
    """The engine cannot linearize this model; ``reason`` says why (the caller falls back)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# What has a rule
# --------------------------------------------------------------------------------------------

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_ACT_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCS: dict[Any, str] = {
    torch.tanh: "tanh", torch.tanh_: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid",
    torch.special.expit: "sigmoid",
    torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu_: "relu",
    F.silu: "silu",
}
_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu"}

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_SUB_FUNCS = {operator.sub, operator.isub, torch.sub, torch.subtract}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul, torch.multiply}
_DIV_FUNCS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide}
_NEG_FUNCS = {operator.neg, torch.neg, torch.negative}
_ARITH_METHODS = {"add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul",
                  "div": "div", "true_divide": "div", "divide": "div", "neg": "neg",
                  "negative": "neg"}

_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
                  torch.ravel}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                    "reshape_as", "contiguous", "ravel"}
# linear in their (float) tensor arguments; other arguments are structural (dims, sizes, ...)
_LINEAR_FUNCS = {torch.permute, torch.transpose, torch.t, torch.movedim, torch.moveaxis,
                 torch.swapaxes, torch.swapdims, torch.narrow, torch.select, torch.split,
                 torch.chunk, torch.unbind, torch.cat, torch.concat, torch.concatenate,
                 torch.stack, torch.hstack, torch.vstack, torch.sum, torch.mean, torch.clone,
                 torch.flip, torch.roll, torch.tile, torch.diagonal, torch.tril, torch.triu,
                 operator.getitem, builtins.getattr}
_LINEAR_METHODS = {"permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
                   "narrow", "select", "split", "chunk", "unbind", "sum", "mean", "clone", "flip",
                   "roll", "tile", "repeat", "expand", "expand_as", "diagonal", "tril", "triu",
                   "__getitem__", "to", "float", "double", "type_as"}


def _plain(m: nn.Module) -> bool:
    """Whether calling ``m`` is exactly its class's ``forward`` of its own parameters, as the
    rules assume: no forward (pre-)hooks, no parametrization (``weight_norm``, ``register_
    parametrization``), no ``forward`` set on the instance. Other modules run as opaque nodes,
    by calling them."""
    return not (m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
                or "forward" in vars(m))


def _same_forward(m: nn.Module, cls: type) -> bool:
    return isinstance(m, cls) and type(m).forward is cls.forward and _plain(m)


def _module_activation(m: nn.Module) -> Activation | None:
    if not _plain(m):
        return None
    name = _ACT_MODULES.get(type(m))
    if name is not None:
        return Activation(name)
    if type(m) is nn.GELU:
        return Activation("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if type(m) is nn.LeakyReLU:
        return Activation("leaky_relu", float(m.negative_slope))
    return None


def _embedding_ok(m: nn.Module) -> bool:
    return (_same_forward(m, nn.Embedding) and m.max_norm is None
            and not m.scale_grad_by_freq)


def _has_module_rule(m: nn.Module) -> bool:
    return (_same_forward(m, nn.Linear) or _same_forward(m, nn.LayerNorm) or _embedding_ok(m)
            or _module_activation(m) is not None or _simple_module(m, _DROPOUT_MODULES)
            or _simple_module(m, (nn.Identity, nn.Flatten, nn.Unflatten)))


def _simple_module(m: nn.Module, types: Any) -> bool:
    """``m`` is exactly one of ``types`` (no subclass), without hooks or parametrizations."""
    return type(m) in types and _plain(m)


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _method_name(node: Node) -> str:
    """A call_method's name with an in-place trailing underscore removed (``add_`` → ``add``)."""
    name = str(node.target)
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if _has_module_rule(m) or super().is_leaf_module(m, module_qualified_name):
            return True
        return next(m.children(), None) is None  # user layer without submodules: opaque node


_TRACER = _Tracer()  # for its leaf test only

_SIGNATURES: weakref.WeakKeyDictionary[type, tuple[inspect.Parameter, ...]] = \
    weakref.WeakKeyDictionary()


def _forward_params(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``model.forward``, cached per class when ``forward`` is a plain
    function defined on the class (read on every build); computed afresh otherwise."""
    cls = type(model)
    plain = "forward" not in vars(model) and inspect.isfunction(
        inspect.getattr_static(cls, "forward", None))
    if plain and cls in _SIGNATURES:
        return list(_SIGNATURES[cls])
    params: tuple[inspect.Parameter, ...] = ()
    with contextlib.suppress(TypeError, ValueError):
        params = tuple(inspect.signature(model.forward).parameters.values())
    if plain:
        _SIGNATURES[cls] = params
    return list(params)


def _holes(value: Any) -> Any:
    """``value`` with every tensor inside it (a tuple, list or dict of them) replaced by fx's
    placeholder marker: the trace then takes those tensors as inputs and specialises the rest
    (the structure, None, numbers)."""
    return fx.PH if isinstance(value, Tensor) else pytree.tree_map(
        lambda v: fx.PH if isinstance(v, Tensor) else v, value)


def _signature_inputs(model: nn.Module, inputs: Sequence[Any]
                      ) -> tuple[dict[str, Any], list[Any], tuple[Any, ...], bool]:
    """The trace's ``concrete_args``; the values of its placeholders, in fx's order
    (positional parameters, keyword-only ones, ``*args``, ``**kwargs``); the ``*args`` values;
    and whether tensors reach ``forward`` inside containers or ``*args`` (see :func:`_agrees`).

    A non-tensor input, and the default of a parameter not given, is specialised: None and
    numbers as values, containers as their structure with their tensors as inputs. fx makes
    one placeholder per pytree leaf of a specialised value, so those placeholders take the
    flattened value; ``*args`` is one placeholder (the tuple of the extra inputs), ``**kwargs``
    another (empty)."""
    sig_params = _forward_params(model)
    if not sig_params:
        return {}, list(inputs), (), False
    positional = [p for p in sig_params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in sig_params)
    if len(inputs) > len(positional) and not var_positional:
        raise EngineUnsupported(f"{type(model).__name__}.forward takes {len(positional)} "
                                f"inputs, got {len(inputs)}")
    concrete: dict[str, Any] = {}
    flat: list[Any] = []
    named = [p for p in sig_params if p.kind != p.VAR_POSITIONAL and p.kind != p.VAR_KEYWORD]
    for i, p in enumerate(named):  # positional ones first, as inspect lists them
        if i < len(positional) and i < len(inputs):
            value = inputs[i]
            if isinstance(value, Tensor):
                flat.append(value)
                continue
        elif p.default is not p.empty:
            value = p.default
        else:
            raise EngineUnsupported(f"input {p.name!r} was not given")
        concrete[p.name] = _holes(value)
        flat.extend(pytree.tree_leaves(value))
    extra = tuple(inputs[len(positional):])
    if var_positional:
        flat.append(extra)
    if any(p.kind == p.VAR_KEYWORD for p in sig_params):
        flat.append({})
    hidden = bool(extra) or any(isinstance(v, list | tuple | dict) and any(
        leaf is fx.PH for leaf in pytree.tree_leaves(v)) for v in concrete.values())
    return concrete, flat, extra if var_positional else (), hidden


def _trace(model: nn.Module, concrete: dict[str, Any], cache: bool = True,
           check: bool = False, star: tuple[Any, ...] = ()) -> fx.Graph:
    """The fx graph of ``model`` (cached, see :func:`_trace_key`; ``star``: the ``*args``
    values, keyed like specialised inputs since ``forward`` may test what they are);
    ``check``: a new trace must pass :func:`_agrees` at its first build."""
    key = (_trace_key(model, {**concrete, "*": _holes(star)} if star else concrete)
           if cache else None)
    cached = _TRACE_CACHE.get(model) if key is not None else None
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with warnings.catch_warnings(), _buffers_kept(model, values=False), \
                traced_functions():  # it runs forward; an autograd.Function is one node
            warnings.filterwarnings("ignore", "Was not able to add assertion")  # object inputs
            graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as err:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        msg = str(err).strip().splitlines()
        first = msg[0] if msg else ""
        raise EngineUnsupported(f"torch.fx cannot trace {type(model).__name__} "
                                f"({type(err).__name__}: {first})") from err
    _reject_visible_mutation(graph, model)
    if key is not None:
        if cached is not None and str(graph) == str(cached[1]):
            graph = cached[1]  # a flag or an attribute changed, the trace did not
            graph.__dict__.pop("_ngtriton_plan", None)  # the plan reads flags: make it anew
        _TRACE_CACHE[model] = (key, graph)
    if check:  # a check made with other inputs says nothing of these
        graph._ngtriton_checked = False  # type: ignore[attr-defined]
        graph.__dict__.pop("_ngtriton_wrong", None)
    return graph


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ipow, operator.imatmul}


def _mutates_first_arg(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` writes into its first argument (``x.mul_``, ``inplace=True``, ``+=``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_")
                                                     and not name.startswith("__"))
    if node.op == "call_module":
        return getattr(model.get_submodule(str(node.target)), "inplace", False) is True
    return False


def _reject_visible_mutation(graph: fx.Graph, model: nn.Module) -> None:
    """Raise EngineUnsupported when an in-place op changes a value something else reads.

    The engine evaluates every op out of place; that is exact unless the mutated value has
    another reader (``h.mul_(2); return h``, or ``relu(h, inplace=True) + h``), whose view
    of it would then differ from eager PyTorch's.
    """
    for node in graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if _mutates_first_arg(node, model) and len(node.args[0].users) > 1:
            raise EngineUnsupported(f"node {node.name!r} modifies {node.args[0].name!r} in "
                                    "place while another operation reads it")


_TRACE_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, fx.Graph]] = (
    weakref.WeakKeyDictionary())


@dataclass
class _Plan:
    root: weakref.ref  # the traced model (weak: the trace cache is keyed by it)
    nodes: list[Node]
    out_node: Node
    live: set[Node]
    fused: dict[Node, Node]
    modules: dict[Node, nn.Module]



def _trace_key(model: nn.Module, concrete: dict[str, Any]) -> Any:
    """What a traced graph depends on: the module tree, train/eval flags, hooks, specialised
    inputs and the plain attributes of traced-through modules. (A forward that updates one on
    every call, a counter, is traced again at every build: correct, slower.)"""
    spec = []
    for name, value in sorted(concrete.items()):
        leaves, structure = pytree.tree_flatten(value)
        if not all(v is fx.PH or isinstance(v, _KEYS) for v in leaves):
            return None  # an object whose equality says nothing of its contents: trace anew
        # typed: 1, 1.0 and True are equal but a forward may tell them apart
        spec.append((name, tuple((type(v), v) for v in leaves), structure))
    leaf = _TRACER.is_leaf_module
    return (tuple((name, id(m), type(m), m.training, _plain(m),
                   None if leaf(m, name) else _attributes(m))
                  for name, m in model.named_modules()), tuple(spec))


_SCALARS = (bool, int, float, str, type(None))
_KEYS = (*_SCALARS, complex, enum.Enum, torch.dtype, torch.device, torch.Size)  # trace keys


def _attributes(m: nn.Module) -> tuple:
    """The plain Python attributes of ``m`` (numbers, strings, flags, None, tuples of them): a
    traced-through ``forward`` that reads one is specialised to its value by the trace, so a
    change must invalidate the cached graph. (Leaf modules are read when a build runs.)"""
    return tuple((k, v) for k, v in vars(m).items()
                 if isinstance(v, _SCALARS) or (isinstance(v, tuple)
                                                 and all(isinstance(e, _SCALARS) for e in v)))


def clear_trace_cache(model: nn.Module | None = None) -> None:
    """Forget the cached fx graph of ``model`` (of every model when ``None``)."""
    if model is None:
        _TRACE_CACHE.clear()
    else:
        _TRACE_CACHE.pop(model, None)


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


# --------------------------------------------------------------------------------------------
# The linearization
# --------------------------------------------------------------------------------------------

class EngineLinearization:
    """A model linearized by per-node rules (see the module docstring).

    ``params``, ``outputs``, ``jvp`` and ``vjp`` follow :class:`~ngtriton.linearize.Linearization`.
    ``steps`` lists the rules in execution order; ``fallbacks`` names the nodes that use the
    per-node autograd fallback (no dedicated rule).
    """

    def __init__(self, params: list[Tensor], outputs: Tensor, steps: list[Step],
                 n_slots: int, out_slot: int | None, fallbacks: list[str]) -> None:
        self.params = params
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
            vals[out] = step.jvp(args) if i != fused else step.jvp(args, epilogue)
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
                 output: OutputSelector = None) -> EngineLinearization:
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
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    if not _plain(model):  # the trace starts at model.forward: its own hooks would not run
        raise EngineUnsupported(f"{type(model).__name__} itself has forward hooks, a "
                                "parametrization or a forward set on the instance")
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        raise EngineUnsupported("global module forward hooks are registered (the rules do not "
                                "run them)")
    concrete, flat, star, hidden = _signature_inputs(model, inputs)
    graph = _trace(model, concrete, cache=cache_trace, check=hidden, star=star)
    if getattr(graph, "_ngtriton_wrong", None):  # this cached trace failed its check
        raise EngineUnsupported(graph._ngtriton_wrong)  # type: ignore[attr-defined]
    # The eager check's forward runs first, so that restoring the buffers cannot touch what
    # the build's autograd nodes saved; it draws from, and leaves, the generators as they are.
    check = not getattr(graph, "_ngtriton_checked", True)
    eager = _eager_forward(model, inputs) if check else None
    lin = _Builder(model, graph, tuple(flat), ops, record, output).build()
    if check:
        try:
            eager = select_output(eager, output)
        except TypeError as err:
            raise EngineUnsupported(str(err)) from err
        try:
            graph._ngtriton_checked = _agrees(eager, lin.outputs)  # type: ignore[attr-defined]
        except EngineUnsupported as err:  # the trace itself is wrong: refuse it from now on
            graph._ngtriton_wrong = str(err)  # type: ignore[attr-defined]
            raise
    return lin


def _eager_forward(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``model(*inputs)`` as the engine sees it (no grad, dropout off, math attention), with
    the random generators and the buffers left as they were (:func:`_buffers_kept`). Any
    error: EngineUnsupported. It runs before the build, so that putting the buffers back cannot
    touch what the build's nodes saved."""
    devices = sorted({p.device for p in model.parameters() if p.is_cuda}, key=str)
    try:
        with _buffers_kept(model), torch.random.fork_rng(devices=devices), torch.no_grad(), \
                WithoutDropout(), math_attention():
            return model(*inputs)
    except Exception as err:
        raise EngineUnsupported(f"the model's eager forward, run to check the trace, failed "
                                f"({type(err).__name__}: {err})") from err


def _agrees(eager: Any, outputs: Tensor) -> bool:
    """Check a new trace's outputs against the eager forward's; raise EngineUnsupported if they
    differ. False when they are not finite (nothing to judge; checked at the next build).

    fx traces with stand-ins that are not tensors, so a ``forward`` that asks
    ``isinstance(v, Tensor)`` or ``torch.is_tensor(v)`` of an input takes the other branch in
    the trace than in eager PyTorch: the graph is then a different function."""
    if not isinstance(eager, Tensor) or eager.shape != outputs.shape:
        got = tuple(eager.shape) if isinstance(eager, Tensor) else type(eager).__name__
        raise EngineUnsupported(f"the traced graph returns shape {tuple(outputs.shape)}, the "
                                f"model {got}")
    eager, got = eager.detach().double(), outputs.double()
    if not (bool(torch.isfinite(eager).all()) and bool(torch.isfinite(got).all())):
        return False
    tol = math.sqrt(torch.finfo(outputs.dtype).eps)  # far above rounding, far below a branch
    if float((got - eager).norm()) > tol * max(float(eager.norm()), 1e-30):
        raise EngineUnsupported("the traced graph computes another function than the model "
                                "(does forward test isinstance(..., Tensor) of an input?)")
    return True


class _Builder:
    def __init__(self, root: nn.Module, graph: fx.Graph, inputs: tuple[Any, ...],
                 ops: ModuleType, record: ForwardRecord | None = None,
                 output: OutputSelector = None) -> None:
        self.root, self.graph, self.inputs, self.ops = root, graph, inputs, ops
        self.record, self.output = record, output
        self.params = [p for p in root.parameters() if p.requires_grad]
        self.pslot = {id(p): i for i, p in enumerate(self.params)}
        self.n_slots = len(self.params)
        self.values: dict[Node, Any] = {}
        self.slots: dict[Node, int] = {}
        self.steps: list[Step] = []
        self.fallbacks: list[str] = []
        self.fused: dict[Node, Node] = {}  # activation node -> the Linear node fused into it
        self.modules: dict[Node, nn.Module] = {}  # call_module node -> its module

    # -- small helpers ------------------------------------------------------------------------
    def _val(self, a: Any) -> Any:
        return map_arg(a, lambda n: self.values[n])

    def _slot(self, a: Any) -> int | None:
        return self.slots.get(a) if isinstance(a, Node) else None

    def _param(self, p: Tensor | None) -> tuple[Tensor | None, int | None]:
        if p is None:
            return None, None
        return p.detach(), self.pslot.get(id(p))

    def _src(self, a: Any) -> tuple[Any, int | None]:
        return self._val(a), self._slot(a)

    def _recorded(self, node: Node | None, x: Tensor) -> Tensor | None:
        """The recorded output of the module that ``node`` calls, if it is that module at ``x``."""
        if self.record is None or node is None or node.op != "call_module":
            return None
        return self.record.lookup(self._module(node), x)

    def _add(self, node: Node, step: Step, value: Any) -> None:
        step.out_slot = self.n_slots
        step.label = node.name
        self.n_slots += 1
        self.slots[node] = step.out_slot
        self.steps.append(step)
        self.values[node] = value

    def _runner(self, node: Node, out_of_place: bool = False) -> Callable[[tuple, dict], Any]:
        """``run(args, kwargs)`` executes the node (in-place methods out of place if asked)."""
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))

            def call(a: tuple, k: dict) -> Any:
                with WithoutDropout():
                    return mod(*a, **k)
            return call
        if node.op == "call_method":
            name = _method_name(node) if out_of_place else str(node.target)
            return lambda a, k: getattr(a[0], name)(*a[1:], **k)
        return dropout_free(node.target)

    @staticmethod
    def _closure(node: Node, run: Callable[..., Any], active: list[Node],
                 consts: dict[Node, Any], with_rest: bool = False) -> Callable[..., Any]:
        """``fn(*active_values, *rest)``: the node with its active inputs replaced."""
        n_act = len(active)

        def fn(*ts: Any) -> Any:
            sub = dict(zip(active, ts[:n_act]))

            def look(n: Node) -> Any:
                return sub[n] if n in sub else consts[n]

            a, k = map_arg(node.args, look), map_arg(node.kwargs, look)
            return run(a, k, ts[n_act:]) if with_rest else run(a, k)

        return fn

    # -- the pass -----------------------------------------------------------------------------
    def _plan(self) -> _Plan:
        """What depends on the graph alone (cached with it): the nodes, the live set, the
        Linear → activation fusions and each call_module node's module."""
        plan = getattr(self.graph, "_ngtriton_plan", None)
        if plan is not None and plan.root() is self.root:
            return plan
        nodes = list(self.graph.nodes)
        out_node = next(n for n in nodes if n.op == "output")
        live: set[Node] = set()
        stack = [out_node]
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.all_input_nodes)
        fused: dict[Node, Node] = {}
        for n in nodes:
            act = self._activation(n)
            src = _arg(n, 0, "input")
            if (act is not None and n in live and isinstance(src, Node)
                    and self._is_linear(src) and len(src.users) == 1):
                fused[n] = src
        modules = {n: self.root.get_submodule(str(n.target)) for n in nodes
                   if n.op == "call_module"}
        plan = _Plan(weakref.ref(self.root), nodes, out_node, live, fused, modules)
        self.graph._ngtriton_plan = plan  # type: ignore[attr-defined]  # dies with the graph
        return plan

    def build(self) -> EngineLinearization:
        plan = self._plan()
        nodes, out_node, live = plan.nodes, plan.out_node, plan.live
        self.modules = plan.modules
        self.fused = dict(plan.fused)
        skip = set(self.fused.values())

        n_placeholder = 0
        with torch.no_grad():
            for node in nodes:
                if node.op == "placeholder":
                    if n_placeholder < len(self.inputs):
                        self.values[node] = self.inputs[n_placeholder]
                    elif node.args:
                        self.values[node] = node.args[0]
                    else:
                        raise EngineUnsupported(f"input {node.target!r} was not given")
                    n_placeholder += 1
                elif node.op == "get_attr":
                    obj = _fetch_attr(self.root, str(node.target))
                    if isinstance(obj, Tensor):
                        slot = self.pslot.get(id(obj))
                        if slot is not None:
                            self.slots[node] = slot
                        obj = obj.detach()
                    self.values[node] = obj
                elif node.op == "output":
                    break
                elif node in skip:
                    continue
                else:
                    try:
                        self._node(node, node in live)
                    except (EngineUnsupported, NotLinearizable):
                        raise
                    except Exception as err:
                        raise EngineUnsupported(
                            f"node {node.name!r} ({node.op} {_target_name(node)}) failed: "
                            f"{type(err).__name__}: {err}") from err

        out_arg = out_node.args[0]
        codegen = getattr(self.graph, "_codegen", None)
        out_spec = (codegen.pytree_info.out_spec if isinstance(codegen, fx.graph._PyTreeCodeGen)
                    else None)
        try:
            if out_spec is not None:  # inputs given as containers: fx returns the flat outputs
                out_arg = (out_arg[0] if out_spec.is_leaf()
                           else pytree.tree_unflatten(list(out_arg), out_spec))
            out_arg = select_node(out_arg, self.output, self.values)
        except Exception as err:  # e.g. a ModelOutput built in the graph: select from values
            kind = type(out_arg).__name__.removeprefix("immutable_")  # fx's list and dict
            raise EngineUnsupported(f"the model returns {kind}; no tensor to linearize found "
                                    f"in the graph ({type(err).__name__}: {err})") from err
        out_val = self._val(out_arg)
        out_slot = self._slot(out_arg)
        outputs = out_val.detach()
        self.values.clear()
        return EngineLinearization(self.params, outputs, self.steps, self.n_slots, out_slot,
                                   self.fallbacks)

    # -- classification -------------------------------------------------------------------------
    def _module(self, node: Node) -> nn.Module:
        mod = self.modules.get(node)
        return self.root.get_submodule(str(node.target)) if mod is None else mod

    def _activation(self, node: Node) -> Activation | None:
        if node.op == "call_module":
            return _module_activation(self._module(node))
        if node.op == "call_method":
            name = _ACT_METHODS.get(_method_name(node))
            return Activation(name) if name else None
        if node.op != "call_function":
            return None
        t = node.target
        if t is F.gelu:
            approx = _arg(node, 1, "approximate", "none")
            return Activation("gelu_tanh" if approx == "tanh" else "gelu")
        if t is F.leaky_relu or t is F.leaky_relu_:
            return Activation("leaky_relu", float(_arg(node, 1, "negative_slope", 0.01)))
        try:
            name = _ACT_FUNCS.get(t)  # type: ignore[arg-type]
        except TypeError:  # unhashable target
            return None
        return Activation(name) if name else None

    def _is_linear(self, node: Node) -> bool:
        if node.op == "call_module":
            return _same_forward(self._module(node), nn.Linear)
        return node.op == "call_function" and node.target is F.linear

    # -- one node -----------------------------------------------------------------------------
    def _node(self, node: Node, live: bool) -> None:
        mod = self.modules.get(node)
        active_in = [n for n in node.all_input_nodes if n in self.slots]
        if node in self.fused:
            self._linear(self.fused[node], self._activation(node), node)
            self.values[node] = self.values.pop(self.fused[node])
            if self.fused[node] in self.slots:
                self.slots[node] = self.slots.pop(self.fused[node])
                self.steps[-1].label = node.name
            return
        if not live or not (active_in or (mod is not None and any(
                p.requires_grad for p in mod.parameters()))):
            self.values[node] = self._inactive(node, mod)
            return
        if mod is not None:
            self._module_node(node, mod)
        else:
            self._function_node(node, active_in)

    def _is_dropout(self, node: Node, mod: nn.Module | None) -> bool:
        if mod is not None:
            return _simple_module(mod, _DROPOUT_MODULES)
        return node.op == "call_function" and node.target in DROPOUT_FUNCS

    def _inactive(self, node: Node, mod: nn.Module | None) -> Any:
        args, kwargs = self._val(node.args), self._val(node.kwargs)
        if self._is_dropout(node, mod):
            return args[0] if args else kwargs["input"]
        return self._runner(node)(args, kwargs)

    def _module_node(self, node: Node, mod: nn.Module) -> None:
        x_arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        x, x_slot = self._src(x_arg)
        simple = len(node.args) + len(node.kwargs) == 1
        if simple and _same_forward(mod, nn.Linear):
            self._linear(node, None)
            return
        act = _module_activation(mod)
        if simple and act is not None and x_slot is not None:
            y = self._recorded(node, x)
            value, dact = act.forward(x, owned=False) if y is None else (y, act.derivative(x, y))
            self._add(node, ElementwiseStep(x_slot, dact), value)
            return
        if simple and _same_forward(mod, nn.LayerNorm):
            w, w_slot = self._param(mod.weight)
            b, b_slot = self._param(mod.bias)
            self._layernorm(node, x, x_slot, tuple(mod.normalized_shape), w, w_slot, b, b_slot,
                            mod.eps)
            return
        if simple and _embedding_ok(mod):
            w, w_slot = self._param(mod.weight)
            value = F.embedding(x, w, mod.padding_idx)
            if w_slot is None:
                self.values[node] = value
                return
            self._add(node, EmbeddingStep(x, w_slot, mod.num_embeddings, mod.embedding_dim,
                                          mod.padding_idx), value)
            return
        if simple and x_slot is not None and _simple_module(mod, (*_DROPOUT_MODULES,
                                                                  nn.Identity)):
            self._add(node, IdentityStep(x_slot), x)
            return
        if simple and x_slot is not None and _simple_module(mod, (nn.Flatten, nn.Unflatten)):
            value = mod(x)
            self._add(node, ReshapeStep(x_slot, x.shape, value.shape), value)
            return
        self._opaque_module(node, mod)

    def _opaque_module(self, node: Node, mod: nn.Module) -> None:
        active = [n for n in node.all_input_nodes if n in self.slots]
        named = [(n, p) for n, p in mod.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        consts = {n: self.values[n] for n in node.all_input_nodes}
        clone_inputs = bool(getattr(mod, "inplace", False))

        def run(a: tuple, k: dict, ps: tuple) -> Any:
            if clone_inputs:
                a = tuple(t.clone() if isinstance(t, Tensor) else t for t in a)
            with WithoutDropout():  # a dropout inside (or a hooked Dropout) is the identity too
                return torch.func.functional_call(mod, dict(zip(names, ps)), a, k)

        fn = self._closure(node, run, active, consts, with_rest=True)
        primals = [self.values[n] for n in active] + [p.detach() for _, p in named]
        slots = [self.slots[n] for n in active] + [self.pslot[id(p)] for _, p in named]
        self._autograd(node, fn, primals, slots)

    def _autograd(self, node: Node, fn: Callable[..., Any], primals: list[Tensor],
                  slots: list[int]) -> None:
        step = AutogradStep(slots, fn, primals)
        if not step.active:
            self.values[node] = step.value
            return
        self._add(node, step, step.value)
        self.fallbacks.append(f"{node.name} ({_target_name(node)})")

    def _linear(self, node: Node, act: Activation | None, act_node: Node | None = None) -> None:
        """A Linear node, with the activation ``act`` (computed by ``act_node``) fused in."""
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))
            x, x_slot = self._src(node.args[0] if node.args else node.kwargs["input"])
            w, w_slot = self._param(mod.weight)
            b, b_slot = self._param(mod.bias)
        else:
            x, x_slot = self._src(_arg(node, 0, "input"))
            w, w_slot = self._src(_arg(node, 1, "weight"))
            b, b_slot = self._src(_arg(node, 2, "bias"))
        x_shape = x.shape
        x2 = x.reshape(-1, w.shape[1])
        out_shape = (*x_shape[:-1], w.shape[0])
        s = self._recorded(node, x)
        dact = None
        if s is None:
            s = F.linear(x2, w, b)
            if act is not None:
                s, dact = act.forward(s, owned=True)
        elif act is not None:
            y = self._recorded(act_node, s)
            s = s.reshape(-1, w.shape[0])
            s, dact = (act.forward(s, owned=False) if y is None
                       else (y.reshape(s.shape), act.derivative(s, y.reshape(s.shape))))
        value = s.reshape(out_shape)
        if x_slot is None and w_slot is None and b_slot is None:
            self.values[node] = value
            return
        step = LinearStep(self.ops, x2, w, dact, x_slot, w_slot, b_slot, x_shape, value.shape)
        self._add(node, step, value)

    def _layernorm(self, node: Node, x: Tensor, x_slot: int | None, shape: tuple[int, ...],
                   w: Tensor | None, w_slot: int | None, b: Tensor | None, b_slot: int | None,
                   eps: float) -> None:
        k = len(shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(shape):
            raise EngineUnsupported(f"node {node.name!r}: LayerNorm shape {shape} does not "
                                    f"match input {tuple(x.shape)}")
        d = math.prod(shape)
        x2 = x.reshape(-1, d)
        wf = None if w is None else w.reshape(d)
        bf = None if b is None else b.reshape(d)
        y, mean, rstd = torch.native_layer_norm(x2, [d], wf, bf, eps)
        value = y.view(x.shape)
        if x_slot is None and w_slot is None and b_slot is None:
            self.values[node] = value
            return
        xhat = (x2 - mean).mul_(rstd)
        step = LayerNormStep(self.ops, xhat, rstd, wf, x_slot, w_slot, b_slot, x.shape,
                             torch.Size(shape))
        self._add(node, step, value)

    def _function_node(self, node: Node, active: list[Node]) -> None:
        op, t = node.op, node.target
        name = _method_name(node) if op == "call_method" else None
        if op == "call_function" and t is F.linear:
            self._linear(node, None)
            return
        act = self._activation(node)
        if act is not None:
            x, x_slot = self._src(_arg(node, 0, "input"))
            if x_slot is not None:
                value, dact = act.forward(x, owned=False)
                self._add(node, ElementwiseStep(x_slot, dact), value)
                return
        if op == "call_function" and t is F.layer_norm:
            x, x_slot = self._src(_arg(node, 0, "input"))
            shape = tuple(self._val(_arg(node, 1, "normalized_shape")))
            w, w_slot = self._src(_arg(node, 2, "weight"))
            b, b_slot = self._src(_arg(node, 3, "bias"))
            self._layernorm(node, x, x_slot, shape, w, w_slot, b, b_slot,
                            float(_arg(node, 4, "eps", 1e-5)))
            return
        if op == "call_function" and t in DROPOUT_FUNCS:
            x, x_slot = self._src(_arg(node, 0, "input"))
            if x_slot is not None:
                self._add(node, IdentityStep(x_slot), x)
                return
        kind = self._arith_kind(node, name)
        if kind is not None and self._arith(node, kind):
            return
        if (op == "call_function" and t is operator.getitem
                and isinstance(self.values.get(node.args[0]), (tuple, list))):
            seq, slot = self._src(node.args[0])
            idx = node.args[1]
            if slot is not None and isinstance(idx, int):
                value = seq[idx]
                if _is_float(value):
                    self._add(node, TupleItemStep(slot, idx, len(seq)), value)
                else:
                    self.values[node] = value
                return
        run = self._runner(node, out_of_place=True)
        consts = {n: self.values[n] for n in node.all_input_nodes}
        reshape = ((op == "call_function" and t in _RESHAPE_FUNCS)
                   or (name is not None and name in _RESHAPE_METHODS))
        linear = ((op == "call_function" and t in _LINEAR_FUNCS)
                  or (name is not None and name in _LINEAR_METHODS))
        if reshape and len(active) == 1:
            x = self.values[active[0]]
            value = run(self._val(node.args), self._val(node.kwargs))
            if not _is_float(value):
                self.values[node] = value
                return
            if value.numel() == x.numel() and value.dtype == x.dtype:
                self._add(node, ReshapeStep(self.slots[active[0]], x.shape, value.shape), value)
                return
            linear = True
        elif reshape:
            linear = True
        if linear:
            fn = self._closure(node, run, active, consts)
            zeros = {n: (torch.zeros_like(v) if _is_float(v) else v) for n, v in consts.items()}
            tangent_fn = self._closure(node, run, active, zeros)
            primals = [self.values[n] for n in active]
            if all(isinstance(p, Tensor) for p in primals):
                value, step = build_linear_fn(fn, tangent_fn, primals,
                                              [self.slots[n] for n in active])
                if step is None:
                    self.values[node] = value
                else:
                    self._add(node, step, value)
                return
        if any(not isinstance(self.values[n], Tensor) for n in active):
            raise EngineUnsupported(f"node {node.name!r} ({op} {_target_name(node)}): an "
                                    "input is a tuple of active values; no rule for that")
        if node.kwargs.get("inplace"):
            run_inplace = run
            run = lambda a, k: run_inplace(a, {**k, "inplace": False})  # noqa: E731
        fn = self._closure(node, run, active, consts)
        self._autograd(node, fn, [self.values[n] for n in active],
                       [self.slots[n] for n in active])

    # -- arithmetic -----------------------------------------------------------------------------
    def _arith_kind(self, node: Node, name: str | None) -> str | None:
        if name is not None:
            return _ARITH_METHODS.get(name)
        if node.op != "call_function":
            return None
        t = node.target
        try:
            if t in _ADD_FUNCS:
                return "add"
            if t in _SUB_FUNCS:
                return "sub"
            if t in _MUL_FUNCS:
                return "mul"
            if t in _DIV_FUNCS:
                return "div"
            if t in _NEG_FUNCS:
                return "neg"
        except TypeError:
            return None
        return None

    def _arith(self, node: Node, kind: str) -> bool:
        """Build add/sub/mul/div/neg; False when the pattern needs the generic fallback."""
        a_arg = _arg(node, 0, "input")
        a, a_slot = self._src(a_arg)
        run = self._runner(node, out_of_place=True)
        if kind == "neg":
            out = run(self._val(node.args), self._val(node.kwargs))
            self._add(node, ScaleStep(a_slot, -1.0, False, a.shape, out.shape), out)
            return True
        b_arg = _arg(node, 1, "other")
        b, b_slot = self._src(b_arg)
        extra = set(node.kwargs) - {"input", "other", "alpha"}
        if extra or not all(isinstance(v, (Tensor, int, float)) for v in (a, b)):
            return False
        if kind == "div" and (b_slot is not None or _arg(node, 2, "rounding_mode") is not None):
            return False
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, Node) or (len(node.args) > 2 and kind in ("add", "sub")):
            return False
        out = run(self._val(node.args), self._val(node.kwargs))
        if not _is_float(out):
            return False
        if kind in ("add", "sub"):
            coef_b = float(alpha) * (-1.0 if kind == "sub" else 1.0)
            slots, coefs, shapes = [], [], []
            for v, s, c in ((a, a_slot, 1.0), (b, b_slot, coef_b)):
                if s is not None:
                    slots.append(s)
                    coefs.append(c)
                    shapes.append(v.shape)
            self._add(node, AddStep(slots, coefs, shapes, out.shape), out)
            return True
        if a_slot is not None and b_slot is not None:
            self._add(node, ProductStep(a_slot, b_slot, a, b), out)
            return True
        if a_slot is None:
            a, b, a_slot = b, a, b_slot
        if not isinstance(a, Tensor):
            return False
        self._add(node, ScaleStep(a_slot, b, kind == "div", a.shape, out.shape), out)
        return True


def _target_name(node: Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
