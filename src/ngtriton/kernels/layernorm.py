"""Row-wise JVP / VJP of LayerNorm over the last dimension, from the cached ``xhat`` and ``rstd``.

Reference: :func:`ngtriton.kernels.reference.layernorm_jvp` / ``layernorm_vjp`` (same signatures).
Each program holds ``BLOCK_R`` whole rows (``BLOCK_D ≥ D``) in registers and does the row
statistics in fp32. The parameter cotangents of the VJP (``Σ_rows ḡ ⊙ x̂`` and ``Σ_rows ḡ``) are
accumulated per program over a fixed run of rows, written as fp32 partials and summed by a second
kernel in a fixed order: deterministic, no atomics. Rows must have unit stride in the feature
dimension (the dispatcher in :mod:`ngtriton.kernels.ops` checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import sum_partials
from ._config import INTERPRET, cdiv, launch_on_device, num_sms

MAX_BLOCK_D = 16384  # wider rows fall back to torch (a whole row must fit in one program)


def _row_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of length D."""
    block_d = triton.next_power_of_2(max(D, 1))
    if INTERPRET:
        return 4, block_d, 4
    block_r = max(1, min(16, 4096 // block_d))
    warps = min(max(block_r * block_d // 1024, 4), 16)
    return block_r, block_d, warps


@triton.jit
def _layernorm_jvp_kernel(
    xh_ptr, rstd_ptr, xd_ptr, w_ptr, wd_ptr, bd_ptr, out_ptr,
    M, D,
    s_xh, s_rstd, s_xd, s_w, s_wd, s_bd, s_out,
    HAS_XDOT: tl.constexpr, HAS_W: tl.constexpr, HAS_WDOT: tl.constexpr,
    HAS_BDOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    xh = tl.load(xh_ptr + rows[:, None] * s_xh + cols[None, :], mask=mask, other=0.0)
    xh = xh.to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    if HAS_XDOT:
        xd = tl.load(xd_ptr + rows[:, None] * s_xd + cols[None, :], mask=mask, other=0.0)
        xd = xd.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * s_rstd, mask=rmask, other=0.0).to(tl.float32)
        mean_d = tl.sum(xd, axis=1) / D
        proj = tl.sum(xd * xh, axis=1) / D
        t = (xd - mean_d[:, None] - xh * proj[:, None]) * rstd[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols * s_w, mask=cmask, other=0.0).to(tl.float32)
            t = t * w[None, :]
        acc += t
    if HAS_WDOT:
        wd = tl.load(wd_ptr + cols * s_wd, mask=cmask, other=0.0).to(tl.float32)
        acc += xh * wd[None, :]
    if HAS_BDOT:
        bd = tl.load(bd_ptr + cols * s_bd, mask=cmask, other=0.0).to(tl.float32)
        acc += bd[None, :]
    tl.store(out_ptr + rows[:, None] * s_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@launch_on_device
def layernorm_jvp(xhat: Tensor, rstd: Tensor, x_dot: Tensor | None, weight: Tensor | None,
                  weight_dot: Tensor | None, bias_dot: Tensor | None) -> Tensor:
    """LayerNorm tangent ``w ⊙ (ẋ − mean ẋ − x̂ mean(ẋ x̂)) rstd + x̂ ⊙ ẇ + ḃ`` (``xhat``'s dtype)."""
    M, D = xhat.shape
    out = torch.empty((M, D), dtype=xhat.dtype, device=xhat.device)
    if M == 0 or D == 0:
        return out
    block_r, block_d, warps = _row_blocks(D)
    grid = (cdiv(M, block_r),)
    _layernorm_jvp_kernel[grid](
        xhat, rstd, x_dot, weight, weight_dot, bias_dot, out, M, D,
        xhat.stride(0), rstd.stride(0), x_dot.stride(0) if x_dot is not None else 0,
        weight.stride(0) if weight is not None else 0,
        weight_dot.stride(0) if weight_dot is not None else 0,
        bias_dot.stride(0) if bias_dot is not None else 0, out.stride(0),
        HAS_XDOT=x_dot is not None, HAS_W=weight is not None and x_dot is not None,
        HAS_WDOT=weight_dot is not None, HAS_BDOT=bias_dot is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


@triton.jit
def _layernorm_vjp_kernel(
    xh_ptr, rstd_ptr, go_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
    M, D, rows_per_prog,
    s_xh, s_rstd, s_go, s_w, s_gx, s_gwp, s_gbp,
    HAS_W: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program pid handles rows [pid * rows_per_prog, ...) in steps of BLOCK_R; gw_ptr/gb_ptr are
    # (programs, D) fp32 partials, or the outputs themselves when there is one program.
    pid = tl.program_id(0)
    r_start = pid * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, M)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    offs_r = tl.arange(0, BLOCK_R)
    if NEED_X and HAS_W:
        w = tl.load(w_ptr + cols * s_w, mask=cmask, other=0.0).to(tl.float32)
    gw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gb_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + offs_r
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        go = tl.load(go_ptr + rows[:, None] * s_go + cols[None, :], mask=mask, other=0.0)
        go = go.to(tl.float32)
        if NEED_X or NEED_W:
            xh = tl.load(xh_ptr + rows[:, None] * s_xh + cols[None, :], mask=mask, other=0.0)
            xh = xh.to(tl.float32)
        if NEED_X:
            rstd = tl.load(rstd_ptr + rows * s_rstd, mask=rmask, other=0.0).to(tl.float32)
            gxh = go * w[None, :] if HAS_W else go
            mean_g = tl.sum(gxh, axis=1) / D
            proj = tl.sum(gxh * xh, axis=1) / D
            gx = (gxh - mean_g[:, None] - xh * proj[:, None]) * rstd[:, None]
            tl.store(gx_ptr + rows[:, None] * s_gx + cols[None, :],
                     gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_W:
            gw_acc += tl.sum(go * xh, axis=0)
        if NEED_B:
            gb_acc += tl.sum(go, axis=0)
    if NEED_W:
        tl.store(gw_ptr + pid * s_gwp + cols, gw_acc.to(gw_ptr.dtype.element_ty), mask=cmask)
    if NEED_B:
        tl.store(gb_ptr + pid * s_gbp + cols, gb_acc.to(gb_ptr.dtype.element_ty), mask=cmask)


@launch_on_device
def layernorm_vjp(xhat: Tensor, rstd: Tensor, grad_out: Tensor, weight: Tensor | None,
                  need_input: bool, need_weight: bool, need_bias: bool
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents ``(gx, gw, gb)`` of LayerNorm; see the module docstring."""
    M, D = xhat.shape
    dtype, device = xhat.dtype, xhat.device
    gx = torch.empty((M, D), dtype=dtype, device=device) if need_input else None
    gw = torch.empty((D,), dtype=dtype, device=device) if need_weight else None
    gb = torch.empty((D,), dtype=dtype, device=device) if need_bias else None
    if not (need_input or need_weight or need_bias) or D == 0:
        return gx, gw, gb
    if M == 0:
        for t in (gw, gb):
            if t is not None:
                t.zero_()
        return gx, gw, gb
    block_r, block_d, warps = _row_blocks(D)
    row_blocks = cdiv(M, block_r)
    if need_weight or need_bias:
        # A fixed number of programs per device and shape: deterministic partial sums.
        progs = min(row_blocks, 4 * num_sms(device))
        rows_per_prog = cdiv(row_blocks, progs) * block_r
        progs = cdiv(M, rows_per_prog)
    else:
        progs, rows_per_prog = row_blocks, block_r
    if progs == 1:
        gw_buf, gb_buf = gw, gb
    else:
        gw_buf = (torch.empty((progs, D), dtype=torch.float32, device=device)
                  if need_weight else None)
        gb_buf = (torch.empty((progs, D), dtype=torch.float32, device=device)
                  if need_bias else None)
    _layernorm_vjp_kernel[(progs,)](
        xhat, rstd, grad_out, weight, gx, gw_buf, gb_buf, M, D, rows_per_prog,
        xhat.stride(0), rstd.stride(0), grad_out.stride(0),
        weight.stride(0) if weight is not None else 0,
        gx.stride(0) if gx is not None else 0,
        gw_buf.stride(0) if (need_weight and progs > 1) else 0,
        gb_buf.stride(0) if (need_bias and progs > 1) else 0,
        HAS_W=weight is not None, NEED_X=need_input, NEED_W=need_weight, NEED_B=need_bias,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    if progs > 1:
        if need_weight:
            sum_partials(gw_buf, gw)
        if need_bias:
            sum_partials(gb_buf, gb)
    return gx, gw, gb
