"""Shared settings of the Triton backend: interpreter detection, matmul precision, launch sizes.

Nothing here imports triton, so it is safe to import on machines without it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_TRUE = ("1", "true", "yes", "on")

# Precision of ``tl.dot`` on float32 operands follows torch's own setting for float32 matmuls, as
# a PyTorch user expects: "ieee" (full fp32 products, FMA dots) when torch says "highest" (its
# default) and TF32 is off; "tf32" (tensor cores: 10-bit mantissa inputs, fp32 accumulate) when
# ``torch.set_float32_matmul_precision("high"/"medium")`` or
# ``torch.backends.cuda.matmul.allow_tf32 = True``. ``set_matmul_precision`` overrides it for
# ngtriton alone; ``set_matmul_precision("torch")`` returns to following torch. Half-precision
# operands (fp16/bf16) always run on tensor cores with fp32 accumulation.
_MATMUL_PRECISIONS = ("ieee", "tf32")
_matmul_precision: str | None = None  # None: follow torch

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


def torch_matmul_precision() -> str:
    """The ``tl.dot`` precision that torch's float32 matmul setting maps to: ``"ieee"`` only when
    ``torch.get_float32_matmul_precision()`` is ``"highest"`` and
    ``torch.backends.cuda.matmul.allow_tf32`` is off, else ``"tf32"``."""
    highest = torch.get_float32_matmul_precision() == "highest"
    if highest and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def set_matmul_precision(precision: str | None) -> None:
    """Select the ``tl.dot`` precision for float32 operands: ``"ieee"`` or ``"tf32"`` (an override
    for ngtriton alone), or ``"torch"`` / ``None`` (the default: follow torch's setting, see
    :func:`torch_matmul_precision`)."""
    global _matmul_precision
    if precision is None or str(precision).lower() == "torch":
        _matmul_precision = None
        return
    p = str(precision).lower()
    if p not in _MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {_MATMUL_PRECISIONS} or 'torch', "
                         f"got {precision!r}")
    _matmul_precision = p


def get_matmul_precision() -> str:
    """The ``tl.dot`` precision float32 operands get now (the override, else torch's setting)."""
    return _matmul_precision if _matmul_precision is not None else torch_matmul_precision()


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` passed to ``tl.dot`` for operands of ``dtype``.

    Only float32 operands are affected by the setting; for fp16/bf16 Triton ignores the option, so
    they get Triton's default (the tensor-core path) to keep one compiled variant.
    """
    return get_matmul_precision() if dtype == torch.float32 else "tf32"


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


# Offsets inside the kernels are 32-bit: every element a kernel may address, i.e. the strided span
# of each tensor (not its element count: a transposed or sliced view reaches further), must lie
# below 2³¹.
INT32_MAX = 2**31 - 1


def span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last addressed element, inclusive, through its
    strides (0 for an empty tensor): the largest offset a kernel computes is ``span - 1``."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def offsets_fit(*tensors: torch.Tensor | None, slack: int = 0) -> bool:
    """Whether 32-bit offsets reach every element of each tensor (``None`` ignored), with
    ``slack`` more elements (a block's overshoot past the end, computed though masked)."""
    return all(t is None or span(t) + slack <= INT32_MAX for t in tensors)


def on_device(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device the current one while a kernel is launched:
    Triton launches on the current device, which need not be the tensors' own (e.g. tensors on
    ``cuda:1`` with ``cuda:0`` current). A no-op when they already agree, and off CUDA."""
    dev = t.device
    if dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def launch_on_device(fn):
    """Decorator: run ``fn`` under :func:`on_device` of its first tensor argument."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return fn(*args, **kwargs)
        with on_device(t):
            return fn(*args, **kwargs)

    return wrapped
