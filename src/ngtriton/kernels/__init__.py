"""Triton kernels of ngtriton, each with the torch reference it is tested against.

- :mod:`.ops`: drop-in Triton backend of :mod:`ngtriton.linearize.ops_torch` (``linear_jvp``,
  ``linear_vjp``, ``layernorm_jvp``, ``layernorm_vjp``, and ``linear_jvp_fvp``: the last layer's
  JVP with the output-Fisher product in its epilogue), falling back to torch per call.
- :mod:`.linear`, :mod:`.layernorm`: the kernels behind it.
- :mod:`.output`: output-Fisher products (categorical / bernoulli) and their factors.
- :mod:`.krylov`: fused Krylov vector updates for CG (``cg_update``, ``update_direction``,
  ``dot``), MINRES (``sub_scaled_dot``, ``minres_update``) and LSMR (``sub_scaled_dot``,
  ``normalize``, ``lsmr_update``), scalars kept on the device.

Submodules are imported lazily, so ``import ngtriton`` works without triton installed; only
:mod:`.linear` and :mod:`.layernorm` need triton to import.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._config import (
    get_matmul_precision,
    set_matmul_precision,
    torch_matmul_precision,
    triton_available,
)

__all__ = [
    "get_matmul_precision",
    "krylov",
    "layernorm",
    "linear",
    "ops",
    "output",
    "set_matmul_precision",
    "torch_matmul_precision",
    "triton_available",
]

_SUBMODULES = {"krylov", "layernorm", "linear", "ops", "output"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
