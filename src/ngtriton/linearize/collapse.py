"""Activation modules written as chains of elementwise ops, collapsed back into one op.

A captured ATen graph has no module boundaries: Hugging Face's ``NewGELUActivation`` (GPT-2's
``gelu_new``) arrives as ten elementwise nodes, each a step of its own in both products. Where
the ops of one call of such a module (found by the nodes' ``nn_module_stack``) read one tensor
and give one, they are replaced by the single ATen op the module computes, which has a rule
(its derivative in closed form). The eager check at the graph's first build compares the result
with the model's own forward.
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["ACTIVATION_CLASSES", "collapse_activations"]

_aten = torch.ops.aten

# class name (its module must also be named in ``_MODULES``) → the ATen call it equals
ACTIVATION_CLASSES: dict[str, tuple[object, dict[str, object]]] = {
    "NewGELUActivation": (_aten.gelu.default, {"approximate": "tanh"}),
    "FastGELUActivation": (_aten.gelu.default, {"approximate": "tanh"}),
    "GELUTanh": (_aten.gelu.default, {"approximate": "tanh"}),
    "PytorchGELUTanh": (_aten.gelu.default, {"approximate": "tanh"}),
}
_MODULES = ("transformers.activations",)


def _owner(node: fx.Node) -> tuple[str, str] | None:
    """``(path, class name)`` of the innermost module whose call made ``node``, if it is one
    of :data:`ACTIVATION_CLASSES`."""
    stack = node.meta.get("nn_module_stack")
    if node.op != "call_function" or not stack:
        return None
    path, cls = next(reversed(stack.values()))
    qual = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    module, _, name = qual.rpartition(".")
    if name in ACTIVATION_CLASSES and module in _MODULES:
        return path, name
    return None


def collapse_activations(graph: fx.Graph) -> int:
    """Replace each call of a known activation module by its one op; returns how many."""
    groups: list[tuple[str, list[fx.Node]]] = []
    for node in graph.nodes:
        owner = _owner(node)
        if owner is None:
            continue
        if groups and groups[-1][0] == owner[1] and groups[-1][1][-1].next is node \
                and _owner(groups[-1][1][-1]) == owner:
            groups[-1][1].append(node)
        else:
            groups.append((owner[1], [node]))
    done = 0
    for name, nodes in groups:
        members = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in members}
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue  # not a plain x ↦ σ(x) call: left as it is
        target, kwargs = ACTIVATION_CLASSES[name]
        (x,) = inputs
        with graph.inserting_before(nodes[0]):
            new = graph.call_function(target, (x,), dict(kwargs))
        new.meta = dict(outputs[0].meta)
        outputs[0].replace_all_uses_with(new)
        for n in reversed(nodes):
            graph.erase_node(n)
        done += 1
    return done
