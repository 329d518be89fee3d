"""Fused JVP / VJP of ``σ(x Wᵀ + b)`` (Linear followed by an elementwise activation).

Reference: :func:`ngtriton.linearize.ops_torch.linear_jvp` / ``linear_vjp`` (same signatures).

- ``linear_jvp``: ONE kernel; ``ẋ Wᵀ`` and ``x Ẇᵀ`` accumulate into the same fp32 tile over the
  shared reduction dimension K, and ``+ ḃ`` / ``⊙ σ′`` are applied in the epilogue before the single
  store.
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
precision selected by :func:`ngtriton.kernels.set_matmul_precision` ("ieee" by default).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import grouped_tile, sum_partials
from ._config import INTERPRET, cdiv, dot_precision, num_sms

# ----------------------------------------------------------------------------------------------
# Launch configurations. Hopper (H100): 128-256 wide tiles, 3-4 stages, 4-8 warps. Under the
# interpreter one small fixed configuration (autotuning there would run every config in Python).
# ----------------------------------------------------------------------------------------------


def _configs(names: tuple[str, str, str], table: list[tuple[int, int, int, int, int]],
             interp: tuple[int, int, int]) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config(dict(zip(names, interp), GROUP=4), num_warps=4, num_stages=1)]
    return [triton.Config(dict(zip(names, (a, b, c)), GROUP=8), num_warps=w, num_stages=s)
            for a, b, c, w, s in table]


# (rows, cols, reduction, num_warps, num_stages)
_MM_TABLE = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
]
# The JVP streams two operand pairs per K step (twice the shared memory per stage), so it also
# gets narrower-K variants.
_JVP_TABLE = [*_MM_TABLE, (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (64, 256, 32, 4, 4),
              (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)]

_INTERP_BLOCKS = (16, 16, 16)

# Shared memory per SM on Hopper is 227 KiB; configs whose pipelined operand tiles do not fit are
# dropped before autotuning instead of failing to compile one by one.
_SMEM_BUDGET = 220 * 1024


def _smem_pruner(stage_elems):
    """``early_config_prune`` keeping configs whose ``stages × stage_elems × itemsize`` fits."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        itemsize = next(v.element_size() for v in named_args.values() if isinstance(v, Tensor))
        fits = [c for c in configs
                if c.num_stages * stage_elems(c.kwargs, kwargs) * itemsize <= _SMEM_BUDGET]
        if fits:
            return fits
        return [min(configs, key=lambda c: c.num_stages * stage_elems(c.kwargs, kwargs))]

    return prune


def _jvp_stage(cfg, kw):  # both operand pairs stream (M+N)×K per stage
    pairs = int(bool(kw.get("HAS_XDOT", True))) + int(bool(kw.get("HAS_WDOT", True)))
    block_n = cfg.get("BLOCK_N", kw.get("BLOCK_N"))  # the row configs take BLOCK_N from the call
    return max(pairs, 1) * (cfg["BLOCK_M"] + block_n) * cfg["BLOCK_K"]


def _dx_stage(cfg, kw):  # grad_out (and dact) M×N tiles, weight N×K
    n_g = 2 if kw.get("HAS_DACT", True) else 1
    return cfg["BLOCK_N"] * (n_g * cfg["BLOCK_M"] + cfg["BLOCK_K"])


def _dw_stage(cfg, kw):  # grad_out (and dact) M×N tiles, x M×K
    n_g = 2 if kw.get("HAS_DACT", True) else 1
    return cfg["BLOCK_M"] * (n_g * cfg["BLOCK_N"] + cfg["BLOCK_K"])


# ----------------------------------------------------------------------------------------------
# JVP
# ----------------------------------------------------------------------------------------------


def _bucket(m: int) -> int:
    """Autotuning key for the batch dimension: the next power of two, so that a model fed
    varying batch × sequence lengths tunes once per bucket, not once per length."""
    return triton.next_power_of_2(max(int(m), 1))


_JVP_KEY = ["M_BUCKET", "N", "K", "HAS_XDOT", "HAS_WDOT", "HAS_BDOT", "HAS_DACT", "EPILOGUE",
            "PRECISION"]

# Output-Fisher epilogues of the JVP kernel (the EPILOGUE constexpr).
_EPI_NONE, _EPI_CATEGORICAL, _EPI_BERNOULLI = 0, 1, 2
_EPILOGUES = {"categorical": _EPI_CATEGORICAL, "bernoulli": _EPI_BERNOULLI}

# Widest row the categorical epilogue takes in one tile: a 256-wide fp32 accumulator is what
# Hopper's widest matmul tiles hold (128×256 over 8 warps); wider rows use the separate kernel.
FVP_MAX_N = 256

# Row configurations (BLOCK_M, BLOCK_K, num_warps, num_stages) for the categorical epilogue:
# BLOCK_N is not tuned but set to the row width (next power of two, ≥ 16) by the caller. 8 warps
# for the 256-wide rows (a 32×256 tile on 4 warps spills heavily in an sm_90 compile), 4 warps
# for the narrow ones.
_ROW_TABLE = [
    (128, 32, 8, 3),
    (64, 32, 8, 3),
    (64, 64, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
    (64, 32, 4, 4),
]


def _row_configs() -> list[triton.Config]:
    if INTERPRET:
        bm, _, bk = _INTERP_BLOCKS
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk, GROUP=4), num_warps=4,
                              num_stages=1)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_K=k, GROUP=8), num_warps=w, num_stages=s)
            for m, k, w, s in _ROW_TABLE]


@triton.jit
def _linear_jvp_body(
    x_ptr, xd_ptr, w_ptr, wd_ptr, bd_ptr, da_ptr, st_ptr, out_ptr,
    M, N, K, M_BUCKET,
    s_xm, s_xk, s_xdm, s_xdk, s_wn, s_wk, s_wdn, s_wdk, s_bd, s_dam, s_dan, s_stm, s_stn,
    s_om, s_on, scale,
    HAS_XDOT: tl.constexpr, HAS_WDOT: tl.constexpr, HAS_BDOT: tl.constexpr,
    HAS_DACT: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns are wrapped into range for the loads (no masks in the main loop
    # except along K); the store is masked.
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_XDOT:
        a1_ptrs = xd_ptr + rm[:, None] * s_xdm + offs_k[None, :] * s_xdk
        b1_ptrs = w_ptr + offs_k[:, None] * s_wk + rn[None, :] * s_wn
    if HAS_WDOT:
        a2_ptrs = x_ptr + rm[:, None] * s_xm + offs_k[None, :] * s_xk
        b2_ptrs = wd_ptr + offs_k[:, None] * s_wdk + rn[None, :] * s_wdn
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        if HAS_XDOT:
            a1 = tl.load(a1_ptrs, mask=kmask[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=kmask[:, None], other=0.0)
            acc = tl.dot(a1, b1, acc, input_precision=PRECISION)
            a1_ptrs += BLOCK_K * s_xdk
            b1_ptrs += BLOCK_K * s_wk
        if HAS_WDOT:
            a2 = tl.load(a2_ptrs, mask=kmask[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=kmask[:, None], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
            a2_ptrs += BLOCK_K * s_xk
            b2_ptrs += BLOCK_K * s_wdk

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


# One kernel body, two tuners: the general one (BLOCK_N tuned; no epilogue, or an elementwise
# one) and the row one (BLOCK_N = the row width, for the categorical row reduction).
_linear_jvp_kernel = triton.autotune(
    configs=_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), _JVP_TABLE, _INTERP_BLOCKS),
    key=_JVP_KEY, prune_configs_by={"early_config_prune": _smem_pruner(_jvp_stage)},
)(_linear_jvp_body)
_linear_jvp_row_kernel = triton.autotune(
    configs=_row_configs(), key=_JVP_KEY,
    prune_configs_by={"early_config_prune": _smem_pruner(_jvp_stage)},
)(_linear_jvp_body)


def _strides(t: Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def linear_jvp(x: Tensor, x_dot: Tensor | None, weight: Tensor, weight_dot: Tensor | None,
               bias_dot: Tensor | None, dact: Tensor | None) -> Tensor:
    """``dact ⊙ (x_dot Wᵀ + x weight_dotᵀ + bias_dot)`` in one kernel; output dtype = ``x.dtype``.

    x, x_dot: (M, K); weight, weight_dot: (N, K); bias_dot: (N,); dact: (M, N). All on one device
    with one dtype (fp32/fp16/bf16); any of the optional arguments may be ``None``.
    """
    return _launch_jvp(x, x_dot, weight, weight_dot, bias_dot, dact, None, _EPI_NONE, 1.0)


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


@triton.autotune(
    configs=_configs(("BLOCK_M", "BLOCK_K", "BLOCK_N"), _MM_TABLE, _INTERP_BLOCKS),
    key=["M_BUCKET", "N", "K", "HAS_DACT", "PRECISION"],
    prune_configs_by={"early_config_prune": _smem_pruner(_dx_stage)},
)
@triton.jit
def _linear_vjp_dx_kernel(
    go_ptr, da_ptr, w_ptr, gx_ptr,
    M, N, K, M_BUCKET,
    s_gom, s_gon, s_dam, s_dan, s_wn, s_wk, s_gxm, s_gxk,
    HAS_DACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    # Output tile (BLOCK_M, BLOCK_K) of gx; reduction over N in steps of BLOCK_N.
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
        g = tl.load(go_ptrs, mask=nmask[None, :], other=0.0)
        if HAS_DACT:
            da = tl.load(da_ptrs, mask=nmask[None, :], other=0.0)
            g = (g.to(tl.float32) * da.to(tl.float32)).to(g.dtype)
            da_ptrs += BLOCK_N * s_dan
        w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        go_ptrs += BLOCK_N * s_gon
        w_ptrs += BLOCK_N * s_wn

    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    gx_ptrs = gx_ptr + offs_m[:, None] * s_gxm + offs_k[None, :] * s_gxk
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# VJP: weight cotangent gw = gᵀ x (N, K) and bias cotangent gb = Σ_rows g, split over M
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(("BLOCK_N", "BLOCK_K", "BLOCK_M"), _MM_TABLE, _INTERP_BLOCKS),
    key=["M", "N", "K", "rows_per_split", "HAS_DACT", "NEED_W", "NEED_B", "PRECISION"],
    prune_configs_by={"early_config_prune": _smem_pruner(_dw_stage)},
)
@triton.jit
def _linear_vjp_dw_kernel(
    go_ptr, da_ptr, x_ptr, gw_ptr, gb_ptr,
    M, N, K, rows_per_split,
    s_gom, s_gon, s_dam, s_dan, s_xm, s_xk,
    s_gws, s_gwn, s_gwk, s_gbs, s_gbn,
    HAS_DACT: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
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
        g = tl.load(go_ptrs, mask=mmask[:, None], other=0.0)
        if HAS_DACT:
            da = tl.load(da_ptrs, mask=mmask[:, None], other=0.0)
            g32 = g.to(tl.float32) * da.to(tl.float32)
            da_ptrs += BLOCK_M * s_dam
        else:
            g32 = g.to(tl.float32)
        if NEED_B:  # noqa: SIM102 - constexpr test outside, runtime test inside
            if pid_k == 0:
                bacc += tl.sum(g32, axis=0)
        if NEED_W:
            xt = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
            acc = tl.dot(tl.trans(g32.to(xt.dtype)), xt, acc, input_precision=PRECISION)
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


def choose_split(M: int, N: int, K: int, device: torch.device, need_weight: bool = True
                 ) -> tuple[int, int]:
    """(number of splits, rows per split) of the batch reduction of ``gw``/``gb``."""
    tiles = cdiv(N, _SPLIT_TILE) * (cdiv(K, _SPLIT_TILE) if need_weight else 1)
    sms = num_sms(device)
    max_split = min(M // _SPLIT_MIN_ROWS, _SPLIT_MAX)
    if max_split < 2 or tiles >= sms:
        return 1, max(M, 1)
    split = min(max_split, cdiv(2 * sms, tiles))
    if split < 2:
        return 1, max(M, 1)
    rows = cdiv(cdiv(M, split), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return cdiv(M, rows), rows


def linear_vjp(x: Tensor, weight: Tensor, grad_out: Tensor, dact: Tensor | None,
               need_input: bool, need_weight: bool, need_bias: bool
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents ``(gx, gw, gb)`` of ``σ(x Wᵀ + b)`` from ``grad_out`` (module docstring)."""
    return linear_vjp_split(x, weight, grad_out, dact, need_input, need_weight, need_bias)


def linear_vjp_split(x: Tensor, weight: Tensor, grad_out: Tensor, dact: Tensor | None,
                     need_input: bool, need_weight: bool, need_bias: bool,
                     split: int | None = None
                     ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`linear_vjp` with an explicit number of batch splits for ``gw``/``gb`` (tests)."""
    M, K = x.shape
    N = weight.shape[0]
    dtype, device = x.dtype, x.device
    prec = dot_precision(dtype)
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
            split = max(1, min(int(split), M))
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
            grad_out, dact, x, gw_buf, gb_buf, M, N, K, rows,
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
