"""Output-Fisher products per example: ``F_R v`` and the factor products ``L u`` / ``Lᵀ v``.

Rows of length m (the last dimension; leading dimensions are flattened). Per row:

- categorical, probabilities p:  ``F_R = diag(p) − p pᵀ = L Lᵀ`` with ``L = diag(√p) − p √pᵀ``
    - ``categorical_fvp(p, v)      = p ⊙ v − p (p·v)``
    - ``categorical_factor_t(p, v) = Lᵀ v = √p ⊙ (v − (p·v))``
    - ``categorical_factor(p, u)   = L u  = √p ⊙ u − p (√p·u)``
- bernoulli, probabilities s: ``F_R = diag(s(1−s))``, ``L = Lᵀ = diag(√(s(1−s)))``
    - ``bernoulli_fvp(s, v)    = s(1−s) ⊙ v``
    - ``bernoulli_factor(s, v) = bernoulli_factor_t(s, v) = √(s(1−s)) ⊙ v``
- gaussian (unit variance): the identity, no kernel.

Each public function runs one Triton kernel (fp32 math, one program per row, the row processed in
blocks of ``BLOCK`` so any m fits) when the inputs allow it and otherwise its ``*_reference``
(torch, same signature), which is also what the tests compare against. Output dtype = ``v``'s.
This module imports without triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._config import INTERPRET, can_launch, cdiv, launch_on_device, offsets_fit

try:  # the torch references must stay importable without triton
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------


def categorical_fvp_reference(p: Tensor, v: Tensor) -> Tensor:
    """``p ⊙ v − p (p·v)`` per row."""
    return p * v - p * (p * v).sum(-1, keepdim=True)


def categorical_factor_t_reference(p: Tensor, v: Tensor) -> Tensor:
    """``Lᵀ v = √p ⊙ (v − (p·v))`` per row."""
    return p.sqrt() * (v - (p * v).sum(-1, keepdim=True))


def categorical_factor_reference(p: Tensor, u: Tensor) -> Tensor:
    """``L u = √p ⊙ u − p (√p·u)`` per row."""
    sp = p.sqrt()
    return sp * u - p * (sp * u).sum(-1, keepdim=True)


def bernoulli_fvp_reference(s: Tensor, v: Tensor) -> Tensor:
    """``s(1−s) ⊙ v``."""
    return s * (1 - s) * v


def bernoulli_factor_reference(s: Tensor, v: Tensor) -> Tensor:
    """``√(s(1−s)) ⊙ v`` (the factor is diagonal: it is its own transpose)."""
    return (s * (1 - s)).sqrt() * v


bernoulli_factor_t_reference = bernoulli_factor_reference

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

_MODE_FVP, _MODE_FACTOR_T, _MODE_FACTOR = 0, 1, 2
_ROW_BLOCK_MAX = 256 if INTERPRET else 4096
_ELEM_BLOCK = 256 if INTERPRET else 2048

if _HAS_TRITON:

    @triton.jit
    def _categorical_kernel(p_ptr, v_ptr, out_ptr, m, s_p, s_v, s_out,
                            MODE: tl.constexpr, BLOCK: tl.constexpr,
                            SINGLE: tl.constexpr):
        # One program per row. MODE 0: p⊙v − p(p·v); 1: √p⊙(v − p·v); 2: √p⊙v − p(√p·v).
        row = tl.program_id(0).to(tl.int64)
        p_row = p_ptr + row * s_p
        v_row = v_ptr + row * s_v
        o_row = out_ptr + row * s_out
        offs = tl.arange(0, BLOCK)
        if SINGLE:  # the whole row in one block: load once
            mask = offs < m
            p = tl.load(p_row + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_row + offs, mask=mask, other=0.0).to(tl.float32)
            if MODE == 2:
                sp = tl.sqrt(p)
                dot = tl.sum(sp * v, axis=0)
                out = sp * v - p * dot
            elif MODE == 1:
                dot = tl.sum(p * v, axis=0)
                out = tl.sqrt(p) * (v - dot)
            else:
                dot = tl.sum(p * v, axis=0)
                out = p * v - p * dot
            tl.store(o_row + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # two sweeps over the row: the reduction, then the output (second read from L2)
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for j0 in range(0, m, BLOCK):
                mask = (j0 + offs) < m
                p = tl.load(p_row + j0 + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_row + j0 + offs, mask=mask, other=0.0).to(tl.float32)
                if MODE == 2:
                    acc += tl.sqrt(p) * v
                else:
                    acc += p * v
            dot = tl.sum(acc, axis=0)
            for j0 in range(0, m, BLOCK):
                mask = (j0 + offs) < m
                p = tl.load(p_row + j0 + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_row + j0 + offs, mask=mask, other=0.0).to(tl.float32)
                if MODE == 2:
                    out = tl.sqrt(p) * v - p * dot
                elif MODE == 1:
                    out = tl.sqrt(p) * (v - dot)
                else:
                    out = p * v - p * dot
                tl.store(o_row + j0 + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bernoulli_kernel(s_ptr, v_ptr, out_ptr, n, SQRT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = s * (1.0 - s)
        if SQRT:
            w = tl.sqrt(w)
        tl.store(out_ptr + offs, (w * v).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(p: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
    """2-D row views with unit stride in the last dimension, or None (use the reference)."""
    if p.shape != v.shape or p.dim() == 0 or not _HAS_TRITON or not can_launch(p, v):
        return None
    m = p.shape[-1]
    p2 = p.reshape(-1, m)
    v2 = v.reshape(-1, m)
    if p2.numel() and (p2.stride(-1) != 1 or v2.stride(-1) != 1):
        p2, v2 = p2.contiguous(), v2.contiguous()
    if not offsets_fit(p2, v2, slack=_ROW_BLOCK_MAX):  # 32-bit offsets, by the strided span
        return None
    return p2, v2


@launch_on_device
def _categorical(p: Tensor, v: Tensor, mode: int, reference) -> Tensor:
    rows = _rows(p, v)
    if rows is None:
        return reference(p, v)
    p2, v2 = rows
    R, m = p2.shape
    out = torch.empty((R, m), dtype=v.dtype, device=v.device)
    if R and m:
        block = min(triton.next_power_of_2(m), _ROW_BLOCK_MAX)
        warps = 4 if block <= 1024 else 8
        _categorical_kernel[(R,)](p2, v2, out, m, p2.stride(0), v2.stride(0), out.stride(0),
                                  MODE=mode, BLOCK=block, SINGLE=block >= m, num_warps=warps)
    return out.reshape(v.shape)


def categorical_fvp(p: Tensor, v: Tensor) -> Tensor:
    """``F_R v = p ⊙ v − p (p·v)`` per row (last dimension)."""
    return _categorical(p, v, _MODE_FVP, categorical_fvp_reference)


def categorical_factor_t(p: Tensor, v: Tensor) -> Tensor:
    """``Lᵀ v = √p ⊙ (v − (p·v))`` per row, ``L = diag(√p) − p √pᵀ``."""
    return _categorical(p, v, _MODE_FACTOR_T, categorical_factor_t_reference)


def categorical_factor(p: Tensor, u: Tensor) -> Tensor:
    """``L u = √p ⊙ u − p (√p·u)`` per row, ``L = diag(√p) − p √pᵀ``."""
    return _categorical(p, u, _MODE_FACTOR, categorical_factor_reference)


@launch_on_device
def _bernoulli(s: Tensor, v: Tensor, sqrt: bool, reference) -> Tensor:
    if (s.shape != v.shape or not _HAS_TRITON or not can_launch(s, v)
            or not offsets_fit(v, slack=_ELEM_BLOCK)):
        return reference(s, v)
    s1 = s.contiguous().reshape(-1)
    v1 = v.contiguous().reshape(-1)
    out = torch.empty_like(v1)
    n = v1.numel()
    if n:
        _bernoulli_kernel[(cdiv(n, _ELEM_BLOCK),)](s1, v1, out, n, SQRT=sqrt, BLOCK=_ELEM_BLOCK,
                                                   num_warps=4)
    return out.reshape(v.shape)


def bernoulli_fvp(s: Tensor, v: Tensor) -> Tensor:
    """``F_R v = s(1−s) ⊙ v``."""
    return _bernoulli(s, v, False, bernoulli_fvp_reference)


def bernoulli_factor(s: Tensor, v: Tensor) -> Tensor:
    """``L v = Lᵀ v = √(s(1−s)) ⊙ v``."""
    return _bernoulli(s, v, True, bernoulli_factor_reference)


bernoulli_factor_t = bernoulli_factor
