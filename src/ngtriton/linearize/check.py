"""The check of a new graph against the model's eager forward.

A graph that specialised something it should not have (an ``isinstance(v, Tensor)`` test of an
input that fx's stand-ins fail) computes another function; one eager forward at the first build
of each graph finds out, and the graph is refused from then on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import EngineUnsupported
from .rules import WithoutDropout, math_attention
from .state import buffers_kept as _buffers_kept


def _eager_forward(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``model(*inputs)`` as the engine sees it (dropout off, math attention; in the caller's
    grad mode, since a forward may differentiate, a force field's), with the random generators
    and the buffers left as they were (:func:`_buffers_kept`). Any error: EngineUnsupported.
    It runs before the build, so that putting the buffers back cannot touch what the build's
    nodes saved."""
    devices = sorted({p.device for p in model.parameters() if p.is_cuda}, key=str)
    try:
        with _buffers_kept(model), torch.random.fork_rng(devices=devices), \
                WithoutDropout(), math_attention():
            return model(*inputs)
    except Exception as err:
        raise EngineUnsupported(f"the model's eager forward, run to check the trace, failed "
                                f"({type(err).__name__}: {err})") from err


def _agrees(eager: Any, outputs: Tensor, precision: torch.dtype | None = None) -> bool:
    """Check a new trace's outputs against the eager forward's; raise EngineUnsupported if they
    differ. False when they are not finite (nothing to judge; checked at the next build).

    fx traces with stand-ins that are not tensors, so a ``forward`` that asks
    ``isinstance(v, Tensor)`` or ``torch.is_tensor(v)`` of an input takes the other branch in
    the trace than in eager PyTorch: the graph is then a different function. ``precision``:
    the autocast dtype both ran in (its rounding sets the tolerance), None for full precision."""
    if not isinstance(eager, Tensor) or eager.shape != outputs.shape:
        got = tuple(eager.shape) if isinstance(eager, Tensor) else type(eager).__name__
        raise EngineUnsupported(f"the traced graph returns shape {tuple(outputs.shape)}, the "
                                f"model {got}")
    eager, got = eager.detach().double(), outputs.double()
    if not (bool(torch.isfinite(eager).all()) and bool(torch.isfinite(got).all())):
        return False
    # far above rounding, far below a branch
    tol = math.sqrt(torch.finfo(precision or outputs.dtype).eps)
    if float((got - eager).norm()) > tol * max(float(eager.norm()), 1e-30):
        raise EngineUnsupported("the traced graph computes another function than the model "
                                "(does forward test isinstance(..., Tensor) of an input, or read "
                                "through a view what it writes in place?)")
    return True
