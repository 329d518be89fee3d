"""Shared settings of the Triton backend: interpreter detection, matmul precision, launch sizes.

Nothing here imports triton, so it is safe to import on machines without it.
"""

from __future__ import annotations

import functools
import os

import torch

_TRUE = ("1", "true", "yes", "on")

# Precision of ``tl.dot`` on float32 operands. "ieee" (the default) keeps full fp32 products, which
# the Krylov solvers need; "tf32" is an opt-in for speed (10-bit mantissa inputs, fp32 accumulate).
# Half-precision operands (fp16/bf16) always run on tensor cores with fp32 accumulation.
_MATMUL_PRECISIONS = ("ieee", "tf32")
_matmul_precision = "ieee"


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET`` set, read now)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


# Kernels pick their launch configurations when their module is imported; Triton itself decides
# at decoration time whether ``@triton.jit`` builds an interpreted function, so both read the
# environment at import.
INTERPRET = interpreting()


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton.language  # noqa: F401
    except Exception:  # not installed (ImportError) or a broken install
        return False
    return True


@functools.lru_cache(maxsize=1)
def _cuda() -> bool:
    return torch.cuda.is_available()


def triton_available() -> bool:
    """True when triton imports and kernels can run: a CUDA device, or ``TRITON_INTERPRET=1``.

    Both facts are read once (the interpreter flag at import, as Triton itself does), so the
    check costs nothing on the per-product dispatch path.
    """
    return _triton_importable() and (_cuda() or INTERPRET)


def set_matmul_precision(precision: str) -> None:
    """Select the ``tl.dot`` precision for float32 operands: ``"ieee"`` (default) or ``"tf32"``."""
    p = str(precision).lower()
    if p not in _MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {_MATMUL_PRECISIONS}, got {precision!r}")
    global _matmul_precision
    _matmul_precision = p


def get_matmul_precision() -> str:
    """The current ``tl.dot`` precision for float32 operands."""
    return _matmul_precision


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` passed to ``tl.dot`` for operands of ``dtype``.

    Only float32 operands are affected by the setting; for fp16/bf16 Triton ignores the option, so
    they get Triton's default (the tensor-core path) to keep one compiled variant.
    """
    return _matmul_precision if dtype == torch.float32 else "tf32"


# dtypes the matmul/row-wise kernels accept. The interpreter has no bfloat16.
def kernel_dtypes() -> tuple[torch.dtype, ...]:
    if INTERPRET:
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def can_launch(*tensors: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] | None = None
               ) -> bool:
    """Whether the given tensors (``None`` ignored) can go to a Triton kernel.

    They must share one dtype from ``dtypes`` (default :func:`kernel_dtypes`) and one device that
    Triton can run on: CUDA, or the CPU under the interpreter.
    """
    if not triton_available():
        return False
    ts = [t for t in tensors if t is not None]
    if not ts:
        return False
    allowed = kernel_dtypes() if dtypes is None else dtypes
    dtype, device = ts[0].dtype, ts[0].device
    if dtype not in allowed:
        return False
    for t in ts:
        if t.dtype != dtype or t.device != device:
            return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number under the interpreter)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(idx)
    return 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
