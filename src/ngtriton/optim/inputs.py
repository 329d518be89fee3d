"""The model's inputs as the closure passed them: positional folding of keyword arguments, the
tensors inside containers, equality of two calls' batches and the curvature subsample."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


def as_positional(model: nn.Module, args: tuple, kwargs: dict[str, Any]
                   ) -> tuple[tuple, dict[str, Any]]:
    """The keyword arguments folded into positional ones (defaults filled in) where
    ``model.forward``'s signature allows it, so the engine can trace the model itself; else
    unchanged (then :class:`_BoundKwargs` binds them)."""
    if not kwargs:
        return args, kwargs
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    params = list(sig.parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = [p for p in params if p not in named]
    if any(p.kind != p.VAR_KEYWORD for p in rest) or any(bound.arguments.get(p.name)
                                                         for p in rest):
        return args, kwargs  # keyword-only parameters, or keywords only **kwargs takes
    given = [p.name in bound.arguments for p in named]
    named = named[:max(i for i, g in enumerate(given) if g) + 1]  # defaults after: the engine's
    if any(p.name not in bound.arguments and isinstance(p.default, Tensor) for p in named):
        return args, kwargs  # a tensor default is no input to check (its dtype may differ)
    bound.apply_defaults()
    return tuple(bound.arguments[p.name] for p in named), {}


def input_tensors(args: Sequence[Any], kwargs: dict[str, Any] | None = None
                  ) -> list[tuple[str, Tensor]]:
    """The tensors among a model's inputs, also inside tuples, lists and dicts, each with its
    name (``inputs[0]['x']``)."""
    found = []
    for prefix, value in [*((f"inputs[{i}]", a) for i, a in enumerate(args)),
                          *((f"inputs[{k!r}]", v) for k, v in (kwargs or {}).items())]:
        if isinstance(value, Tensor):
            found.append((prefix, value))
            continue
        leaves = pytree.tree_flatten_with_path(value)[0]
        found += [(prefix + pytree.keystr(path), t) for path, t in leaves if isinstance(t, Tensor)]
    return found


def same_tensors(first: tuple, second: tuple) -> bool:
    """Whether two calls' ``(args, kwargs)`` hold the same tensors: the same objects, or equal
    ones (a closure may rebuild its batch from the same data), NaN matching NaN. Sparse and
    nested tensors count as the same (torch cannot compare them cheaply)."""
    a, b = input_tensors(*first), input_tensors(*second)
    return len(a) == len(b) and all(na == nb and _same_tensor(x, y) for (na, x), (nb, y)
                                    in zip(a, b))


def _same_tensor(x: Tensor, y: Tensor) -> bool:
    """One pair of :func:`same_tensors`."""
    if x is y or any(t.layout != torch.strided or t.is_nested for t in (x, y)):
        return True
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if torch.equal(x, y):
        return True
    return (x.is_floating_point() or x.is_complex()) and bool(
        ((x == y) | (x.isnan() & y.isnan())).all())


def names_by_id(model: nn.Module) -> dict[int, str]:
    """Parameter names for messages, keyed by ``id`` (tensors hash by identity anyway)."""
    return {id(p): name for name, p in model.named_parameters()}


class BoundKwargs(nn.Module):
    """``model(*args, **kwargs)`` with the keyword arguments bound, for the Fisher's forward."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        return self.model(*args, **self.kwargs)



def curvature_subsample(args: tuple, kwargs: dict, targets: Tensor | None, fraction: float,
                        batch_rows: int | None, generator: torch.Generator,
                        warn: Callable[[str], None]) -> tuple[tuple, dict, Tensor | None]:
    """The same random rows (a ``fraction`` of the batch, drawn from ``generator``) of every
    batched input, also inside tuples, lists and dicts, and of ``targets``, which must then stay
    aligned with the inputs.

    The batch size is ``batch_rows`` (the rows of the model's output in the closure, else of
    ``targets``) when inputs have that many rows; else, without targets, the one leading size
    all inputs share if it divides the output's rows (sequences whose (B·T, V) logits were
    flattened). Where there is none, or targets have other rows, nothing is subsampled and
    ``warn`` is called with the reason."""
    if fraction >= 1.0:
        return args, kwargs, targets
    tensors = [a for _, a in input_tensors(args, kwargs) if a.ndim > 0]
    leading = {a.shape[0] for a in tensors}
    t_rows = targets.shape[0] if isinstance(targets, Tensor) and targets.ndim > 0 else None
    rows = batch_rows if batch_rows is not None else t_rows
    per_position = False  # targets with one row per output row, (B·T,) for (B·T, V) logits
    if rows in leading:
        n = rows
    elif targets is None and len(leading) == 1 and (rows is None or rows % min(leading) == 0):
        n = min(leading)
    elif (len(leading) == 1 and rows is not None and t_rows == rows
          and rows % min(leading) == 0):
        n, per_position = min(leading), True
    else:
        n = None
    if n is None or (t_rows not in (None, n) and not per_position):
        if tensors:
            out = "" if rows is None else f"the model returns {rows} rows, "
            tgt = "" if t_rows is None else f"the targets {t_rows}, "
            warn(f"curvature_fraction: the batch dimension is unclear ({out}{tgt}the inputs "
                 f"lead with {sorted(leading)}); the Fisher uses the whole batch")
        return args, kwargs, targets
    first = next(a for a in tensors if a.shape[0] == n)
    k = max(1, round(fraction * n))
    if k >= n:
        return args, kwargs, targets
    idx = torch.randperm(n, generator=generator)[:k].to(first.device)

    def take(a: Any) -> Any:
        return a.index_select(0, idx.to(a.device)) if isinstance(a, Tensor) and a.ndim > 0 \
            and a.shape[0] == n else a

    # also inside tuples, lists and dicts of inputs
    args, kwargs = pytree.tree_map(take, (tuple(args), kwargs))
    if per_position:  # the rows of the chosen examples, in the outputs' order
        blocks = pytree.tree_map(
            lambda t: t.reshape(n, -1, *t.shape[1:]) if isinstance(t, Tensor) else t, targets)
        return args, kwargs, pytree.tree_map(
            lambda t: take(t).reshape(-1, *t.shape[2:]) if isinstance(t, Tensor) else t, blocks)
    return args, kwargs, take(targets)
