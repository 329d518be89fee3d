"""Tracing a model with :mod:`torch.fx`, and the cache of its graphs.

The trace starts at ``model.forward`` and stops at the modules :func:`is_leaf` names (those with
a rule, torch.nn's built-in layers, user layers without submodules). Non-tensor inputs are
specialised; the graph is cached per model and keyed by what it depends on (:func:`_trace_key`).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import operator
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .base import EngineUnsupported
from .classify import _has_module_rule, _plain
from .functions import traced_functions
from .state import buffers_kept as _buffers_kept


class _Tracer(fx.Tracer):
    # buffers read in a traced-through forward become graph nodes, read at every build: a
    # ``buffer.item()`` or ``float(buffer)`` is then evaluated anew, never baked into the trace
    proxy_buffer_attributes = True

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
    reused = False
    if key is not None:
        if cached is not None and str(graph) == str(cached[1]):
            graph = cached[1]  # a flag or an attribute changed, the trace did not
            graph.__dict__.pop("_ngtriton_plan", None)  # the plan reads flags: make it anew
            reused = True
        _TRACE_CACHE[model] = (key, graph)
    if check or not reused:  # a new trace, or one checked with other inputs: check it
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
    """The plain Python attributes of ``m`` (numbers, strings, flags, None, and tuples, lists
    and dicts of them, copied), and the shape, dtype and device of its tensor attributes that
    are neither parameters nor buffers: a traced-through ``forward`` that reads one is
    specialised to it by the trace, so a change must invalidate the cached graph. (Leaf modules
    are read when a build runs.)"""
    out = []
    for k, v in vars(m).items():
        if isinstance(v, Tensor):
            out.append((k, Tensor, tuple(v.shape), v.dtype, v.device))
            continue
        plain = _plain_value(v)
        if plain is not _OPAQUE:
            out.append((k, plain))
    return tuple(out)


_OPAQUE = object()


def _plain_value(v: Any, depth: int = 0) -> Any:
    """A comparable copy of a scalar or of a (nested, small) container of scalars; ``_OPAQUE``
    for anything else."""
    if isinstance(v, _SCALARS):
        return (type(v), v)
    if depth > 3 or not isinstance(v, (tuple, list, dict)) or len(v) > 64:
        return _OPAQUE
    if isinstance(v, dict):
        if not all(isinstance(k, _SCALARS) for k in v):
            return _OPAQUE
        items = [(k, _plain_value(e, depth + 1)) for k, e in v.items()]
        return _OPAQUE if any(e is _OPAQUE for _, e in items) else (dict, tuple(items))
    items = [_plain_value(e, depth + 1) for e in v]
    return _OPAQUE if any(e is _OPAQUE for e in items) else (type(v), tuple(items))


def clear_trace_cache(model: nn.Module | None = None) -> None:
    """Forget the cached fx graph of ``model`` (of every model when ``None``)."""
    if model is None:
        _TRACE_CACHE.clear()
    else:
        _TRACE_CACHE.pop(model, None)
