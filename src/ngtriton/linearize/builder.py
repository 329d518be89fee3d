"""Building a linearization from a graph: one forward pass, one rule per node.

:class:`_Builder` walks the graph in order, evaluates every node once at the current parameters
(no autograd graph, except inside per-node fallbacks) and turns each node that depends on the
trainable parameters into a :class:`~ngtriton.linearize.rules.Step`. Which step a node gets is
decided by :mod:`~ngtriton.linearize.classify`; nodes without a rule get the per-node autograd
fallback (:class:`~ngtriton.linearize.rules.AutogradStep`).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Node, map_arg
from torch.utils import _pytree as pytree

from .arithmetic import arith_kind, build_arith
from .base import EngineUnsupported
from .classify import (
    _ACT_FUNCS,
    _ACT_METHODS,
    _DROPOUT_MODULES,
    _LINEAR_FUNCS,
    _LINEAR_METHODS,
    _RESHAPE_FUNCS,
    _RESHAPE_METHODS,
    _arg,
    _embedding_ok,
    _method_name,
    _module_activation,
    _same_forward,
    _simple_module,
    as_torch,
    functional,
)
from .dropout import dropout_free
from .function_rules import function_rule, module_rule
from .functions import NotLinearizable
from .outputs import OutputSelector, select_node
from .record import ForwardRecord
from .rules import (
    DROPOUT_FUNCS,
    Activation,
    AutogradStep,
    ElementwiseStep,
    EmbeddingStep,
    IdentityStep,
    LayerNormStep,
    LinearStep,
    ReshapeStep,
    Step,
    TupleItemStep,
    WithoutDropout,
    build_linear_fn,
)


@dataclass
class _Plan:
    root: weakref.ref  # the traced model (weak: the trace cache is keyed by it)
    nodes: list[Node]
    out_node: Node
    live: set[Node]
    fused: dict[Node, Node]
    modules: dict[Node, nn.Module]



def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


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
        """The recorded output of the module ``node`` computes, if it is that module at ``x``:
        a call_module node's module, or in a captured ATen graph the Linear or activation
        module whose one op ``node`` is (from the node's ``nn_module_stack``)."""
        if self.record is None or node is None:
            return None
        mod = self._module(node) if node.op == "call_module" else self._recorded_module(node)
        return None if mod is None else self.record.lookup(mod, x)

    def _recorded_rows(self, node: Node, x2: Tensor) -> Tensor | None:
        """For a captured node that is the one product of a row layer (Hugging Face's
        ``Conv1D``): the recorded output, flattened to rows like ``x2``."""
        mod = self._stack_module(node) if self.record is not None else None
        return None if mod is None else self.record.lookup_rows(mod, x2)

    def _stack_module(self, node: Node) -> nn.Module | None:
        """The innermost module whose call made a captured call_function ``node`` (its
        ``nn_module_stack``; the capture's wrapper holds the model as ``m``)."""
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op != "call_function":
            return None
        path = next(reversed(stack.values()))[0]
        if not path.startswith("m."):
            return None
        try:
            return self.root.get_submodule(path[2:])
        except AttributeError:
            return None

    def _recorded_module(self, node: Node) -> nn.Module | None:
        mod = self._stack_module(node)
        if mod is None:
            return None
        if as_torch(node.target) is F.linear:
            return mod if _same_forward(mod, nn.Linear) else None
        act = _module_activation(mod)
        return mod if act is not None and act == self._activation(node) else None

    def _add(self, node: Node, step: Step, value: Any) -> None:
        step.out_slot = self.n_slots
        step.label = node.name
        step.out_dtype = (value.dtype if isinstance(value, Tensor) and value.is_floating_point()
                          else None)
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
        return dropout_free(functional(node.target))

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

    def build(self) -> tuple[list[Tensor], Tensor, list[Step], int, int | None, list[str]]:
        """Evaluate the graph once: ``(params, outputs, steps, n_slots, out_slot, fallbacks)``,
        what :class:`~ngtriton.linearize.engine.EngineLinearization` is made of."""
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
                        value = self.inputs[n_placeholder]
                        slot = self.pslot.get(id(value)) if isinstance(value, Tensor) else None
                        if slot is not None:  # a captured graph takes the parameters as inputs
                            self.slots[node] = slot
                            value = value.detach()
                        self.values[node] = value
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
        return self.params, outputs, self.steps, self.n_slots, out_slot, self.fallbacks

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
        t = as_torch(node.target)
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
        return node.op == "call_function" and as_torch(node.target) is F.linear

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
        return node.op == "call_function" and as_torch(node.target) in DROPOUT_FUNCS

    def _inactive(self, node: Node, mod: nn.Module | None) -> Any:
        args, kwargs = self._val(node.args), self._val(node.kwargs)
        if self._is_dropout(node, mod):
            return args[0] if args else kwargs["input"]
        return self._runner(node)(args, kwargs)

    def _module_node(self, node: Node, mod: nn.Module) -> None:
        rule = module_rule(mod)
        if rule is not None and rule(self, node, mod):
            return
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
        op, t = node.op, as_torch(node.target)
        name = _method_name(node) if op == "call_method" else None
        rule = function_rule(node.target if op == "call_function" else name)
        if rule is not None and rule(self, node):
            return
        if op == "call_function" and t is F.linear:
            self._linear(node, None)
            return
        act = self._activation(node)
        if act is not None:
            x, x_slot = self._src(_arg(node, 0, "input"))
            if x_slot is not None:
                y = self._recorded(node, x)
                value, dact = (act.forward(x, owned=False) if y is None
                               else (y, act.derivative(x, y)))
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
        kind = arith_kind(node, name)
        if kind is not None and build_arith(self, node, kind):
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
            zeros = {n: (torch.zeros_like(v) if _is_float(v) and n not in active else v)
                     for n, v in consts.items()}  # the active ones are the tangents
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


def _target_name(node: Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
