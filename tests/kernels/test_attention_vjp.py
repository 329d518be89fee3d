"""Attention VJP (reverse mode): the torch reference against a float64 oracle (autograd of
torch's scaled_dot_product_attention, math backend), the Triton kernels against the reference
(interpreter on CPU), dispatch through ngtriton.kernels.ops, and the sm_90 compile of the three
kernels (slow).

Run the compile audit by hand (prints the table)::

    PYTHONPATH=src python tests/kernels/test_attention_vjp.py
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

from ngtriton.kernels import _config, ops
from ngtriton.kernels import attention_reference as R

# ----------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ----------------------------------------------------------------------------------------------

B, H = 2, 2
NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True)]


def _masks(kind: str, T: int, S: int, gen: torch.Generator, dtype=torch.float64):
    return attention_mask(kind, B, H, T, S, gen, dtype)


def _inputs(T: int, S: int, D: int, gen: torch.Generator, dtype=torch.float64):
    """q, k, v and the output cotangent g."""
    return tuple(randn(B, H, n, D, gen=gen, dtype=dtype) for n in (T, S, S, T))


_combined = sdpa_mask


def oracle(q, k, v, g, *, scale, causal, mask):
    """``(dq, dk, dv)`` in float64: autograd of SDPA (math backend). Fully masked rows: torch
    returns zeros there (older versions NaN, mapped to 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    m = _combined(mask, causal, q.shape[2], k.shape[2])
    m = m if m is None or m.dtype == torch.bool else m.double()
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
        grads = torch.autograd.grad(o, (q, k, v), g.double())
    return tuple(t.nan_to_num(0.0) for t in grads)


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=False)


def _err(actual, expected) -> float:
    """Largest error relative to the largest magnitude."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all() and torch.isfinite(e).all()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def _check_need(got, need):
    for t, n in zip(got, need):
        assert (t is None) == (not n)


# ----------------------------------------------------------------------------------------------
# The reference against the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "".join("qkv"[i] for i in range(3)
                                                               if n[i]))
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("mask_kind", ["none", "bool_pad", "add_pad", "add_full"])
@pytest.mark.parametrize("T,S", [(13, 13), (7, 19), (19, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_against_oracle(causal, T, S, mask_kind, scale, need, gen, monkeypatch):
    # chunks of 5 query rows (a ragged last chunk), so that the chunked path is what is tested
    monkeypatch.setattr(R, "_CHUNK_ELEMS", B * H * S * 5)
    q, k, v, g = _inputs(T, S, 6, gen)
    mask = _masks(mask_kind, T, S, gen)
    kw = dict(scale=scale, causal=causal, mask=mask)
    o, lse = R.attention_forward_reference(q, k, v, **kw)
    got = R.attention_vjp_reference(q, k, v, o, lse, g, need=need, **kw)
    _check_need(got, need)
    for a, e in zip(got, oracle(q, k, v, g, **kw)):
        if a is not None:
            assert a.dtype == torch.float64 and a.shape == e.shape
            _close(a, e, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_float32_against_oracle(causal, gen):
    T, S, D = 17, 23, 8
    q, k, v, g = _inputs(T, S, D, gen, dtype=torch.float32)
    mask = _masks("add_full", T, S, gen, dtype=torch.float32)
    kw = dict(scale=None, causal=causal, mask=mask)
    o, lse = R.attention_forward_reference(q, k, v, **kw)
    got = R.attention_vjp_reference(q, k, v, o, lse, g, **kw)
    for a, e in zip(got, oracle(q, k, v, g, **kw)):
        assert a.dtype == torch.float32 and _err(a, e) < 1e-5


# ----------------------------------------------------------------------------------------------
# The Triton kernels against the reference (interpreter: fp32 and fp16)
# ----------------------------------------------------------------------------------------------

K = pytest.importorskip("ngtriton.kernels.attention")
AB = pytest.importorskip("ngtriton.kernels.attention_backward")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def _check_kernel(q, k, v, g, *, scale=None, causal=False, mask=None, need=(True,) * 3):
    """The kernels (inputs as given, o and lse from the forward kernel) against the reference on
    fp32 copies of the same inputs and the same o, lse; returns the relative errors."""
    dtype = q.dtype
    kw = dict(scale=scale, causal=causal, mask=mask)
    o, lse = K.attention_forward(q, k, v, **kw)
    got = AB.attention_vjp(q, k, v, o, lse, g, need=need, **kw)
    _check_need(got, need)
    rmask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    ref = R.attention_vjp_reference(q.float(), k.float(), v.float(), o.float(), lse, g.float(),
                                    scale=scale, causal=causal, mask=rmask, need=need)
    errs = []
    for a, r, p in zip(got, ref, (q, k, v)):
        if a is None:
            continue
        assert a.dtype == dtype and a.shape == p.shape
        errs.append(_err(a, r))
    assert max(errs) < TOL[dtype], errs
    return errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool_pad", "add_pad", "add_full"])
@pytest.mark.parametrize("T,S", [(37, 45), (45, 21), (16, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_against_reference(causal, T, S, mask_kind, dtype, gen):
    """Shapes not multiples of the blocks (32 × 16 in the interpreter), T ≠ S, causal with
    query and key blocks skipped, masks of both kinds."""
    q, k, v, g = _inputs(T, S, 24, gen, dtype=dtype)
    mask = _masks(mask_kind, T, S, gen, dtype=torch.float32)
    _check_kernel(q, k, v, g, causal=causal, mask=mask)


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "".join("qkv"[i] for i in range(3)
                                                               if n[i]))
@pytest.mark.parametrize("D", [8, 16, 24])
def test_kernel_need_and_head_dims(D, need, gen):
    q, k, v, g = _inputs(21, 35, D, gen, dtype=torch.float32)
    _check_kernel(q, k, v, g, scale=0.7, causal=need[0], need=need)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernel_non_contiguous(dtype, gen):
    """(B, T, H, D) tensors seen as (B, H, T, D) (transposed views, o and g too), lse from a
    (B, T, H) buffer, a transposed mask and a mask broadcast over heads (B, 1, T, S)."""
    T, S, D = 29, 38, 16

    def bthd(n):
        return randn(B, n, H, D, gen=gen, dtype=dtype).transpose(1, 2)

    q, g = bthd(T), bthd(T)
    k, v = bthd(S), bthd(S)
    assert not q.is_contiguous()
    mask = randn(B, 1, S, T, gen=gen).transpose(-1, -2)
    _check_kernel(q, k, v, g, causal=True, mask=mask)
    _check_kernel(q, k, v, g, mask=mask > -0.5)
    # o and lse as non-contiguous views: same results as from contiguous copies
    o, lse = K.attention_forward(q, k, v, causal=True)
    o_nc = torch.empty(B, T, H, D, dtype=dtype, device=DEVICE).transpose(1, 2).copy_(o)
    lse_nc = torch.empty(B, T, H, device=DEVICE).transpose(1, 2).copy_(lse)
    a = AB.attention_vjp(q, k, v, o, lse, g, causal=True)
    b = AB.attention_vjp(q, k, v, o_nc, lse_nc, g.contiguous(), causal=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_kernel_fully_masked_rows(gen):
    """Rows with no key kept (lse = -inf) contribute nothing: their dq is 0, dk and dv match
    the oracle, and nothing is NaN (reference and kernels)."""
    T, S, D = 9, 11, 8
    q, k, v, g = _inputs(T, S, D, gen, dtype=torch.float32)
    keep = torch.rand(B, H, T, S, generator=gen) > 0.3
    keep[0, 1, 4] = False
    keep[1, 0, :3] = False
    bias = torch.zeros(B, H, T, S).masked_fill(~keep, -math.inf)
    dead = ~keep.any(-1)
    assert dead.sum() >= 4
    for mask in (keep.to(DEVICE), bias.to(DEVICE)):
        expected = oracle(q, k, v, g, scale=None, causal=False, mask=mask)
        for fwd, vjp in ((R.attention_forward_reference, R.attention_vjp_reference),
                         (K.attention_forward, AB.attention_vjp)):
            o, lse = fwd(q, k, v, mask=mask)
            assert torch.isneginf(lse[dead]).all()
            got = vjp(q, k, v, o, lse, g, mask=mask)
            assert torch.all(got[0][dead] == 0)
            for a, e in zip(got, expected):
                assert _err(a, e) < 1e-5


def test_kernel_float32_matches_oracle(gen):
    """The kernels in float32 against the float64 oracle itself."""
    T, S, D = 33, 40, 16
    q, k, v, g = _inputs(T, S, D, gen, dtype=torch.float32)
    mask = _masks("bool_pad", T, S, gen)
    o, lse = K.attention_forward(q, k, v, causal=True, mask=mask)
    got = AB.attention_vjp(q, k, v, o, lse, g, causal=True, mask=mask)
    for a, e in zip(got, oracle(q, k, v, g, scale=None, causal=True, mask=mask)):
        assert _err(a, e) < 1e-5


def test_kernel_deterministic(gen):
    q, k, v, g = _inputs(40, 36, 16, gen, dtype=torch.float32)
    o, lse = K.attention_forward(q, k, v)
    a = AB.attention_vjp(q, k, v, o, lse, g)
    b = AB.attention_vjp(q, k, v, o, lse, g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_kernel_empty_and_keyless(gen):
    q, k, v = (randn(B, H, n, 8, gen=gen) for n in (5, 0, 0))
    o, lse = K.attention_forward(q, k, v)
    for vjp in (AB.attention_vjp, R.attention_vjp_reference):
        dq, dk, dv = vjp(q, k, v, o, lse, q)
        assert torch.all(dq == 0) and dq.shape == q.shape
        assert dk.shape == dv.shape == (B, H, 0, 8)
        e = q[:, :, :0]
        dq, dk, dv = vjp(e, q, q, e, lse[:, :, :0], e)
        assert dq.shape == (B, H, 0, 8) and torch.all(dk == 0) and torch.all(dv == 0)


# ----------------------------------------------------------------------------------------------
# Dispatch (ngtriton.kernels.ops)
# ----------------------------------------------------------------------------------------------


def test_same_signatures():
    params = inspect.signature(ops.attention_vjp).parameters
    assert params == inspect.signature(R.attention_vjp_reference).parameters
    assert params == inspect.signature(AB.attention_vjp).parameters
    assert "attention_vjp" in ops.__all__


def _dispatch(dtype, gen, monkeypatch, D=8, need=(True, True, True), **extra):
    calls = spy(monkeypatch, [(AB, "attention_vjp")])
    q, k, v, g = _inputs(9, 12, D, gen, dtype=dtype)
    kw = {"scale": None, "causal": True, "mask": None, **extra}
    o, lse = R.attention_forward_reference(q, k, v, **kw)
    if dtype != torch.float64:
        lse = lse.float()
    return (calls, ops.attention_vjp(q, k, v, o, lse, g, need=need, **kw),
            (q, k, v, o, lse, g, kw))


def test_float32_goes_to_triton(gen, monkeypatch):
    for mask in (None, torch.ones(B, 1, 1, 12, dtype=torch.bool, device=DEVICE)):
        calls, got, (q, k, v, o, lse, g, kw) = _dispatch(torch.float32, gen, monkeypatch,
                                                         mask=mask)
        assert calls == ["attention_vjp"]
        ref = R.attention_vjp_reference(q, k, v, o, lse, g, **kw)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()
    calls, got, _ = _dispatch(torch.float32, gen, monkeypatch, need=(False, True, False))
    assert calls == ["attention_vjp"] and got[0] is None and got[2] is None


def test_float64_returns_none(gen, monkeypatch):
    calls, got, _ = _dispatch(torch.float64, gen, monkeypatch)
    assert got is None and calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 runs in Triton on CUDA")
def test_bfloat16_in_interpreter_returns_none(gen, monkeypatch):
    calls, got, _ = _dispatch(torch.bfloat16, gen, monkeypatch)
    assert got is None and calls == []


def test_no_triton_returns_none(gen, monkeypatch):
    monkeypatch.setattr(_config, "triton_available", lambda: False)
    calls, got, _ = _dispatch(torch.float32, gen, monkeypatch)
    assert got is None and calls == []


def test_bad_operands_return_none(gen, monkeypatch):
    calls = spy(monkeypatch, [(AB, "attention_vjp")])
    q, k, v, g = _inputs(9, 12, 8, gen, dtype=torch.float32)
    o, lse = K.attention_forward(q, k, v)
    assert ops.attention_vjp(q, k, v, o, lse, g[:, :, :-1]) is None  # g not shaped like q
    assert ops.attention_vjp(q, k, v, o, lse.double(), g) is None  # lse not fp32
    mask = torch.zeros(1, 12, dtype=torch.float64, device=DEVICE)  # mask dtype ≠ q's
    assert ops.attention_vjp(q, k, v, o, lse, g, mask=mask) is None
    assert ops.attention_vjp(q, k, v, o, lse, g, mask=torch.zeros(3, 12)) is None
    assert calls == []
    _, got, _ = _dispatch(torch.float32, gen, monkeypatch, D=260)  # head wider than 256
    assert got is None


# ----------------------------------------------------------------------------------------------
# sm_90 compile of the three kernels (slow): every launch configuration of dkdv_blocks /
# dq_blocks, compiled as a launch specializes the arguments, must compile and not spill.
# ----------------------------------------------------------------------------------------------

HEADS = (16, 32, 64, 128, 256)
MODES = ("fp16", "bf16", "fp32-tf32", "fp32-ieee")
KERNELS = {"pre": "_attention_bwd_preprocess_kernel", "dkdv": "_attention_bwd_dkdv_kernel",
           "dq": "_attention_bwd_dq_kernel"}


def _args(kernel: str, dt: str, D: int, mask: str | None) -> dict:
    Hh, T, S = 16, 2048, 2048

    def st(prefix, n, last):
        return {f"{prefix}b": Hh * n * D, f"{prefix}h": n * D, f"{prefix}{last}": D,
                f"{prefix}d": 1}

    if kernel == "pre":
        return dict(o_ptr=dt, g_ptr=dt, delta_ptr="fp32", H=Hh, T=T, D=D, **st("s_o", T, "t"),
                    **st("s_g", T, "t"))
    a = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, m_ptr=mask, g_ptr=dt, lse_ptr="fp32",
             delta_ptr="fp32", H=Hh, T=T, S=S, D=D, scale=0.125, qk_scale=0.18,
             **st("s_q", T, "t"), **st("s_k", S, "s"), **st("s_v", S, "s"),
             s_mb=0 if mask is None else S, s_mh=0, s_mt=0, s_ms=0 if mask is None else 1,
             **st("s_g", T, "t"), s_lb=Hh * T, s_lh=T, s_lt=1)
    if kernel == "dkdv":
        a.update(dk_ptr=dt, dv_ptr=dt, **st("s_dk", S, "s"), **st("s_dv", S, "s"))
    else:
        a.update(dq_ptr=dt, **st("s_dq", T, "t"))
    return a


def sm90_cases() -> list:
    """One case per (kernel, mode, head width) with causal and a key-padding mask (B, 1, 1, S),
    boolean for fp16/bf16 and additive for fp32 (the preprocess kernel once per dtype)."""
    import test_compile_sm90 as C

    from ngtriton.kernels import attention_backward as A

    cases = []
    for kernel, mode, D in itertools.product(KERNELS, MODES, HEADS):
        dt, prec = C.MODES[mode]
        tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        block_d = A.head_block(D)
        if kernel == "pre":
            if mode == "fp32-ieee":
                continue
            consts = dict(BLOCK_M=A._DELTA_ROWS, BLOCK_D=block_d)
            warps, stages, tile = 4, 1, f"{A._DELTA_ROWS}x{block_d}"
            mask = None
        else:
            if block_d > A.vjp_head_limit(tdt, prec):
                continue
            pick = A.dkdv_blocks if kernel == "dkdv" else A.dq_blocks
            bm, bn, warps, stages = pick(block_d, tdt, prec)
            mask = "u8" if dt != "fp32" else "fp32"
            consts = dict(CAUSAL=True, MASK_KIND=2 if mask == "u8" else 1, PRECISION=prec,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d)
            if kernel == "dkdv":
                consts.update(NEED_DK=True, NEED_DV=True)
            tile = f"{bm}x{bn}"
        name = f"attn-vjp-{kernel}-D{D}"
        cases.append(C.Case(
            name=name, mode=mode, module="attention_backward", kernel=KERNELS[kernel],
            args=_args(kernel, dt, D, mask), consts=consts, num_warps=warps,
            num_stages=stages, tile=tile, words=[name, mode, "attention_backward"]))
    return cases


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_compile_sm90 as C

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    words = [w for w in argv if not w.startswith("--")]
    cases = [c for c in sm90_cases() if all(any(w in x for x in c.words) for w in words)]
    recs = C.run_cases(cases)
    print("\n" + json.dumps(recs) if "--json" in argv else C.format_table(recs))


@pytest.fixture(scope="module")
def sm90() -> list[dict]:
    """The kernels compiled for sm_90 in a subprocess without TRITON_INTERPRET."""
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


# Known spills (name, mode) -> allowed bytes per thread; none at present.
_KNOWN_SPILL: dict[tuple[str, str], int] = {}


@pytest.mark.slow
def test_attention_vjp_kernels_compile_for_sm90_without_spills(sm90):
    import test_compile_sm90 as C

    assert {r["kernel"] for r in sm90} == set(KERNELS.values())
    bad = [r for r in sm90 if "error" in r or r["smem"] > 227 * 1024
           or r["spill"] > _KNOWN_SPILL.get((r["name"], r["mode"]), 0)]
    assert not bad, C.format_table(bad)
    for r in sm90:  # tensor cores (wgmma, or mma.sync for the narrow tiles) except "ieee"
        if "-pre-" not in r["name"]:
            tensor_cores = r["ptx_wgmma"] > 0 or r["mma_sync"] > 0
            assert tensor_cores == (r["mode"] != "fp32-ieee"), C.format_table([r])
    wide = {(r["name"], r["mode"]) for r in sm90 if r["ptx_wgmma"] == 0 and r["mma_sync"] > 0}
    assert wide <= {("attn-vjp-dkdv-D128", "fp32-tf32"), ("attn-vjp-dkdv-D256", "fp16"),
                    ("attn-vjp-dkdv-D256", "bf16")}, wide


if __name__ == "__main__":
    main(sys.argv[1:])
