"""Capturing a model at the ATen level with :func:`torch.export.export`, where fx cannot go.

:mod:`torch.fx` traces with stand-ins, so a ``forward`` with Python control flow on its inputs
(Hugging Face models, ``torch.arange(x.size(1))``) fails to trace, and torch.nn's built-in
layers (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) stay opaque. ``torch.export``
in non-strict mode runs ``forward`` as Python on fake tensors and records every ATen op: control
flow is specialised, modules are traced through. The graph is specialised to the input shapes,
dtypes and non-tensor values, so it is cached per model and keyed by them, and captured anew
when they change.

The captured graph is rewritten for the builder: its parameter, buffer and constant placeholders
take the model's own tensors (so the trainable parameters keep their slots), and its output is
the one tensor that ``output=`` selects. A custom ``torch.autograd.Function`` would be traced
through (its forward's ops differentiated, not its own backward): a capture that meets one is
refused.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .base import EngineUnsupported
from .collapse import collapse_activations
from .outputs import OutputSelector, select_output
from .precision import ambient_autocast
from .trace import _KEYS, _attributes, _plain

__all__ = ["Captured", "capture", "clear_capture_cache"]

_Function = torch.autograd.function.Function


@dataclass
class Captured:
    """An ATen graph of ``model`` and the values of its placeholders, in order (the model's
    parameters, buffers and constants, then the flattened inputs)."""

    graph: fx.Graph
    flat: tuple[Any, ...]


class _Selected(nn.Module):
    """``model`` returning the one tensor ``output`` selects: what gets exported."""

    def __init__(self, model: nn.Module, output: OutputSelector) -> None:
        super().__init__()
        self.m = model
        self._output = output

    def forward(self, *inputs: Any) -> Tensor:
        return select_output(self.m(*inputs), self._output)


@contextlib.contextmanager
def _functions_seen(seen: list[type]) -> Iterator[None]:
    """While active, note the custom ``autograd.Function`` classes applied (torch's own are
    fine: their ops are what they differentiate)."""
    original = _Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith("torch."):
            seen.append(cls)
        return original.__func__(cls, *args, **kwargs)

    _Function.apply = classmethod(apply)  # type: ignore[assignment]
    try:
        yield
    finally:
        _Function.apply = original  # type: ignore[assignment]


# per model: key → (graph, placeholder names), or the EngineUnsupported its capture raised
_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Any, Any]]
_CACHE = weakref.WeakKeyDictionary()
CACHE_SIZE = 4  # graphs kept per model (a last, shorter batch; train and eval)


def clear_capture_cache(model: nn.Module | None = None) -> None:
    """Forget the captured graph of ``model`` (of every model when ``None``)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def _key(model: nn.Module, inputs: Sequence[Any], output: OutputSelector) -> Any:
    """What a captured graph depends on: the module tree, its flags and plain attributes (and
    those of a Hugging Face ``config``), the inputs' shapes, dtypes and devices, the non-tensor
    inputs and the output selector; None when something in it cannot be compared."""
    leaves, spec = pytree.tree_flatten(tuple(inputs))
    described = []
    for v in leaves:
        if isinstance(v, Tensor):
            described.append((Tensor, tuple(v.shape), v.dtype, v.device, v.requires_grad))
        elif isinstance(v, _KEYS):
            described.append((type(v), v))
        else:
            return None
    modules = []
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        extra = () if config is None else tuple(
            (k, v) for k, v in sorted(vars(config).items()) if isinstance(v, _KEYS))
        modules.append((name, id(m), type(m), m.training, _plain(m), _attributes(m), extra))
    hooks = torch.nn.modules.module
    precision = tuple(ambient_autocast(d) for d in ("cpu", "cuda"))  # an export under autocast
    tensors = tuple((t.dtype, t.device, t.requires_grad) for t in (
        *model.parameters(), *model.buffers()))  # .double(), .to(device), freezing
    return (tuple(modules), tuple(described), spec, repr(output), tensors,
            len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks), precision)


def capture(model: nn.Module, inputs: Sequence[Any], output: OutputSelector = None,
            cache: bool = True) -> Captured:
    """The ATen graph of ``model(*inputs)`` (selected by ``output``) and its placeholder values.

    Raises :class:`EngineUnsupported` when ``torch.export`` fails (data-dependent control flow,
    an unsupported op) or when the forward applies a custom ``autograd.Function``."""
    key = _key(model, inputs, output) if cache else None
    entries = _CACHE.setdefault(model, OrderedDict()) if key is not None else None
    if entries is not None and key in entries:
        entries.move_to_end(key)
        found = entries[key]
        if isinstance(found, EngineUnsupported):  # it failed with these inputs: fail at once
            raise EngineUnsupported(found.reason)
        graph, names = found
    else:
        try:
            graph, names = _export(model, tuple(inputs), output)
        except EngineUnsupported as err:
            if entries is not None:
                _keep(entries, key, err)
            raise
        if entries is not None:
            _keep(entries, key, (graph, names))
    owned = dict(model.named_parameters(remove_duplicate=False))
    owned.update(model.named_buffers(remove_duplicate=False))
    consts = getattr(graph, "_ngtriton_constants", {})
    flat: list[Any] = [_live(model, name, consts) if name in consts
                       else owned[name.removeprefix("m.")] for name in names]
    flat.extend(pytree.tree_leaves(tuple(inputs)))
    return Captured(graph, tuple(flat))


def _live(model: nn.Module, name: str, consts: dict[str, Any]) -> Any:
    """A lifted constant's value now: a tensor attribute of the model (``self.t = ...``, read
    anew, as it may have been replaced), else the tensor the forward made at capture."""
    obj: Any = model
    for part in name.removeprefix("m.").split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return consts[name]
    return obj if isinstance(obj, Tensor) else consts[name]


def _keep(entries: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    entries[key] = value
    while len(entries) > CACHE_SIZE:
        entries.popitem(last=False)


def _export(model: nn.Module, inputs: tuple[Any, ...], output: OutputSelector
            ) -> tuple[fx.Graph, tuple[str, ...]]:
    seen: list[type] = []
    wrapper = _Selected(model, output)
    try:
        with warnings.catch_warnings(), _functions_seen(seen):
            warnings.simplefilter("ignore")  # export's own notes (deprecations, guards)
            program = torch.export.export(wrapper, inputs, strict=False)
    except Exception as err:  # export raises many types (UserError, GuardOnDataDependent, ...)
        lines = str(err).strip().splitlines()
        raise EngineUnsupported(f"torch.export cannot capture {type(model).__name__} "
                                f"({type(err).__name__}: {lines[0] if lines else ''})") from err
    if seen:
        names = ", ".join(sorted({f"{c.__module__}.{c.__qualname__}" for c in seen}))
        raise EngineUnsupported(f"the forward applies the custom autograd.Function {names}, "
                                "which torch.export would trace through")
    gm = program.graph_module
    graph = gm.graph
    signature = program.graph_signature
    lifted: dict[str, str] = {}
    lifted.update(signature.inputs_to_parameters)
    lifted.update(signature.inputs_to_buffers)
    constant_inputs = dict(signature.inputs_to_lifted_tensor_constants)
    lifted.update(constant_inputs)
    constants: dict[str, Any] = {}  # tensors the forward made (torch.tensor(...)): the graph's
    names: list[str] = []
    for node in graph.nodes:
        if node.op != "placeholder" or node.name not in lifted:
            continue
        target = lifted[node.name]
        if node.name in constant_inputs:
            constants[target] = program.constants[target]
        names.append(target)
    outputs = next(n for n in graph.nodes if n.op == "output")
    flat_out = outputs.args[0]
    if len(flat_out) != 1 or not isinstance(flat_out[0], fx.Node):
        raise EngineUnsupported("torch.export returned more than the selected output (a "
                                "buffer the forward mutates out of place?)")
    _refuse_aliased_mutation(graph)
    collapse_activations(graph)  # Hugging Face's elementwise GELU chains → one op with a rule
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            new_graph.output(env[flat_out[0]])
        else:
            env[node] = new_graph.node_copy(node, lambda n: env[n])
    new_graph._ngtriton_constants = constants  # type: ignore[attr-defined]
    new_graph._ngtriton_checked = False  # type: ignore[attr-defined]  # checked at first build
    return new_graph, tuple(names)


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` returns an alias of an input (``view``, ``transpose``, ``split``'s
    items...), by the op's schema."""
    target = node.target
    if target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_view(node.args[0])
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.returns:
        return False
    alias = target._schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _mutated(node: fx.Node) -> fx.Node | None:
    """The node whose value ``node`` writes in place (its first argument), if it does."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.arguments:
        return None
    alias = target._schema.arguments[0].alias_info
    first = node.args[0] if node.args else None
    return first if alias is not None and alias.is_write and isinstance(first, fx.Node) else None


def _refuse_aliased_mutation(graph: fx.Graph) -> None:
    """The builder evaluates every op out of place, which is exact when a later reader reads
    the in-place op's own node (the capture records it so). A value that is a view, or that
    has views, shares its memory with them: the write reaches them in eager PyTorch and not
    in the graph, so the capture is refused (EngineUnsupported)."""
    for node in graph.nodes:
        target = _mutated(node)
        if target is None or target.op == "placeholder":  # buffers (running statistics)
            continue
        if _is_view(target) or any(_is_view(u) for u in target.users if u is not node):
            raise EngineUnsupported(f"node {node.name!r} modifies {target.name!r} in place, "
                                    "which shares its memory with a view")
