"""Fused Krylov vector updates on flat parameter vectors, with no host synchronisation.

- ``cg_update(x, r, p, Ap, alpha)``: ``x += α p``, ``r −= α Ap`` in place and ``‖r‖²`` of the new
  residual from the same pass (one read of x, r, p, Ap, one write of x, r). Each program writes
  the partial sum of its block to a small buffer, reduced on the device by ``.sum()``.
- ``update_direction(p, r, beta)``: ``p = r + β p`` in place.
- ``dot(a, b)``: ``a·b`` as a 0-d tensor (per-block partials, then ``.sum()``).

``alpha``/``beta`` are 0-d device tensors read inside the kernel (never ``.item()``); Python
numbers are accepted too. Reductions are returned as 0-d tensors: float64 for float64 vectors,
float32 otherwise (fp32 accumulation for fp16/bf16/fp32). The ``*_reference`` torch functions
have the same signatures (and match ``ngtriton.solvers._vecops``); the public functions use them
whenever the kernels cannot run (no triton, CPU without the interpreter, non-contiguous input).
This module imports without triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._config import INTERPRET, can_launch, cdiv, kernel_dtypes

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

_BLOCK = 256 if INTERPRET else 4096
_WARPS = 4 if INTERPRET else 8


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(s: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(s, Tensor):
        return s
    return torch.tensor(float(s), dtype=_acc_dtype(like.dtype), device=like.device)


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------


def cg_update_reference(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor | float
                        ) -> Tensor:
    """``x += α p``, ``r −= α Ap`` (in place); returns ``‖r‖²`` (0-d, fp32 or fp64)."""
    a = _scalar(alpha, x).to(x.dtype)
    x.addcmul_(p, a)
    r.addcmul_(Ap, a, value=-1)
    ra = r.to(_acc_dtype(r.dtype))
    return torch.dot(ra, ra)


def update_direction_reference(p: Tensor, r: Tensor, beta: Tensor | float) -> Tensor:
    """``p = r + β p`` in place; returns ``p``."""
    b = _scalar(beta, p).to(p.dtype)
    return p.mul_(b).add_(r)


def dot_reference(a: Tensor, b: Tensor) -> Tensor:
    """``a·b`` as a 0-d tensor (fp32, or fp64 for fp64 inputs)."""
    acc = _acc_dtype(a.dtype)
    return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _cg_update_kernel(x_ptr, r_ptr, p_ptr, ap_ptr, alpha_ptr, part_ptr, n,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = part_ptr.dtype.element_ty
        alpha = tl.load(alpha_ptr).to(acc_t)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_t)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc_t)
        ap = tl.load(ap_ptr + offs, mask=mask, other=0.0).to(acc_t)
        x_new = (x + alpha * p).to(x_ptr.dtype.element_ty)
        r_new = (r - alpha * ap).to(r_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, x_new, mask=mask)
        tl.store(r_ptr + offs, r_new, mask=mask)
        rr = r_new.to(acc_t)  # the norm of the residual as stored
        tl.store(part_ptr + pid, tl.sum(rr * rr, axis=0))

    @triton.jit
    def _update_direction_kernel(p_ptr, r_ptr, beta_ptr, n, BLOCK: tl.constexpr,
                                 ACC64: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if ACC64 else tl.float32
        beta = tl.load(beta_ptr).to(acc_t)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_t)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(p_ptr + offs, (r + beta * p).to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, part_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = part_ptr.dtype.element_ty
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_t)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(part_ptr + pid, tl.sum(a * b, axis=0))


def _vec_ok(*ts: Tensor) -> bool:
    if not _HAS_TRITON:
        return False
    n = ts[0].numel()
    for t in ts:
        if t.numel() != n or not t.is_contiguous():
            return False
    return can_launch(*ts, dtypes=(*kernel_dtypes(), torch.float64))


def _scalar_ok(s: Tensor, like: Tensor) -> bool:
    if INTERPRET and s.dtype == torch.bfloat16:
        return False
    return s.numel() == 1 and s.device == like.device and s.dtype.is_floating_point


def cg_update(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor | float) -> Tensor:
    """``x += α p``, ``r −= α Ap`` in place, returning ``‖r‖²`` (0-d) from the same pass."""
    a = _scalar(alpha, x)
    if not (_vec_ok(x, r, p, Ap) and _scalar_ok(a, x)):
        return cg_update_reference(x, r, p, Ap, a)
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=_acc_dtype(x.dtype), device=x.device)
    nb = cdiv(n, _BLOCK)
    part = torch.empty(nb, dtype=_acc_dtype(x.dtype), device=x.device)
    _cg_update_kernel[(nb,)](x, r, p, Ap, a, part, n, BLOCK=_BLOCK, num_warps=_WARPS)
    return part.sum()


def update_direction(p: Tensor, r: Tensor, beta: Tensor | float) -> Tensor:
    """``p = r + β p`` in place; returns ``p``."""
    b = _scalar(beta, p)
    if not (_vec_ok(p, r) and _scalar_ok(b, p)):
        return update_direction_reference(p, r, b)
    n = p.numel()
    if n:
        _update_direction_kernel[(cdiv(n, _BLOCK),)](p, r, b, n, BLOCK=_BLOCK,
                                                     ACC64=p.dtype == torch.float64,
                                                     num_warps=_WARPS)
    return p


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``a·b`` as a 0-d tensor (fp32, or fp64 for fp64 inputs), no host synchronisation."""
    if not _vec_ok(a, b):
        return dot_reference(a, b)
    n = a.numel()
    if n == 0:
        return torch.zeros((), dtype=_acc_dtype(a.dtype), device=a.device)
    nb = cdiv(n, _BLOCK)
    part = torch.empty(nb, dtype=_acc_dtype(a.dtype), device=a.device)
    _dot_kernel[(nb,)](a, b, part, n, BLOCK=_BLOCK, num_warps=_WARPS)
    return part.sum()
