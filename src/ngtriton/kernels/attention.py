"""Flash-attention forward and its forward-mode tangent (JVP) as Triton kernels.

Reference: :mod:`.attention_reference` (same signatures and conventions: masks, causal, scale,
fully masked rows). Attention ``o = softmax(s) v``, ``s = scale · q kᵀ + mask``, with q
(B, H, T, D) and k, v (B, H, S, D); the T × S score matrix is never written to memory.

- ``attention_forward``: one program per (block of BLOCK_M queries, batch·head). It streams the
  key/value blocks once, with the online softmax: a running row maximum and row sum, and an fp32
  accumulator rescaled whenever the maximum grows. It returns ``o`` (q's dtype) and the row
  log-sum-exp ``lse`` (fp32, (B, H, T)), which is all the JVP needs of the softmax.
- ``attention_jvp``: the tangent ``do_i = Σ_j p_ij (ds_ij v_j + dv_j) − (Σ_j p_ij ds_ij) o_i``
  with ``ds = scale · (dq kᵀ + q dkᵀ)``. With the saved ``lse`` the probabilities are final on
  first sight (``p = exp(s − lse)``), so one pass over the key blocks accumulates
  ``Σ p ds v + Σ p dv`` (two dots into one fp32 tile) and ``Σ p ds`` (a row vector) with no
  rescaling; the epilogue subtracts ``(Σ p ds) · o``. Absent tangents (``None``) are compiled out.

Masks: ``mask`` broadcastable to (B, H, T, S), an additive float bias or boolean (True = keep),
read through broadcast (zero) strides; ``causal=True`` keeps key j for query i when ``j ≤ i``
(top-left aligned, as torch's ``scaled_dot_product_attention(is_causal=True)``, also for
T ≠ S). Under ``causal`` the loops stop at the last key block any query of the block may see, so
fully masked key blocks are never loaded.

Fully masked rows (no key kept): ``o = 0``, ``lse = -inf``, ``do = 0`` (torch's math backend also
returns zeros there since its "safe softmax"; older torch gave NaN). The kernels never form
``-inf − (-inf)``: a row maximum of -inf is replaced by 0 before it is subtracted.

Exponentials are base 2 (``exp2``) on scores pre-multiplied by log₂e; ``lse`` is stored in
natural-log units. Accumulation is fp32; fp16/bf16 operands (and the probabilities cast to them)
go to tensor cores; fp32 operands use the ``tl.dot`` precision of :mod:`._config`. Strides are
arbitrary (e.g. a (B, T, H, D) tensor viewed as (B, H, T, D)); T and S need not be multiples of
the blocks, and D is padded to a power of two ≥ 16 with masked loads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, cdiv, dot_precision, launch_on_device

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # == the limit in ops.attention_*: wider heads go to the torch reference

# Mask kinds (the MASK_KIND constexpr).
_NO_MASK, _ADDITIVE, _BOOLEAN = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Launch configurations
#
# Fixed per head dimension and dtype (no autotuning: one compile per variant). Chosen for Hopper
# (H100/H200, 228 KiB shared memory, 64K registers per SM): the key/value loop pipelines
# ``num_stages`` K (and V) tiles of BLOCK_N × BLOCK_D through shared memory. The forward holds
# the q tile and the fp32 accumulator (BLOCK_M × BLOCK_D) and one fp32 score tile
# (BLOCK_M × BLOCK_N) in registers; the JVP also holds dq, the tangent-score tile and p·ds, hence
# its 64-row tiles. fp32 "ieee" dots run on FMA units from registers, each thread holding whole
# head-wide rows of its operands: small tiles, and no JVP beyond 64 columns (``jvp_head_limit``).
# Each entry was picked from sm_90 compiles (ptxas, Triton 3.9) as the largest tile tried that
# does not spill (one exception, noted at its entry); tests/kernels/test_attention.py (slow)
# compiles them all and checks that. Not timed on a GPU: the choice between non-spilling tiles
# is a guess (the larger one), to be tuned on an H100.
# Under the interpreter: small tiles with BLOCK_M ≠ BLOCK_N, so that the tests cross block
# boundaries and the causal bound on key blocks.
# ----------------------------------------------------------------------------------------------

Blocks = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

_INTERP_BLOCKS: Blocks = (32, 16, 4, 1)


def head_block(D: int) -> int:
    """BLOCK_D: D padded to a power of two, at least 16 (the smallest ``tl.dot`` extent)."""
    return max(16, triton.next_power_of_2(max(D, 1)))


def forward_blocks(block_d: int, dtype: torch.dtype, precision: str) -> Blocks:
    """Tiles of the forward kernel for a head of ``block_d`` (padded) columns."""
    if INTERPRET:
        return _INTERP_BLOCKS
    if dtype == torch.float32 and precision == "ieee":
        return {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2),
                128: (32, 16, 4, 2)}.get(block_d, (16, 16, 4, 2))
    if dtype == torch.float32:  # tf32: K and V tiles take twice the shared memory
        return (128, 64, 8, 2) if block_d <= 128 else (64, 16, 8, 2)
    if block_d <= 64:
        return (128, 64, 4, 3)
    if block_d <= 128:
        return (128, 64, 8, 3)
    return (64, 64, 8, 2)


def jvp_blocks(block_d: int, dtype: torch.dtype, precision: str) -> Blocks:
    """Tiles of the JVP kernel (q, dq, the accumulator and three score-shaped fp32 tiles)."""
    if INTERPRET:
        return _INTERP_BLOCKS
    if dtype == torch.float32 and precision == "ieee":
        return (32, 16, 4, 2) if block_d <= 32 else (32, 16, 8, 2)
    if dtype == torch.float32:
        return (128, 32, 8, 2) if block_d <= 64 else (64, 16, 8, 2)
    if block_d <= 64:
        return (64, 64, 4, 3)
    if block_d <= 128:
        return (64, 64, 8, 2)
    return (64, 16, 4, 2)  # spills ~72 B per thread with a mask (none without); smaller is worse


def jvp_head_limit(dtype: torch.dtype, precision: str) -> int:
    """Widest padded head (BLOCK_D) the JVP kernel takes on a GPU without spilling registers
    (sm_90 compiles, tests/kernels/test_attention.py): 256 for fp16/bf16, 128 for fp32 with
    "tf32" and 64 for fp32 "ieee", whose FMA dots hold the head-wide rows of q, dq, k and dk in
    each thread. Wider heads are left to the torch reference (cuBLAS GEMMs) by the dispatcher;
    the interpreter takes every head up to ``MAX_HEAD_DIM``."""
    if INTERPRET or dtype != torch.float32:
        return MAX_HEAD_DIM
    return 64 if precision == "ieee" else 128


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key_bound(pid_m, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any query of block ``pid_m`` may see (``j ≤ i`` under causal)."""
    if CAUSAL:
        return tl.minimum(S, (pid_m + 1) * BLOCK_M)
    else:
        return S


@triton.jit
def _masked_scores(s, offs_m, cols, T, S, m_ptr, m_off, s_mt, s_ms,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores ``s`` (base-2 units) with the bias added and dropped entries at -inf: keys past
    S, keys after the query under ``causal``, and keys the boolean mask does not keep.
    ``m_off``: the batch·head offset into the mask (``m_ptr`` is None without a mask, so it is
    only touched under ``MASK_KIND``)."""
    valid = (cols < S)[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None])
    if MASK_KIND != 0:
        in_range = (offs_m < T)[:, None] & (cols < S)[None, :]
        m_ptrs = m_ptr + m_off + offs_m[:, None] * s_mt + cols[None, :] * s_ms
        if MASK_KIND == 1:
            bias = tl.load(m_ptrs, mask=in_range, other=0.0).to(tl.float32)
            s = s + bias * 1.4426950408889634
        else:
            keep = tl.load(m_ptrs, mask=in_range, other=0)
            valid = valid & (keep != 0)
    return tl.where(valid, s, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr,
    H, T, S, D, qk_scale,
    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
    s_mb, s_mh, s_mt, s_ms, s_ob, s_oh, s_ot, s_od, s_lb, s_lh, s_lt,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D

    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    m_off = b * s_mb + h * s_mh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = _key_bound(pid_m, S, CAUSAL, BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_ok = (cols < S)
        kt = tl.load(k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd,
                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = _masked_scores(s, offs_m, cols, T, S, m_ptr, m_off, s_mt, s_ms, CAUSAL,
                           MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row masked so far: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * s_vs + offs_d[None, :] * s_vd,
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    # Epilogue: normalise; fully masked rows (l = 0, acc = 0) give o = 0 and lse = -inf.
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(live, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * s_lb + h * s_lh + offs_m * s_lt, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# JVP
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attention_jvp_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, do_ptr,
    H, T, S, D, scale, qk_scale,
    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
    s_mb, s_mh, s_mt, s_ms, s_ob, s_oh, s_ot, s_od, s_lb, s_lh, s_lt,
    s_dqb, s_dqh, s_dqt, s_dqd, s_dkb, s_dkh, s_dks, s_dkd, s_dvb, s_dvh, s_dvs, s_dvd,
    s_gb, s_gh, s_gt, s_gd,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DQ: tl.constexpr,
    HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=tile_ok, other=0.0)
    if HAS_DQ:
        dq = tl.load(dq_ptr + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt
                     + offs_d[None, :] * s_dqd, mask=tile_ok, other=0.0)
    # lse in base-2 units; -inf (fully masked row) becomes 0, where every p = exp2(-inf) = 0.
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_m * s_lt, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    m_off = b * s_mb + h * s_mh

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # Σ p ds v + Σ p dv
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ p ds
    hi = _key_bound(pid_m, S, CAUSAL, BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_ok = cols < S
        kt_mask = kv_ok[None, :] & d_ok[:, None]
        row_mask = kv_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd, mask=kt_mask,
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = _masked_scores(s, offs_m, cols, T, S, m_ptr, m_off, s_mt, s_ms, CAUSAL,
                           MASK_KIND)
        p = tl.math.exp2(s - lse2[:, None])  # final probabilities: no rescaling
        if HAS_DQ or HAS_DK:
            if HAS_DQ:
                ds = tl.dot(dq, kt, input_precision=PRECISION)
            if HAS_DK:
                dkt = tl.load(dk_ptr + b * s_dkb + h * s_dkh + cols[None, :] * s_dks
                              + offs_d[:, None] * s_dkd, mask=kt_mask, other=0.0)
                if HAS_DQ:
                    ds = tl.dot(q, dkt, ds, input_precision=PRECISION)
                else:
                    ds = tl.dot(q, dkt, input_precision=PRECISION)
            pds = p * (ds * scale)
            r += tl.sum(pds, axis=1)
            v = tl.load(v_base + cols[:, None] * s_vs + offs_d[None, :] * s_vd, mask=row_mask,
                        other=0.0)
            acc = tl.dot(pds.to(v.dtype), v, acc, input_precision=PRECISION)
        if HAS_DV:
            dv = tl.load(dv_ptr + b * s_dvb + h * s_dvh + cols[:, None] * s_dvs
                         + offs_d[None, :] * s_dvd, mask=row_mask, other=0.0)
            acc = tl.dot(p.to(dv.dtype), dv, acc, input_precision=PRECISION)

    if HAS_DQ or HAS_DK:  # − (Σ p ds) o
        o = tl.load(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_ot
                    + offs_d[None, :] * s_od, mask=tile_ok, other=0.0)
        acc = acc - r[:, None] * o.to(tl.float32)
    tl.store(do_ptr + b * s_gb + h * s_gh + offs_m[:, None] * s_gt + offs_d[None, :] * s_gd,
             acc.to(do_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def mask_operand(mask: Tensor | None, shape: tuple[int, int, int, int]
                 ) -> tuple[Tensor | None, int, tuple[int, int, int, int]]:
    """``(tensor, MASK_KIND, strides)`` of ``mask`` as the kernels read it: broadcast to
    ``shape`` = (B, H, T, S) through zero strides (never copied); a boolean mask is read as its
    bytes (uint8, nonzero = keep)."""
    if mask is None:
        return None, _NO_MASK, (0, 0, 0, 0)
    m = mask.expand(shape)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), _BOOLEAN, tuple(m.stride())
    return m, _ADDITIVE, tuple(m.stride())


def _strides(t: Tensor | None, n: int = 4) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


@launch_on_device
def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      causal: bool = False, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(o, lse)`` of attention (module docstring): o (B, H, T, D) in q's dtype, lse (B, H, T)
    fp32 (``-inf`` and ``o = 0`` on fully masked rows). ``scale`` defaults to ``1/√D``.

    q: (B, H, T, D), k, v: (B, H, S, D), one dtype (fp32/fp16/bf16) and device, any strides;
    ``D ≤ MAX_HEAD_DIM`` (the dispatcher in :mod:`.ops` checks all of this).
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0 and lse.numel() == 0:
        return o, lse
    if S == 0:  # no keys: every row is fully masked
        return o.zero_(), lse.fill_(float("-inf"))
    sc = _scale(q, scale)
    m, kind, m_strides = mask_operand(mask, (B, H, T, S))
    prec = dot_precision(q.dtype)
    block_d = head_block(D)
    bm, bn, warps, stages = forward_blocks(block_d, q.dtype, prec)
    grid = (cdiv(T, bm), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, m, o, lse,
        H, T, S, D, sc * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *o.stride(), *lse.stride(),
        CAUSAL=bool(causal), MASK_KIND=kind, PRECISION=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return o, lse


@launch_on_device
def attention_jvp(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dq: Tensor | None,
                  dk: Tensor | None, dv: Tensor | None, *, scale: float | None = None,
                  causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """Tangent ``do`` (B, H, T, D), q's dtype, of attention along ``(dq, dk, dv)`` (any may be
    ``None``), from the forward's ``o`` and fp32 ``lse`` (:func:`attention_forward`)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if S == 0 or (dq is None and dk is None and dv is None):
        return out.zero_()
    sc = _scale(q, scale)
    m, kind, m_strides = mask_operand(mask, (B, H, T, S))
    prec = dot_precision(q.dtype)
    block_d = head_block(D)
    bm, bn, warps, stages = jvp_blocks(block_d, q.dtype, prec)
    grid = (cdiv(T, bm), B * H)
    _attention_jvp_kernel[grid](
        q, k, v, m, o, lse, dq, dk, dv, out,
        H, T, S, D, sc, sc * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *o.stride(), *lse.stride(),
        *_strides(dq), *_strides(dk), *_strides(dv), *out.stride(),
        CAUSAL=bool(causal), MASK_KIND=kind, HAS_DQ=dq is not None, HAS_DK=dk is not None,
        HAS_DV=dv is not None, PRECISION=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return out
