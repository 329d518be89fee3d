"""Fused JVP / VJP of ``σ(x Wᵀ + b)`` (Linear followed by an elementwise activation).

Reference: :func:`ngtriton.kernels.reference.linear_jvp` / ``linear_vjp`` (same signatures).

- ``linear_jvp``: ONE kernel; ``ẋ Wᵀ`` and ``x Ẇᵀ`` accumulate into the same fp32 tile as one
  pipelined reduction of length 2K (one operand pair per step), and ``+ ḃ`` / ``⊙ σ′`` are
  applied in the epilogue before the single store.
- ``linear_jvp_fvp``: the same kernel with the output-Fisher product of the last layer in its
  epilogue (``EPILOGUE`` constexpr, compiled out when off): ``scale · F_R ẏ`` per row, categorical
  (``p ⊙ ẏ − p (p·ẏ)``, the whole row in one tile: ``out_features ≤ FVP_MAX_N``) or bernoulli
  (``s(1−s) ⊙ ẏ``, any width). Saves the round trip of ``ẏ`` through memory and a launch.
- ``linear_vjp``: ``g = σ′ ⊙ ḡ`` is formed on the fly from the tiles each kernel loads (never
  written to memory). ``gx = g W`` is one kernel; ``gw = gᵀ x`` and ``gb = Σ_rows g`` share one
  kernel (the bias sum comes from the g tiles the programs of the first K-column already load).
  When the batch M is long relative to N·K, the M reduction is split over programs (split-K):
  fp32 partials go to a workspace and are summed by a second kernel in a fixed order —
  deterministic, no atomics.

Accumulation is fp32 throughout; fp16/bf16 operands go to tensor cores; fp32 operands use the
precision torch uses for its own float32 matmuls ("ieee" under torch's default "highest", "tf32"
after ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32``), unless
:func:`ngtriton.kernels.set_matmul_precision` overrides it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import grouped_tile, sum_partials
from ._config import INT32_MAX, INTERPRET, cdiv, dot_precision, launch_on_device, num_sms
from .tiles import (
    _CACHE_RESULTS,
    _FMA_TABLE,
    _INTERP_BLOCKS,
    _TC_TABLE,
    Tile,
    _bucket,
    _configs,
    _grid_tiles,
    _pair_stage,
    _pruner,
    _vjp_stage,
)


@triton.jit
def _load_step(ptrs, mask, EVEN: tl.constexpr):
    """One operand tile of a reduction step: unmasked when every step is whole (``EVEN``), else
    masked along the reduction with zeros, which add nothing to the dot."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# JVP
# ----------------------------------------------------------------------------------------------


_JVP_KEY = ["M_BUCKET", "N", "K", "HAS_XDOT", "HAS_WDOT", "HAS_BDOT", "HAS_DACT", "EPILOGUE",
            "PRECISION"]
_JVP_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")

# Output-Fisher epilogues of the JVP kernel (the EPILOGUE constexpr).
_EPI_NONE, _EPI_CATEGORICAL, _EPI_BERNOULLI = 0, 1, 2
_EPILOGUES = {"categorical": _EPI_CATEGORICAL, "bernoulli": _EPI_BERNOULLI}

# Widest row the categorical epilogue takes in one tile: a 64×256 fp32 accumulator over 8 warps
# (64 per thread) is the widest that leaves the epilogue's state tile in registers; wider rows
# use the separate kernel.
FVP_MAX_N = 256

# Row configurations (BLOCK_M, BLOCK_K, num_warps, num_stages) for the categorical epilogue:
# BLOCK_N is not tuned but set to the row width (next power of two, ≥ 16) by the caller. The
# pruner keeps the entries whose accumulator fits next to the state tile (for the widest rows in
# fp16/bf16 64×256 on 8 warps or 32×256 on 4, in fp32 32×256 on 8) and whose stages fit
# (BLOCK_K 32 for fp32 operands).
# The 32-row tiles also serve narrow outputs over a short batch, where 128-row tiles would leave
# most SMs idle.
_ROW_TC_TABLE = [
    (128, 64, 8, 4),
    (128, 64, 4, 4),
    (64, 64, 8, 4),
    (64, 64, 4, 4),
    (32, 64, 4, 4),
    (64, 32, 8, 4),  # fp32 (tf32)
    (32, 32, 4, 4),
    (32, 32, 8, 4),  # fp32 state and σ′ next to a 256-wide row
]
_ROW_FMA_TABLE = [
    (64, 32, 8, 3),
    (32, 32, 4, 3),
    (32, 32, 8, 3),
]
_ROW_NAMES = ("BLOCK_M", "BLOCK_K")


def _jvp_elem_bytes(kw: dict, itemsize: int) -> int:
    """The fp32 accumulator, and σ′ and the output-Fisher state when the epilogue loads them."""
    tiles = int(bool(kw.get("HAS_DACT", True))) + int(int(kw.get("EPILOGUE", 0)) != 0)
    return 4 + tiles * itemsize


@triton.jit
def _linear_jvp_body(
    x_ptr, xd_ptr, w_ptr, wd_ptr, bd_ptr, da_ptr, st_ptr, out_ptr,
    M, N, K, M_BUCKET,
    s_xm, s_xk, s_xdm, s_xdk, s_wn, s_wk, s_wdn, s_wdk, s_bd, s_dam, s_dan, s_stm, s_stn,
    s_om, s_on, scale,
    HAS_XDOT: tl.constexpr, HAS_WDOT: tl.constexpr, HAS_BDOT: tl.constexpr,
    HAS_DACT: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns are wrapped into range for the loads (no masks in the K-loop
    # except on a ragged K, i.e. not EVEN_K); the store is masked.
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    # ẋ Wᵀ + x Ẇᵀ as ONE reduction of length 2K: steps [0, nk) stream (ẋ, W), steps [nk, 2nk)
    # stream (x, Ẇ), each step one operand pair into the same fp32 accumulator. One loop with one
    # dot is what the sm_90 pipeliner turns into cp.async stages feeding async wgmma; two dots
    # per step made it wait on the first before issuing the second. The switch at step nk is a
    # select of the (loop-carried) pointer tiles, so the loads stay pipelined across it. With one
    # tangent only (constexpr), only its pair streams.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_XDOT or HAS_WDOT:
        nk = tl.cdiv(K, BLOCK_K)
        if HAS_XDOT:
            a_ptrs = xd_ptr + rm[:, None] * s_xdm + offs_k[None, :] * s_xdk
            b_ptrs = w_ptr + offs_k[:, None] * s_wk + rn[None, :] * s_wn
            a_step = BLOCK_K * s_xdk
            b_step = BLOCK_K * s_wk
        else:
            a_ptrs = x_ptr + rm[:, None] * s_xm + offs_k[None, :] * s_xk
            b_ptrs = wd_ptr + offs_k[:, None] * s_wdk + rn[None, :] * s_wdn
            a_step = BLOCK_K * s_xk
            b_step = BLOCK_K * s_wdk
        if HAS_XDOT and HAS_WDOT:
            n_steps = 2 * nk
            a2_ptrs = x_ptr + rm[:, None] * s_xm + offs_k[None, :] * s_xk
            b2_ptrs = wd_ptr + offs_k[:, None] * s_wdk + rn[None, :] * s_wdn
        else:
            n_steps = nk
        for i in range(0, n_steps):
            kmask = ((i % nk) * BLOCK_K + offs_k) < K  # unused (compiled out) when EVEN_K
            a = _load_step(a_ptrs, kmask[None, :], EVEN_K)
            b = _load_step(b_ptrs, kmask[:, None], EVEN_K)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if HAS_XDOT and HAS_WDOT:
                second = i == nk - 1
                a_ptrs = tl.where(second, a2_ptrs, a_ptrs + a_step)
                b_ptrs = tl.where(second, b2_ptrs, b_ptrs + b_step)
                a_step = tl.where(second, BLOCK_K * s_xk, a_step)
                b_step = tl.where(second, BLOCK_K * s_wdk, b_step)
            else:
                a_ptrs += a_step
                b_ptrs += b_step

    # Epilogue, in fp32: + ḃ, ⊙ σ′, one store in the output dtype.
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BDOT:
        bd = tl.load(bd_ptr + offs_n * s_bd, mask=mask_n, other=0.0).to(tl.float32)
        acc += bd[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_DACT:
        da = tl.load(da_ptr + offs_m[:, None] * s_dam + offs_n[None, :] * s_dan, mask=mask,
                     other=0.0)
        acc *= da.to(tl.float32)
    if EPILOGUE != 0:  # scale · F_R ẏ per row, on the fp32 tile
        st = tl.load(st_ptr + offs_m[:, None] * s_stm + offs_n[None, :] * s_stn, mask=mask,
                     other=0.0).to(tl.float32)
        if EPILOGUE == 1:  # categorical: p ⊙ ẏ − p (p·ẏ); the tile spans the whole row
            py = tl.where(mask, st * acc, 0.0)  # wrapped columns must not enter the sum
            acc = py - st * tl.sum(py, axis=1)[:, None]
        else:  # bernoulli: s(1−s) ⊙ ẏ
            acc = st * (1.0 - st) * acc
        acc = acc * scale
    out_ptrs = out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _even(dim: str, block: str):
    """Heuristic: the reduction ``dim`` is a multiple of the tuned ``block`` (no K-loop mask)."""
    return lambda args: args[dim] % args[block] == 0


_linear_jvp_even = triton.heuristics({"EVEN_K": _even("K", "BLOCK_K")})(_linear_jvp_body)

# One kernel body, two tuners: the general one (BLOCK_N tuned; no epilogue, or an elementwise
# one) and the row one (BLOCK_N = the row width, for the categorical row reduction).
_linear_jvp_kernel = triton.autotune(
    configs=_configs(_JVP_NAMES, _TC_TABLE, _FMA_TABLE, _INTERP_BLOCKS),
    key=_JVP_KEY,
    cache_results=_CACHE_RESULTS,
    prune_configs_by={"early_config_prune": _pruner(
        _JVP_NAMES, _pair_stage, _jvp_elem_bytes, _grid_tiles("M_BUCKET", "N"))},
)(_linear_jvp_even)
_linear_jvp_row_kernel = triton.autotune(
    configs=_configs(_ROW_NAMES, _ROW_TC_TABLE, _ROW_FMA_TABLE,
                     (_INTERP_BLOCKS[0], _INTERP_BLOCKS[2])),
    key=_JVP_KEY,
    cache_results=_CACHE_RESULTS,
    prune_configs_by={"early_config_prune": _pruner(
        _JVP_NAMES, _pair_stage, _jvp_elem_bytes, _grid_tiles("M_BUCKET", "N"))},
)(_linear_jvp_even)


def _strides(t: Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


# Operands of the reduction loops whose address or row stride Triton cannot prove 16-byte
# aligned (a pointer not a multiple of 16 bytes, a stride not a multiple of 16 elements: the
# launch specializes on exactly these) compile to scalar loads: no 16-byte ``cp.async``, so no
# pipelining, and pointer tiles that spill. Tangents are views into the flat parameter vector, so
# their offsets are arbitrary, and a layer of width 300 gives rows of 300 elements. Such an
# operand is copied once per call into a 16-byte-aligned buffer whose rows are padded to 16
# elements (one read and one write of the operand, against the kernel reading it once per
# output tile column); ``REALIGN = False`` turns this off.
# tests/kernels/test_compile_sm90.py compiles both forms for sm_90.
REALIGN = True
_ALIGN_BYTES = 16
_ALIGN_ELEMS = 16


def is_aligned(t: Tensor) -> bool:
    """Whether a launch can prove every row of ``t`` 16-byte aligned: its address a multiple of
    16 bytes and each stride either 1 or a multiple of 16 elements."""
    return (t.data_ptr() % _ALIGN_BYTES == 0
            and all(s == 1 or s % _ALIGN_ELEMS == 0 for s in t.stride()))


def aligned_copy(t: Tensor) -> Tensor:
    """A row-major copy of the 2-D ``t`` with 16-byte-aligned rows (rows padded to a multiple of
    16 elements; the padding is never read)."""
    rows, cols = t.shape
    buf = torch.empty((rows, cdiv(max(cols, 1), _ALIGN_ELEMS) * _ALIGN_ELEMS), dtype=t.dtype,
                      device=t.device)
    out = buf[:, :cols]
    out.copy_(t)
    return out


def _streamable(t: Tensor | None) -> Tensor | None:
    """``t`` (2-D) as a reduction loop streams it best: with 16-byte-aligned rows (copied when
    it has not, see ``REALIGN``), and with a unit stride in one of its dimensions (copied if it
    has none).

    A launch specializes unit strides to constants, which is what lets the reduction loop's loads
    vectorize into 16-byte ``cp.async`` copies and be pipelined; a view strided in both
    dimensions (e.g. ``x[:, ::2]``) would be read element by element, unpipelined, with
    spilling pointer tiles. One copy is cheaper.
    """
    if t is None or t.numel() <= 1:
        return t
    if REALIGN and not is_aligned(t):
        return aligned_copy(t)
    if 1 not in t.stride():
        return t.contiguous()
    return t


@launch_on_device
def linear_jvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
               bias_dot: Tensor | None, dact: Tensor | None) -> Tensor:
    """``dact ⊙ (x_dot Wᵀ + x weight_dotᵀ + bias_dot)`` in one kernel; output dtype = ``x.dtype``.

    x, x_dot: (M, K); weight, weight_dot: (N, K); bias_dot: (N,); dact: (M, N). All on one device
    with one dtype (fp32/fp16/bf16); any of the optional arguments may be ``None``.
    """
    return _launch_jvp(x, x_dot, weight, weight_dot, bias_dot, dact, None, _EPI_NONE, 1.0)


@launch_on_device
def linear_jvp_fvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
                   bias_dot: Tensor | None, dact: Tensor | None, state: Tensor, kind: str,
                   scale: float) -> Tensor:
    """``scale · F_R ẏ`` per row with ``ẏ`` the :func:`linear_jvp` tangent, in one kernel.

    ``kind`` ``"categorical"`` (``state`` = probabilities p, ``F_R ẏ = p ⊙ ẏ − p (p·ẏ)``; needs
    ``out_features ≤ FVP_MAX_N``) or ``"bernoulli"`` (``state`` = s, ``F_R ẏ = s(1−s) ⊙ ẏ``);
    ``state``: (M, N) like the output. ``ẏ`` stays in fp32 between the two products.
    """
    epi = _EPILOGUES.get(kind)
    if epi is None:
        raise ValueError(f"kind: expected one of {list(_EPILOGUES)}, got {kind!r}")
    if epi == _EPI_CATEGORICAL and weight.shape[0] > FVP_MAX_N:
        raise ValueError(f"categorical epilogue: out_features {weight.shape[0]} > {FVP_MAX_N}")
    return _launch_jvp(x, x_dot, weight, weight_dot, bias_dot, dact, state, epi, float(scale))


def _launch_jvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
                bias_dot: Tensor | None, dact: Tensor | None, state: Tensor | None,
                epilogue: int, scale: float) -> Tensor:
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    x, x_dot, weight, weight_dot = map(_streamable, (x, x_dot, weight, weight_dot))
    if epilogue == _EPI_CATEGORICAL:  # one column tile spanning the row (tl.dot needs ≥ 16)
        kernel, fixed = _linear_jvp_row_kernel, {"BLOCK_N": max(16, triton.next_power_of_2(N))}
    else:
        kernel, fixed = _linear_jvp_kernel, {}

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    kernel[grid](
        x, x_dot, weight, weight_dot, bias_dot, dact, state, out,
        M, N, K, _bucket(M),
        *x.stride(), *_strides(x_dot, 2), *weight.stride(), *_strides(weight_dot, 2),
        *_strides(bias_dot, 1), *_strides(dact, 2), *_strides(state, 2), *out.stride(), scale,
        HAS_XDOT=x_dot is not None, HAS_WDOT=weight_dot is not None,
        HAS_BDOT=bias_dot is not None, HAS_DACT=dact is not None, EPILOGUE=epilogue,
        PRECISION=dot_precision(x.dtype), **fixed,
    )
    return out


# ----------------------------------------------------------------------------------------------
# VJP: input cotangent gx = g W, g = dact ⊙ grad_out formed per tile
# ----------------------------------------------------------------------------------------------


_DX_NAMES = ("BLOCK_M", "BLOCK_K", "BLOCK_N")  # output (M, K) tiles, reduction over N


def _vjp_elem_bytes(kw: dict, itemsize: int) -> int:
    """The fp32 accumulator, with room for ``g = σ′ ⊙ ḡ``, which the VJP kernels form in
    registers each step (its tiles span the reduction, not the output, hence a flat 4 B)."""
    return 8


@triton.autotune(
    configs=_configs(_DX_NAMES, _TC_TABLE, _FMA_TABLE, _INTERP_BLOCKS),
    key=["M_BUCKET", "N", "K", "HAS_DACT", "PRECISION"],
    cache_results=_CACHE_RESULTS,
    prune_configs_by={"early_config_prune": _pruner(
        _DX_NAMES, _vjp_stage, _vjp_elem_bytes, _grid_tiles("M_BUCKET", "K"))},
)
@triton.heuristics({"EVEN_N": _even("N", "BLOCK_N")})
@triton.jit
def _linear_vjp_dx_kernel(
    go_ptr, da_ptr, w_ptr, gx_ptr,
    M, N, K, M_BUCKET,
    s_gom, s_gon, s_dam, s_dan, s_wn, s_wk, s_gxm, s_gxk,
    HAS_DACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    # Output tile (BLOCK_M, BLOCK_K) of gx; reduction over N in steps of BLOCK_N, one operand
    # pair (g, W) per step: g = σ′ ⊙ ḡ is formed in registers from the two pipelined tiles and
    # goes to the tensor cores as the register operand.
    pid = tl.program_id(0)
    pid_m, pid_k = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = offs_m % M
    rk = offs_k % K
    offs_n = tl.arange(0, BLOCK_N)

    go_ptrs = go_ptr + rm[:, None] * s_gom + offs_n[None, :] * s_gon
    if HAS_DACT:
        da_ptrs = da_ptr + rm[:, None] * s_dam + offs_n[None, :] * s_dan
    w_ptrs = w_ptr + offs_n[:, None] * s_wn + rk[None, :] * s_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nmask = (n0 + offs_n) < N
        g = _load_step(go_ptrs, nmask[None, :], EVEN_N)
        w = _load_step(w_ptrs, nmask[:, None], EVEN_N)
        if HAS_DACT:
            da = _load_step(da_ptrs, nmask[None, :], EVEN_N)
            g = (g.to(tl.float32) * da.to(tl.float32)).to(g.dtype)
            da_ptrs += BLOCK_N * s_dan
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        go_ptrs += BLOCK_N * s_gon
        w_ptrs += BLOCK_N * s_wn

    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    gx_ptrs = gx_ptr + offs_m[:, None] * s_gxm + offs_k[None, :] * s_gxk
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# VJP: weight cotangent gw = gᵀ x (N, K) and bias cotangent gb = Σ_rows g, split over M
# ----------------------------------------------------------------------------------------------

_DW_NAMES = ("BLOCK_N", "BLOCK_K", "BLOCK_M")  # output (N, K) tiles, reduction over M


def _dw_programs(tile: Tile, kw: dict) -> int:
    split = cdiv(int(kw["M"]), max(int(kw["rows_per_split"]), 1))
    nk = cdiv(int(kw["K"]), tile[1]) if kw.get("NEED_W", True) else 1
    return cdiv(int(kw["N"]), tile[0]) * nk * split


def _dw_even(args: dict) -> bool:
    """Every split's run of rows is whole BLOCK_M steps (no mask in the M-loop)."""
    return args["M"] % args["BLOCK_M"] == 0 and args["rows_per_split"] % args["BLOCK_M"] == 0


@triton.autotune(
    configs=_configs(_DW_NAMES, _TC_TABLE, _FMA_TABLE, _INTERP_BLOCKS),
    key=["M_BUCKET", "N", "K", "HAS_DACT", "NEED_W", "NEED_B", "PRECISION"],
    cache_results=_CACHE_RESULTS,
    prune_configs_by={"early_config_prune": _pruner(
        _DW_NAMES, _vjp_stage, _vjp_elem_bytes, _dw_programs)},
)
@triton.heuristics({"EVEN_M": _dw_even})
@triton.jit
def _linear_vjp_dw_kernel(
    go_ptr, da_ptr, x_ptr, gw_ptr, gb_ptr,
    M, N, K, rows_per_split, M_BUCKET,
    s_gom, s_gon, s_dam, s_dan, s_xm, s_xk,
    s_gws, s_gwn, s_gwk, s_gbs, s_gbn,
    HAS_DACT: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
    EVEN_M: tl.constexpr,
):
    # Program (tile, split): output tile (BLOCK_N, BLOCK_K) of gw over the rows of one split.
    # gw_ptr/gb_ptr point at the outputs (one split: stored in their dtype) or at fp32 workspaces
    # indexed by the split (then reduced by sum_partials).
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K) if NEED_W else 1
    pid_n, pid_k = grouped_tile(pid, tl.cdiv(N, BLOCK_N), num_k, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = offs_n % N
    offs_m = tl.arange(0, BLOCK_M)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    go_ptrs = go_ptr + (m_start + offs_m)[:, None] * s_gom + rn[None, :] * s_gon
    if HAS_DACT:
        da_ptrs = da_ptr + (m_start + offs_m)[:, None] * s_dam + rn[None, :] * s_dan
    if NEED_W:
        rk = offs_k % K
        x_ptrs = x_ptr + (m_start + offs_m)[:, None] * s_xm + rk[None, :] * s_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        mmask = (m0 + offs_m) < m_end
        g = _load_step(go_ptrs, mmask[:, None], EVEN_M)
        if HAS_DACT:
            da = _load_step(da_ptrs, mmask[:, None], EVEN_M)
            g32 = g.to(tl.float32) * da.to(tl.float32)
            g = g32.to(g.dtype)  # the dot operand; the bias sum keeps the fp32 product
            da_ptrs += BLOCK_M * s_dam
        if NEED_B:  # noqa: SIM102 - constexpr test outside, runtime test inside
            if pid_k == 0:
                if HAS_DACT:
                    bacc += tl.sum(g32, axis=0)
                else:
                    bacc += tl.sum(g.to(tl.float32), axis=0)
        if NEED_W:
            xt = _load_step(x_ptrs, mmask[:, None], EVEN_M)
            acc = tl.dot(tl.trans(g), xt, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_M * s_xm
        go_ptrs += BLOCK_M * s_gom

    mask_n = offs_n < N
    if NEED_W:
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        gw_ptrs = gw_ptr + pid_s * s_gws + offs_n[:, None] * s_gwn + offs_k[None, :] * s_gwk
        tl.store(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=mask)
    if NEED_B:  # noqa: SIM102 - constexpr test outside, runtime test inside
        if pid_k == 0:
            tl.store(gb_ptr + pid_s * s_gbs + offs_n * s_gbn, bacc.to(gb_ptr.dtype.element_ty),
                     mask=mask_n)


# Split-K over the batch for the weight cotangent: fill the machine when the (N, K) output has
# fewer tiles than SMs and each split still gets a long run of rows.
_SPLIT_TILE = 16 if INTERPRET else 128
_SPLIT_MIN_ROWS = 32 if INTERPRET else 512
_SPLIT_ALIGN = 16 if INTERPRET else 128
_SPLIT_MAX = 64


def choose_split(M: int, N: int, K: int, device: torch.device, need_weight: bool = True,
                 sms: int | None = None) -> tuple[int, int]:
    """(number of splits, rows per split) of the batch reduction of ``gw``/``gb``; ``sms``
    overrides the device's SM count (compile-only checks)."""
    tiles = cdiv(N, _SPLIT_TILE) * (cdiv(K, _SPLIT_TILE) if need_weight else 1)
    sms = num_sms(device) if sms is None else sms
    max_split = min(M // _SPLIT_MIN_ROWS, _SPLIT_MAX)
    if max_split < 2 or tiles >= sms:
        return 1, max(M, 1)
    split = min(max_split, cdiv(2 * sms, tiles))
    split = min(split, _max_split(N, K, need_weight))
    if split < 2:
        return 1, max(M, 1)
    rows = cdiv(cdiv(M, split), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return cdiv(M, rows), rows


def _max_split(N: int, K: int, need_weight: bool) -> int:
    """Most splits whose fp32 workspace ``(split, N, K)`` 32-bit offsets still reach."""
    return max(1, INT32_MAX // max(N * (K if need_weight else 1), 1))


def linear_vjp(x: Tensor, weight: Tensor, grad_out: Tensor, dact: Tensor | None,
               need_input: bool, need_weight: bool, need_bias: bool
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents ``(gx, gw, gb)`` of ``σ(x Wᵀ + b)`` from ``grad_out`` (module docstring)."""
    return linear_vjp_split(x, weight, grad_out, dact, need_input, need_weight, need_bias)


@launch_on_device
def linear_vjp_split(x: Tensor, weight: Tensor, grad_out: Tensor, dact: Tensor | None,
                     need_input: bool, need_weight: bool, need_bias: bool,
                     split: int | None = None
                     ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`linear_vjp` with an explicit number of batch splits for ``gw``/``gb`` (tests)."""
    M, K = x.shape
    N = weight.shape[0]
    dtype, device = x.dtype, x.device
    prec = dot_precision(dtype)
    x, weight, grad_out, dact = map(_streamable, (x, weight, grad_out, dact))
    has_dact = dact is not None
    gx = gw = gb = None
    da_strides = _strides(dact, 2)

    if need_input:
        gx = torch.empty((M, K), dtype=dtype, device=device)
        if N == 0:
            gx.zero_()
        elif M > 0 and K > 0:
            def grid_x(meta):
                return (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)

            _linear_vjp_dx_kernel[grid_x](
                grad_out, dact, weight, gx, M, N, K, _bucket(M),
                *grad_out.stride(), *da_strides, *weight.stride(), *gx.stride(),
                HAS_DACT=has_dact, PRECISION=prec,
            )

    if need_weight or need_bias:
        if need_weight:
            gw = torch.empty((N, K), dtype=dtype, device=device)
        if need_bias:
            gb = torch.empty((N,), dtype=dtype, device=device)
        if M == 0 or N == 0 or (need_weight and K == 0 and not need_bias):
            for t in (gw, gb):
                if t is not None:
                    t.zero_()
            return gx, gw, gb
        need_w = need_weight and K > 0
        if need_weight and K == 0:
            gw.zero_()
        if split is None:
            split, rows = choose_split(M, N, K, device, need_w)
        else:
            split = max(1, min(int(split), M, _max_split(N, K, need_w)))
            rows = cdiv(M, split)
            split = cdiv(M, rows)
        if split == 1:
            gw_buf, gb_buf = (gw if need_w else None), gb
            gw_s, gb_s = 0, 0
        else:
            gw_buf = (torch.empty((split, N, K), dtype=torch.float32, device=device)
                      if need_w else None)
            gb_buf = (torch.empty((split, N), dtype=torch.float32, device=device)
                      if need_bias else None)
            gw_s = gw_buf.stride(0) if need_w else 0
            gb_s = gb_buf.stride(0) if need_bias else 0
        gw_strides = (gw_buf.stride(-2), gw_buf.stride(-1)) if need_w else (0, 0)
        gb_stride = gb_buf.stride(-1) if need_bias else 0

        def grid_w(meta):
            nk = cdiv(K, meta["BLOCK_K"]) if need_w else 1
            return (cdiv(N, meta["BLOCK_N"]) * nk, split)

        _linear_vjp_dw_kernel[grid_w](
            grad_out, dact, x, gw_buf, gb_buf, M, N, K, rows, _bucket(rows),
            *grad_out.stride(), *da_strides, *x.stride(),
            gw_s, *gw_strides, gb_s, gb_stride,
            HAS_DACT=has_dact, NEED_W=need_w, NEED_B=need_bias, PRECISION=prec,
        )
        if split > 1:
            if need_w:
                sum_partials(gw_buf, gw)
            if need_bias:
                sum_partials(gb_buf, gb)
    return gx, gw, gb
