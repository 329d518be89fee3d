"""Linearize a model once at its current parameters: ``J v`` and ``Jᵀ u`` without re-running it.

:func:`linearize` picks the implementation: the per-module rule engine (fast, fx-traceable
models) with torch or Triton primitives, or the whole-model autograd fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .._frames import user_stacklevel
from .autograd import AutogradLinearization
from .base import Linearization, check_tangents
from .functions import NotLinearizable
from .outputs import OutputSelector, check_selector, select_output
from .precision import AutocastArg, autocast_context, resolve_autocast
from .record import ForwardRecord
from .state import buffers_kept

BACKENDS = ("auto", "torch", "triton", "autograd")

__all__ = ["BACKENDS", "AutocastArg", "AutogradLinearization", "ForwardRecord", "Linearization",
           "NotLinearizable", "OutputSelector", "buffers_kept", "check_selector",
           "check_tangents", "linearize", "resolve_autocast", "resolve_backend",
           "select_output"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to ``"torch"``, ``"triton"`` or ``"autograd"``; ValueError if unknown."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    from ..kernels import triton_available

    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("backend: 'triton' needs the triton package and a CUDA device "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    return backend


def linearize(model: nn.Module, inputs: Sequence[object], backend: str = "auto",
              record: ForwardRecord | None = None,
              output: OutputSelector = None, autocast: AutocastArg = None) -> Linearization:
    """Run ``model(*inputs)`` once and return its linearization at the current parameters.

    ``record``: a :class:`ForwardRecord` of that same forward, already run; the engine reuses
    its Linear and activation outputs (the autograd fallback ignores it). ``output``: which
    tensor of a tuple, dict or ``ModelOutput`` is linearized (see
    :func:`~ngtriton.linearize.outputs.select_output`; default: the tensor, ``.logits``, or a
    tuple's first tensor).

    ``autocast``: the precision of the forward and of the products: None (default) follows the
    ambient ``torch.autocast`` of the parameters' device at this call (full precision outside
    one), False is full precision, ``torch.bfloat16``/``torch.float16`` run the forward and
    every product under ``torch.autocast`` with that dtype; ``outputs``, ``J v`` and ``Jᵀ u``
    are in the parameters' dtype either way (:mod:`~ngtriton.linearize.precision`).

    The linearization is of the deterministic network (every dropout off, see
    :mod:`~ngtriton.linearize.dropout`), and the build leaves the model's buffers as it found
    them (BatchNorm's running statistics in train mode included).
    """
    output = check_selector(output)
    first = next(model.parameters())
    device = first.device
    resolved = resolve_backend(backend, device)
    precision = resolve_autocast(autocast, device, first.dtype)
    with buffers_kept(model), autocast_context(precision, device.type):
        return _linearize(model, inputs, resolved, record, output, precision)


def _linearize(model: nn.Module, inputs: Sequence[object], resolved: str,
               record: ForwardRecord | None, output: OutputSelector,
               precision: torch.dtype | None) -> Linearization:
    if resolved == "autograd":
        return AutogradLinearization(model, inputs, output, autocast=precision or False)
    from .engine import EngineUnsupported, build_engine

    if resolved == "triton":  # under autocast the kernels take the low-precision operands
        from ..kernels import ops
    else:
        from . import ops_torch as ops
    try:  # a failed build may have written buffers before it failed: put them back first
        with buffers_kept(model):
            return build_engine(model, inputs, ops, record=record, output=output,
                                autocast=precision or False)
    except EngineUnsupported as err:
        reason = err
    # Warned only once the fallback has run: a model that fails on these inputs anyway (a
    # wrong shape) raises its own error, without a warning about the engine first.
    try:
        lin = AutogradLinearization(model, inputs, output, autocast=precision or False)
    except Exception as err:
        if hasattr(err, "add_note"):  # Python ≥ 3.11
            err.add_note(f"ngtriton: the per-module engine had failed first: {reason}")
        raise
    warnings.warn(f"ngtriton: the per-module engine cannot linearize this model ({reason}); "
                  "falling back to whole-model autograd (correct, slower)",
                  stacklevel=user_stacklevel())
    return lin
