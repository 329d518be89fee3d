"""Mixed precision: linearizing a model that runs under ``torch.autocast``.

``autocast=`` of :func:`~ngtriton.linearize.linearize` (and of
:class:`~ngtriton.FisherOperator`) says in which precision the linearization's forward and its
products run:

* ``None`` (default): as the build finds the ambient autocast state of the parameters'
  device, i.e. full precision unless the build itself runs inside a ``torch.autocast`` block;
* ``False``: full precision, even inside a ``torch.autocast`` block;
* ``torch.bfloat16`` or ``torch.float16``: under ``torch.autocast(device_type, dtype)``.

Under autocast the build's forward saves its activations in that precision, and every later
``jvp`` and ``vjp`` runs under the same ``torch.autocast`` context, so their matrix products
(Linear, convolutions, attention's matmuls) are low-precision GEMMs with fp32 accumulation, as
torch's own are. What leaves a linearization (``outputs``, ``J v``, each parameter's ``Jᵀ u``)
is cast back to the parameters' dtype, so the output Fisher, the solvers and the optimizer
step stay in fp32. The error against the fp32 product is in ``docs/mixed_precision.md``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION", "AutocastArg", "ambient_autocast", "autocast_context",
           "check_autocast", "lowp", "resolve_autocast"]

LOW_PRECISION = (torch.bfloat16, torch.float16)

AutocastArg = torch.dtype | bool | None


def check_autocast(autocast: Any) -> AutocastArg:
    """``autocast`` if it is None, False or a low-precision dtype; else TypeError/ValueError."""
    if autocast is None or autocast is False:
        return autocast
    if autocast is True:
        raise ValueError("autocast: True is ambiguous; give the dtype (torch.bfloat16 or "
                         "torch.float16), None (follow the ambient autocast) or False")
    if not isinstance(autocast, torch.dtype):
        raise TypeError(f"autocast: expected None, False or a torch.dtype, got "
                        f"{type(autocast).__name__}")
    if autocast not in LOW_PRECISION:
        raise ValueError(f"autocast: expected torch.bfloat16 or torch.float16, got {autocast}")
    return autocast


def ambient_autocast(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast active now for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type without autocast (or an old torch)
        return None
    return None


def resolve_autocast(autocast: Any, device: torch.device,
                     dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The precision a build on ``device`` runs in: a low-precision dtype, or None (full). A
    float64 model (``dtype``, its parameters') stays full precision, as autocast leaves
    float64 ops alone."""
    autocast = check_autocast(autocast)
    if autocast is None:
        autocast = ambient_autocast(device.type)
    if dtype == torch.float64:
        return None
    return autocast or None


def autocast_context(dtype: torch.dtype | None, device_type: str) -> Any:
    """``torch.autocast(device_type, dtype)``; for None, autocast switched off where it is on
    (a no-op context otherwise, so full-precision products run exactly as before)."""
    if dtype is not None:
        return torch.autocast(device_type, dtype=dtype)
    if ambient_autocast(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def lowp(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors cast to the autocast dtype when autocast is on for their device (for ops
    that autocast does not cast itself: in-place and ATen-level products); else unchanged.
    As autocast does, float64 tensors (and None, and integer tensors) are left as they are."""
    dt = ambient_autocast(tensors[0].device.type)
    if dt is None:
        return tensors
    return tuple(t if t is None or t.dtype in (dt, torch.float64) or not t.is_floating_point()
                 else t.to(dt) for t in tensors)
