"""Attention forward and JVP: the torch reference against a float64 oracle (torch.func.jvp of
torch's scaled_dot_product_attention, math backend), and the Triton kernels against the
reference (interpreter on CPU); dispatch through ngtriton.kernels.ops; the sm_90 compile of both
kernels (slow).

Run the compile audit by hand (prints the table)::

    PYTHONPATH=src python tests/kernels/test_attention.py
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, attention_mask, randn, sdpa_mask, spy

from ngtriton.kernels import attention_reference as R
from ngtriton.kernels import ops
from ngtriton.linearize import ops_torch

# ----------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ----------------------------------------------------------------------------------------------

B, H = 2, 2
TANGENTS = ["qkv", "q", "k", "v", "qk", "none"]


def _masks(kind: str, T: int, S: int, gen: torch.Generator, dtype=torch.float64):
    return attention_mask(kind, B, H, T, S, gen, dtype)


def _inputs(T: int, S: int, D: int, tangents: str, gen: torch.Generator,
            dtype=torch.float64):
    q, k, v = (randn(B, H, n, D, gen=gen, dtype=dtype) for n in (T, S, S))
    dq, dk, dv = (randn(B, H, n, D, gen=gen, dtype=dtype) if c in tangents else None
                  for c, n in zip("qkv", (T, S, S)))
    return q, k, v, dq, dk, dv


_combined = sdpa_mask


def oracle(q, k, v, dq, dk, dv, *, scale, causal, mask):
    """``(o, lse, do)`` in float64: torch.func.jvp of SDPA (math backend); lse from logsumexp.
    Fully masked rows: torch returns zeros there (2.13 here; older versions NaN, mapped to 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.double() for t in (q, k, v))
    tans = tuple(torch.zeros_like(p) if t is None else t.double()
                 for p, t in zip((q, k, v), (dq, dk, dv)))
    T, S = q.shape[2], k.shape[2]
    m = _combined(mask, causal, T, S)
    m = m if m is None or m.dtype == torch.bool else m.double()

    def f(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m, scale=scale)

    with sdpa_kernel(SDPBackend.MATH):
        o, do = torch.func.jvp(f, (q, k, v), tans)
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = sc * q @ k.transpose(-1, -2)
    if m is not None:
        s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m
    return o.nan_to_num(0.0), torch.logsumexp(s, -1), do.nan_to_num(0.0)


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=False)


def _err(actual, expected) -> float:
    """Largest error relative to the largest magnitude (finite entries)."""
    a, e = actual.double(), expected.double()
    fin = torch.isfinite(e)
    assert torch.equal(fin, torch.isfinite(a))
    return float((a - e)[fin].abs().max() / e[fin].abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# The reference against the oracle
# ----------------------------------------------------------------------------------------------

SHAPES = [(13, 13), (7, 19), (19, 7)]  # T = S, T < S, T > S


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("tangents", TANGENTS)
@pytest.mark.parametrize("mask_kind", ["none", "bool_pad", "add_pad", "add_full"])
@pytest.mark.parametrize("T,S", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_against_oracle(causal, T, S, mask_kind, tangents, scale, gen, monkeypatch):
    # chunks of 5 query rows (a ragged last chunk), so that the chunked path is what is tested
    monkeypatch.setattr(R, "_CHUNK_ELEMS", B * H * S * 5)
    D = 6
    q, k, v, dq, dk, dv = _inputs(T, S, D, tangents, gen)
    mask = _masks(mask_kind, T, S, gen)
    kw = dict(scale=scale, causal=causal, mask=mask)
    o, lse = R.attention_forward_reference(q, k, v, **kw)
    do = R.attention_jvp_reference(q, k, v, o, lse, dq, dk, dv, **kw)
    eo, else_, edo = oracle(q, k, v, dq, dk, dv, **kw)
    assert o.dtype == torch.float64 and lse.shape == (B, H, T)
    _close(o, eo, 1e-10, 1e-10)
    _close(lse, else_, 1e-10, 1e-10)  # -inf where the oracle has -inf
    _close(do, edo, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_float32_against_oracle(causal, gen):
    T, S, D = 17, 23, 8
    q, k, v, dq, dk, dv = _inputs(T, S, D, "qkv", gen, dtype=torch.float32)
    mask = _masks("add_full", T, S, gen, dtype=torch.float32)
    kw = dict(scale=None, causal=causal, mask=mask)
    o, lse = R.attention_forward_reference(q, k, v, **kw)
    do = R.attention_jvp_reference(q, k, v, o, lse, dq, dk, dv, **kw)
    assert o.dtype == do.dtype == lse.dtype == torch.float32
    eo, else_, edo = oracle(q, k, v, dq, dk, dv, **kw)
    assert _err(o, eo) < 1e-5 and _err(lse, else_) < 1e-5 and _err(do, edo) < 1e-5


def test_fully_masked_rows(gen):
    """Rows with no key kept: o = 0, lse = -inf, do = 0 (what torch's math backend returns),
    from the reference and from the kernels; the other rows match the oracle."""
    T, S, D = 9, 11, 8
    q, k, v, dq, dk, dv = _inputs(T, S, D, "qkv", gen, dtype=torch.float32)
    keep = torch.rand(B, H, T, S, generator=gen) > 0.3
    keep[0, 1, 4] = False
    keep[1, 0, :3] = False
    bias = torch.zeros(B, H, T, S).masked_fill(~keep, -math.inf)
    dead = ~keep.any(-1)
    assert dead.sum() >= 4
    for mask in (keep.to(DEVICE), bias.to(DEVICE)):
        eo, else_, edo = oracle(q, k, v, dq, dk, dv, scale=None, causal=False, mask=mask)
        for fwd, jvp in ((R.attention_forward_reference, R.attention_jvp_reference),
                         (ops.attention_forward, ops.attention_jvp)):
            o, lse = fwd(q, k, v, mask=mask)
            do = jvp(q, k, v, o, lse, dq, dk, dv, mask=mask)
            assert not torch.isnan(o).any() and not torch.isnan(do).any()
            assert torch.all(o[dead] == 0) and torch.all(do[dead] == 0)
            assert torch.all(torch.isneginf(lse[dead])) and torch.isfinite(lse[~dead]).all()
            assert _err(o, eo) < 1e-5 and _err(do, edo) < 1e-5
            _close(lse[~dead], else_[~dead], 1e-5, 1e-5)


# ----------------------------------------------------------------------------------------------
# The Triton kernels against the reference (interpreter: fp32 and fp16)
# ----------------------------------------------------------------------------------------------

K = pytest.importorskip("ngtriton.kernels.attention")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def _check_kernel(q, k, v, dq, dk, dv, *, scale=None, causal=False, mask=None):
    """Kernel (inputs as given) against the reference on fp32 copies of the same inputs;
    returns the relative errors (o, lse, do)."""
    dtype = q.dtype
    kw = dict(scale=scale, causal=causal, mask=mask)
    o, lse = K.attention_forward(q, k, v, **kw)
    assert o.dtype == dtype and lse.dtype == torch.float32 and o.shape == q.shape
    do = K.attention_jvp(q, k, v, o, lse, dq, dk, dv, **kw)
    assert do.dtype == dtype and do.shape == q.shape
    up = [None if t is None else t.float() for t in (q, k, v, dq, dk, dv)]
    rmask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    rkw = dict(scale=scale, causal=causal, mask=rmask)
    ro, rlse = R.attention_forward_reference(*up[:3], **rkw)
    # the JVP reference gets the kernel's own o (its rounding is the forward's, measured above)
    rdo = R.attention_jvp_reference(*up[:3], o.float(), lse, *up[3:], **rkw)
    errs = _err(o, ro), _err(lse, rlse), _err(do, rdo)
    tol = TOL[dtype]
    assert max(errs) < tol, errs
    return errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool_pad", "add_pad", "add_full"])
@pytest.mark.parametrize("T,S", [(37, 45), (45, 21), (16, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_against_reference(causal, T, S, mask_kind, dtype, gen):
    """Shapes not multiples of the blocks (32 × 16 in the interpreter), T ≠ S, causal with
    key blocks skipped, masks of both kinds."""
    q, k, v, dq, dk, dv = _inputs(T, S, 24, "qkv", gen, dtype=dtype)
    mask = _masks(mask_kind, T, S, gen, dtype=torch.float32)
    _check_kernel(q, k, v, dq, dk, dv, causal=causal, mask=mask)


@pytest.mark.parametrize("tangents", TANGENTS)
@pytest.mark.parametrize("D", [8, 16, 24])
def test_kernel_tangents_and_head_dims(D, tangents, gen):
    q, k, v, dq, dk, dv = _inputs(21, 35, D, tangents, gen, dtype=torch.float32)
    _check_kernel(q, k, v, dq, dk, dv, scale=0.7, causal=tangents == "qk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernel_non_contiguous(dtype, gen):
    """(B, T, H, D) tensors seen as (B, H, T, D) (transposed views), a transposed mask and a
    mask broadcast over heads (B, 1, T, S)."""
    T, S, D = 29, 38, 16

    def bthd(n):
        return randn(B, n, H, D, gen=gen, dtype=dtype).transpose(1, 2)

    q, dq = bthd(T), bthd(T)
    k, v, dk, dv = (bthd(S) for _ in range(4))
    assert not q.is_contiguous()
    mask = randn(B, 1, S, T, gen=gen).transpose(-1, -2)
    _check_kernel(q, k, v, dq, dk, dv, causal=True, mask=mask)
    _check_kernel(q, k, v, dq, dk, dv, mask=mask > -0.5)


@pytest.mark.parametrize("order", ["rising", "falling"])
def test_kernel_online_softmax_extremes(order, gen):
    """Large scores whose row maximum grows at every key block (or only falls), and rows whose
    first two key blocks are all masked (the running maximum stays -inf, then becomes finite)."""
    T, S, D = 40, 50, 8
    q, k, v, dq, dk, dv = _inputs(T, S, D, "qkv", gen, dtype=torch.float32)
    ramp = torch.linspace(-1, 1, S, device=DEVICE)
    ramp = ramp if order == "rising" else ramp.flip(0)
    k = k * 0.1 + ramp[:, None]  # scores ≈ 30 · ramp · (q · 1)
    q = q.abs() * 30 / math.sqrt(D)
    keep = torch.ones(B, H, T, S, dtype=torch.bool, device=DEVICE)
    keep[:, :, ::2, :35] = False
    errs = _check_kernel(q, k, v, dq, dk, dv, mask=keep)
    assert max(errs) < 1e-5


def test_kernel_float32_matches_oracle(gen):
    """The kernels in float32 against the float64 oracle itself."""
    T, S, D = 33, 40, 16
    q, k, v, dq, dk, dv = _inputs(T, S, D, "qkv", gen, dtype=torch.float32)
    mask = _masks("bool_pad", T, S, gen)
    o, lse = K.attention_forward(q, k, v, causal=True, mask=mask)
    do = K.attention_jvp(q, k, v, o, lse, dq, dk, dv, causal=True, mask=mask)
    eo, else_, edo = oracle(q, k, v, dq, dk, dv, scale=None, causal=True, mask=mask)
    assert _err(o, eo) < 1e-5 and _err(lse, else_) < 1e-5 and _err(do, edo) < 1e-5


def test_kernel_empty_and_keyless(gen):
    q, k, v = (randn(B, H, n, 8, gen=gen) for n in (5, 0, 0))
    o, lse = K.attention_forward(q, k, v, causal=False, mask=None)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    assert torch.all(K.attention_jvp(q, k, v, o, lse, q, k, v) == 0)
    ro, rlse = R.attention_forward_reference(q, k, v)
    assert torch.equal(ro, o) and torch.equal(rlse, lse)
    o, lse = K.attention_forward(q[:, :, :0], q, q)
    assert o.shape == (B, H, 0, 8) and lse.shape == (B, H, 0)


# ----------------------------------------------------------------------------------------------
# Dispatch (ngtriton.kernels.ops) and the torch interface (ngtriton.linearize.ops_torch)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["attention_forward", "attention_jvp"])
def test_same_signatures(name):
    sig = inspect.signature(getattr(ops, name))
    assert sig == inspect.signature(getattr(ops_torch, name))
    ref = getattr(R, f"{name}_reference")
    assert sig == inspect.signature(ref) == inspect.signature(getattr(K, name))


def _dispatch(dtype, gen, monkeypatch, **extra):
    calls = spy(monkeypatch, [(K, "attention_forward"), (K, "attention_jvp")])
    q, k, v, dq, dk, dv = _inputs(9, 12, 8, "qkv", gen, dtype=dtype)
    kw = {"scale": None, "causal": True, "mask": None, **extra}
    o, lse = ops.attention_forward(q, k, v, **kw)
    do = ops.attention_jvp(q, k, v, o, lse, dq, dk, dv, **kw)
    ro, rlse = ops_torch.attention_forward(q, k, v, **kw)
    rdo = ops_torch.attention_jvp(q, k, v, ro, rlse, dq, dk, dv, **kw)
    return calls, (o, lse, do), (ro, rlse, rdo)


def test_float32_goes_to_triton(gen, monkeypatch):
    mask = torch.ones(B, 1, 1, 12, dtype=torch.bool, device=DEVICE)
    calls, got, ref = _dispatch(torch.float32, gen, monkeypatch)
    assert calls == ["attention_forward", "attention_jvp"]
    calls.clear()
    calls2, got2, ref2 = _dispatch(torch.float32, gen, monkeypatch, mask=mask)
    assert calls2 == ["attention_forward", "attention_jvp"]
    for g, r in zip((*got, *got2), (*ref, *ref2)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_float64_stays_on_torch(gen, monkeypatch):
    calls, got, ref = _dispatch(torch.float64, gen, monkeypatch)
    assert calls == []
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 runs in Triton on CUDA")
def test_bfloat16_in_interpreter_stays_on_torch(gen, monkeypatch):
    calls, _, _ = _dispatch(torch.bfloat16, gen, monkeypatch)
    assert calls == []


def test_bad_operands_fall_back(gen, monkeypatch):
    calls = spy(monkeypatch, [(K, "attention_forward"), (K, "attention_jvp")])
    q, k, v, *_ = _inputs(9, 12, 8, "", gen, dtype=torch.float32)
    with pytest.raises(ValueError):  # the reference's own error
        ops.attention_forward(q, k[:, :, :, :-1], v)
    with pytest.raises(RuntimeError):  # a mask that does not broadcast
        ops.attention_forward(q, k, v, mask=torch.zeros(3, 12, device=DEVICE))
    # a float64 mask with float32 operands: the reference (which accepts it)
    o, _ = ops.attention_forward(q, k, v, mask=torch.zeros(1, 12, dtype=torch.float64,
                                                          device=DEVICE))
    torch.testing.assert_close(o, R.attention_forward_reference(q, k, v)[0])
    assert calls == []


# ----------------------------------------------------------------------------------------------
# sm_90 compile of both kernels (slow): every launch configuration of forward_blocks /
# jvp_blocks, compiled as a launch specializes the arguments, must compile and not spill.
# ----------------------------------------------------------------------------------------------

HEADS = (16, 32, 64, 128, 256)
MODES = ("fp16", "bf16", "fp32-tf32", "fp32-ieee")


def _args(kernel: str, dt: str, D: int, mask: str | None) -> dict:
    Hh, T, S = 16, 2048, 2048

    def st(prefix, n, last):
        return {f"{prefix}b": Hh * n * D, f"{prefix}h": n * D, f"{prefix}{last}": D,
                f"{prefix}d": 1}

    a = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, m_ptr=mask, o_ptr=dt, lse_ptr="fp32", H=Hh, T=T,
             S=S, D=D, qk_scale=0.18, **st("s_q", T, "t"), **st("s_k", S, "s"),
             **st("s_v", S, "s"), s_mb=0 if mask is None else S, s_mh=0,
             s_mt=0, s_ms=0 if mask is None else 1, **st("s_o", T, "t"),
             s_lb=Hh * T, s_lh=T, s_lt=1)
    if kernel == "jvp":
        a.update(dq_ptr=dt, dk_ptr=dt, dv_ptr=dt, do_ptr=dt, scale=0.125, **st("s_dq", T, "t"),
                 **st("s_dk", S, "s"), **st("s_dv", S, "s"), s_gb=Hh * T * D, s_gh=T * D,
                 s_gt=D, s_gd=1)
    return a


def sm90_cases() -> list:
    """One case per (kernel, mode, head width) with all tangents, causal, and a key-padding
    mask (B, 1, 1, S) boolean for fp16/bf16 and additive for fp32."""
    import test_compile_sm90 as C

    from ngtriton.kernels import attention as A

    cases = []
    for kernel, mode, D in itertools.product(("fwd", "jvp"), MODES, HEADS):
        dt, prec = C.MODES[mode]
        tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        if kernel == "jvp" and A.head_block(D) > A.jvp_head_limit(tdt, prec):
            continue
        pick = A.forward_blocks if kernel == "fwd" else A.jvp_blocks
        bm, bn, warps, stages = pick(A.head_block(D), tdt, prec)
        mask = "u8" if dt != "fp32" else "fp32"
        consts = dict(CAUSAL=True, MASK_KIND=2 if mask == "u8" else 1, PRECISION=prec,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=A.head_block(D))
        if kernel == "jvp":
            consts.update(HAS_DQ=True, HAS_DK=True, HAS_DV=True)
        name = f"attn-{kernel}-D{D}"
        cases.append(C.Case(
            name=name, mode=mode, module="attention",
            kernel="_attention_fwd_kernel" if kernel == "fwd" else "_attention_jvp_kernel",
            args=_args(kernel, dt, D, mask), consts=consts, num_warps=warps,
            num_stages=stages, tile=f"{bm}x{bn}", words=[name, mode, "attention"]))
    return cases


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_compile_sm90 as C

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    recs = C.run_cases(sm90_cases())
    print("\n" + json.dumps(recs) if "--json" in argv else C.format_table(recs))


@pytest.fixture(scope="module")
def sm90() -> list[dict]:
    """Both kernels compiled for sm_90 in a subprocess without TRITON_INTERPRET (~1 minute
    on two cores)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True,
                         text=True, timeout=1800)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas for the NVIDIA backend")
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# Known: the fp16/bf16 JVP at D = 256 with a mask spills ~72 bytes per thread (every tile tried
# spills there; without a mask it does not). Allowed up to this many bytes.
_KNOWN_SPILL = {("attn-jvp-D256", "fp16"): 128, ("attn-jvp-D256", "bf16"): 128}


@pytest.mark.slow
def test_attention_kernels_compile_for_sm90_without_spills(sm90):
    import test_compile_sm90 as C

    bad = [r for r in sm90 if "error" in r or r["smem"] > 227 * 1024
           or r["spill"] > _KNOWN_SPILL.get((r["name"], r["mode"]), 0)]
    assert not bad, C.format_table(bad)
    for r in sm90:  # tensor-core modes: the dots run on wgmma
        assert (r["ptx_wgmma"] > 0) == (r["mode"] != "fp32-ieee"), C.format_table([r])


if __name__ == "__main__":
    main(sys.argv[1:])
