"""Which tensor of a model's output is linearized: models as they come.

A model may return a tensor, a tuple (``(logits, hidden)``), a dict, or an object such as a
Hugging Face ``ModelOutput`` (a dict whose fields are also attributes). :func:`select_output`
finds the tensor the loss is computed on: ``output=None`` takes the tensor itself, else the
``"logits"`` entry or ``.logits`` attribute, else the first tensor of a tuple or list; an
``output=`` selector names it instead: a key or attribute name, a tuple index, or a callable
that takes the model's output and returns the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["OutputSelector", "check_selector", "select_output"]

OutputSelector = str | int | Callable[[Any], Any] | None


def check_selector(output: Any) -> OutputSelector:
    """``output`` if it is a valid selector; TypeError naming ``output`` otherwise."""
    if output is None or (isinstance(output, str | int) and not isinstance(output, bool)) \
            or callable(output):
        return output
    raise TypeError(f"output: expected None, a key or attribute name (str), a tuple index (int) "
                    f"or a callable, got {type(output).__name__}")


def _describe(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, tuple | list):
        return f"{type(out).__name__} of {len(out)}"
    return type(out).__name__


def select_output(out: Any, output: OutputSelector = None,
                  is_leaf: Callable[[Any], bool] = lambda v: isinstance(v, Tensor)) -> Any:
    """The part of the model's output ``out`` to linearize (see the module docstring).

    ``is_leaf`` says what counts as the tensor (the engine selects among graph nodes). Raises
    TypeError naming ``model`` (nothing to select by default) or ``output`` (the selector does
    not fit).
    """
    if output is None:
        if is_leaf(out):
            return out
        if isinstance(out, Mapping) and "logits" in out and is_leaf(out["logits"]):
            return out["logits"]
        if not isinstance(out, Mapping | tuple | list):
            logits = getattr(out, "logits", None)
            if logits is not None and is_leaf(logits):
                return logits
        if isinstance(out, tuple | list):
            first = next((v for v in out if is_leaf(v)), None)
            if first is not None:
                return first
        raise TypeError(f"model: returns a {_describe(out)} and no tensor to linearize was "
                        "found (a Tensor, a 'logits' entry or attribute, or a tuple's first "
                        "tensor); pass output= (a key, an index or a callable) to name it")
    if callable(output):
        try:
            selected = output(out)
        except Exception as err:
            raise TypeError(f"output: the selector raised {type(err).__name__}: {err} on the "
                            f"model's {_describe(out)}") from err
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            selected = out[output]
        elif not isinstance(out, Mapping) and hasattr(out, output):
            selected = getattr(out, output)
        else:
            raise TypeError(f"output: {output!r} is not a key or attribute of the model's "
                            f"{_describe(out)}")
    else:
        if not isinstance(out, tuple | list) or not -len(out) <= output < len(out):
            raise TypeError(f"output: index {output} does not fit the model's {_describe(out)}")
        selected = out[output]
    if not is_leaf(selected):
        raise TypeError(f"output: selects a {type(selected).__name__} from the model's "
                        f"{_describe(out)}, not a Tensor")
    return selected


def select_node(out_arg: Any, output: OutputSelector, values: Mapping[Any, Any]) -> Any:
    """The graph node (of the fx graph's output structure ``out_arg``) that :func:`select_output`
    picks, ``values`` holding the nodes' values. TypeError when the selection needs the values
    themselves (the output node returns a ModelOutput, a selector computes something)."""
    from torch.fx.node import Node, map_aggregate

    nodes: set[Node] = set()
    map_aggregate(out_arg, lambda a: nodes.add(a) if isinstance(a, Node) else None)
    return select_output(out_arg, output, lambda a: isinstance(a, Node) and a in nodes
                         and isinstance(values.get(a), Tensor))


def prune_steps(steps: list[Any], out_slot: int | None) -> list[Any]:
    """The steps whose output reaches ``out_slot`` (a selected output leaves the others'
    products dead), in order."""
    if out_slot is None:
        return steps
    needed = {out_slot}
    kept = []
    for step in reversed(steps):
        if step.out_slot in needed:
            kept.append(step)
            needed.update(step.in_slots)
    return kept[::-1]
