"""Attention VJP (reverse mode) as Triton kernels, FlashAttention-2 style.

Reference: :func:`.attention_reference.attention_vjp_reference` (same signature and conventions
as :mod:`.attention`: ``scale``, ``causal`` top-left aligned, ``mask`` additive or boolean
broadcastable to (B, H, T, S), fully masked rows). With ``p = exp(s − lse)``,
``s = scale · q kᵀ + mask``, ``o = p v`` and the output cotangent ``g``::

    Δ_i = Σ_d g_id o_id,   dv = pᵀ g,   dp = g vᵀ,   ds = p ⊙ (dp − Δ),
    dq = scale · ds k,     dk = scale · dsᵀ q.

Three kernels; the T × S matrices are never written to memory:

- ``_attention_bwd_preprocess_kernel``: Δ (fp32, (B, H, T)), one program per block of rows.
- ``_attention_bwd_dkdv_kernel``: one program per (block of BLOCK_N keys, batch·head). It holds
  its k and v tiles and the fp32 dk, dv accumulators, and streams the query blocks, recomputing
  the transposed probabilities ``pᵀ = exp2(k qᵀ · scale·log₂e + mask − lse)`` from the saved
  ``lse`` (final on first sight: no rescaling). Under ``causal`` it starts at the first query
  block that may see one of its keys (``j ≤ i``); query blocks before it are never loaded.
- ``_attention_bwd_dq_kernel``: one program per (block of BLOCK_M queries, batch·head), streaming
  the key blocks up to the causal bound (as the forward), accumulating ``dq``.

Two kernels instead of atomics: every sum runs in a fixed order, so results are deterministic.
Rows with ``lse = -inf`` (fully masked) have every score at -inf, so ``p = 0`` there and they
contribute nothing (their dq is 0); query rows past T are masked to -inf as well.

Accumulation is fp32; fp16/bf16 operands (and p, ds cast to them) go to tensor cores, fp32
operands use the ``tl.dot`` precision of :mod:`._config`. Strides are arbitrary, T and S ragged,
D padded to a power of two ≥ 16 with masked loads. Outputs are in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRET, cdiv, dot_precision, launch_on_device
from .attention import (
    LOG2E,
    MAX_HEAD_DIM,
    Blocks,
    _key_bound,
    _masked_scores,
    _scale,
    _strides,
    head_block,
    mask_operand,
)

# ----------------------------------------------------------------------------------------------
# Launch configurations (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages)
#
# Fixed per head dimension and dtype, for Hopper (sm_90), picked from sm_90 compiles (ptxas,
# Triton 3.9) as tiles that do not spill (tests/kernels/test_attention_vjp.py, slow, compiles them
# all). Not timed on a GPU. The dk/dv kernel keeps k, v, dk, dv (BLOCK_N × BLOCK_D, the
# accumulators fp32) and two score-shaped fp32 tiles (BLOCK_N × BLOCK_M) in registers; the dq
# kernel keeps q, g, dq and two score tiles. fp32 "ieee" dots run on FMA units from registers:
# small tiles and heads of at most 64 columns (``vjp_head_limit``).
# Under the interpreter: small tiles with BLOCK_M ≠ BLOCK_N, so that the tests cross block
# boundaries and the causal bounds.
# ----------------------------------------------------------------------------------------------

_INTERP_BLOCKS: Blocks = (32, 16, 4, 1)
_DELTA_ROWS = 32 if INTERPRET else 64


def dkdv_blocks(block_d: int, dtype: torch.dtype, precision: str) -> Blocks:
    """Tiles of the dk/dv kernel (programs over BLOCK_N keys, streaming BLOCK_M queries)."""
    if INTERPRET:
        return (32, 16, 4, 1)
    if dtype == torch.float32 and precision == "ieee":
        return (16, 32, 4, 2) if block_d <= 32 else (16, 32, 8, 2)
    if dtype == torch.float32:  # D = 128: every 64-key tile tried spills (wgmma); mma.sync
        return (32, 64, 4, 2) if block_d <= 64 else (16, 32, 4, 2)
    if block_d <= 64:
        return (32, 128, 8, 3)
    if block_d <= 128:
        return (32, 64, 4, 2)
    return (16, 32, 8, 2)  # D = 256: 64-key (wgmma) tiles spill 40 B and more; mma.sync


def dq_blocks(block_d: int, dtype: torch.dtype, precision: str) -> Blocks:
    """Tiles of the dq kernel (programs over BLOCK_M queries, streaming BLOCK_N keys)."""
    if INTERPRET:
        return _INTERP_BLOCKS
    if dtype == torch.float32 and precision == "ieee":
        return (32, 16, 4, 2) if block_d <= 32 else (32, 16, 8, 2)
    if dtype == torch.float32:
        return (64, 32, 4, 2) if block_d <= 64 else (64, 32, 8, 2)
    if block_d <= 64:
        return (128, 32, 8, 3)
    if block_d <= 128:
        return (64, 32, 4, 2)
    return (64, 16, 8, 2)


def vjp_head_limit(dtype: torch.dtype, precision: str) -> int:
    """Widest padded head (BLOCK_D) the VJP kernels take on a GPU (as
    :func:`.attention.jvp_head_limit`): 256 for fp16/bf16, 128 for fp32 "tf32", 64 for fp32
    "ieee"; the interpreter takes every head up to ``MAX_HEAD_DIM``."""
    if INTERPRET or dtype != torch.float32:
        return MAX_HEAD_DIM
    return 64 if precision == "ieee" else 128


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_preprocess_kernel(
    o_ptr, g_ptr, delta_ptr, H, T, D,
    s_ob, s_oh, s_ot, s_od, s_gb, s_gh, s_gt, s_gd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Δ[bh, i] = Σ_d g[i, d] o[i, d] in fp32; delta is contiguous (B·H, T).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    ok = row_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od,
                mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * s_gb + h * s_gh + offs_m[:, None] * s_gt + offs_d[None, :] * s_gd,
                mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh * T + offs_m, tl.sum(o * g, axis=1), mask=row_ok)


@triton.jit
def _masked_scores_t(st, rows, cols, T, S, m_ptr, m_off, s_mt, s_ms,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Transposed scores ``st`` (keys × queries, base-2 units) with the bias added and dropped
    entries at -inf: keys past S, queries past T, keys after the query under ``causal``, keys the
    boolean mask does not keep (as :func:`.attention._masked_scores`, transposed)."""
    in_range = (cols < S)[:, None] & (rows < T)[None, :]
    valid = in_range
    if CAUSAL:
        valid = valid & (cols[:, None] <= rows[None, :])
    if MASK_KIND != 0:
        m_ptrs = m_ptr + m_off + rows[None, :] * s_mt + cols[:, None] * s_ms
        if MASK_KIND == 1:
            bias = tl.load(m_ptrs, mask=in_range, other=0.0).to(tl.float32)
            st = st + bias * 1.4426950408889634
        else:
            keep = tl.load(m_ptrs, mask=in_range, other=0)
            valid = valid & (keep != 0)
    return tl.where(valid, st, float("-inf"))


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, T, S, D, scale, qk_scale,
    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
    s_mb, s_mh, s_mt, s_ms, s_gb, s_gh, s_gt, s_gd, s_lb, s_lh, s_lt,
    s_dkb, s_dkh, s_dks, s_dkd, s_dvb, s_dvh, s_dvs, s_dvd,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    key_tile = (cols < S)[:, None] & d_ok[None, :]

    k = tl.load(k_ptr + b * s_kb + h * s_kh + cols[:, None] * s_ks + offs_d[None, :] * s_kd,
                mask=key_tile, other=0.0)
    if NEED_DK:
        v = tl.load(v_ptr + b * s_vb + h * s_vh + cols[:, None] * s_vs + offs_d[None, :] * s_vd,
                    mask=key_tile, other=0.0)
    q_base = q_ptr + b * s_qb + h * s_qh
    g_base = g_ptr + b * s_gb + h * s_gh
    l_base = lse_ptr + b * s_lb + h * s_lh
    m_off = b * s_mb + h * s_mh

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = (n0 // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: first block with a query i ≥ n0
    for m0 in range(lo, T, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < T
        qt = tl.load(q_base + rows[None, :] * s_qt + offs_d[:, None] * s_qd,
                     mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
        st = _masked_scores_t(st, rows, cols, T, S, m_ptr, m_off, s_mt, s_ms, CAUSAL,
                              MASK_KIND)
        lse = tl.load(l_base + rows * s_lt, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        pt = tl.math.exp2(st - lse2[None, :])  # (BLOCK_N, BLOCK_M), final probabilities
        g = tl.load(g_base + rows[:, None] * s_gt + offs_d[None, :] * s_gd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if NEED_DV:
            dv = tl.dot(pt.to(g.dtype), g, dv, input_precision=PRECISION)
        if NEED_DK:
            delta = tl.load(delta_ptr + pid_bh * T + rows, mask=row_ok, other=0.0)
            dpt = tl.dot(v, tl.trans(g), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)

    if NEED_DK:
        tl.store(dk_ptr + b * s_dkb + h * s_dkh + cols[:, None] * s_dks
                 + offs_d[None, :] * s_dkd, (dk * scale).to(dk_ptr.dtype.element_ty),
                 mask=key_tile)
    if NEED_DV:
        tl.store(dv_ptr + b * s_dvb + h * s_dvh + cols[:, None] * s_dvs
                 + offs_d[None, :] * s_dvd, dv.to(dv_ptr.dtype.element_ty), mask=key_tile)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, T, S, D, scale, qk_scale,
    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
    s_mb, s_mh, s_mt, s_ms, s_gb, s_gh, s_gt, s_gd, s_lb, s_lh, s_lt,
    s_dqb, s_dqh, s_dqt, s_dqd,
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
    tile_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=tile_ok, other=0.0)
    g = tl.load(g_ptr + b * s_gb + h * s_gh + offs_m[:, None] * s_gt + offs_d[None, :] * s_gd,
                mask=tile_ok, other=0.0)
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_m * s_lt, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    m_off = b * s_mb + h * s_mh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = _key_bound(pid_m, S, CAUSAL, BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        t_mask = (cols < S)[None, :] & d_ok[:, None]
        kt = tl.load(k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd, mask=t_mask,
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = _masked_scores(s, offs_m, cols, T, S, m_ptr, m_off, s_mt, s_ms, CAUSAL, MASK_KIND)
        p = tl.math.exp2(s - lse2[:, None])
        vt = tl.load(v_base + cols[None, :] * s_vs + offs_d[:, None] * s_vd, mask=t_mask,
                     other=0.0)
        dp = tl.dot(g, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)

    tl.store(dq_ptr + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :] * s_dqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


@launch_on_device
def attention_vjp(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, g: Tensor, *,
                  scale: float | None = None, causal: bool = False, mask: Tensor | None = None,
                  need: tuple[bool, bool, bool] = (True, True, True)
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dq, dk, dv)`` of attention for the output cotangent ``g`` (B, H, T, D), from the
    forward's ``o`` and fp32 ``lse`` (:func:`.attention.attention_forward`); the ones ``need``
    does not ask for are ``None``. Outputs in q's dtype. Operands as for the forward (the
    dispatcher in :mod:`.ops` checks them)."""
    need_q, need_k, need_v = (bool(x) for x in need)
    B, H, T, D = q.shape
    S = k.shape[2]
    dev, dt = q.device, q.dtype
    dq = torch.empty((B, H, T, D), dtype=dt, device=dev) if need_q else None
    dk = torch.empty((B, H, S, D), dtype=dt, device=dev) if need_k else None
    dv = torch.empty((B, H, S, D), dtype=dt, device=dev) if need_v else None
    if T == 0 or S == 0 or B * H == 0 or D == 0:  # empty sums: zeros
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv))
    sc = _scale(q, scale)
    m, kind, m_strides = mask_operand(mask, (B, H, T, S))
    prec = dot_precision(dt)
    block_d = head_block(D)
    delta = None
    if need_q or need_k:
        delta = torch.empty((B, H, T), dtype=torch.float32, device=dev)
        _attention_bwd_preprocess_kernel[(cdiv(T, _DELTA_ROWS), B * H)](
            o, g, delta, H, T, D, *o.stride(), *g.stride(),
            BLOCK_M=_DELTA_ROWS, BLOCK_D=block_d, num_warps=4)
    common = (H, T, S, D, sc, sc * LOG2E, *q.stride(), *k.stride(), *v.stride(), *m_strides,
              *g.stride(), *lse.stride())
    if need_k or need_v:
        bm, bn, warps, stages = dkdv_blocks(block_d, dt, prec)
        _attention_bwd_dkdv_kernel[(cdiv(S, bn), B * H)](
            q, k, v, m, g, lse, delta, dk, dv, *common, *_strides(dk), *_strides(dv),
            CAUSAL=bool(causal), MASK_KIND=kind, NEED_DK=need_k, NEED_DV=need_v,
            PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            num_warps=warps, num_stages=stages)
    if need_q:
        bm, bn, warps, stages = dq_blocks(block_d, dt, prec)
        _attention_bwd_dq_kernel[(cdiv(T, bm), B * H)](
            q, k, v, m, g, lse, delta, dq, *common, *dq.stride(),
            CAUSAL=bool(causal), MASK_KIND=kind, PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return dq, dk, dv
