"""Fused Linear(+activation) JVP / VJP kernels against ngtriton.linearize.ops_torch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, assert_close, randn, up

from ngtriton.kernels import get_matmul_precision, set_matmul_precision
from ngtriton.kernels import linear as K
from ngtriton.linearize import ops_torch as R

ODD = (37, 29, 19)  # (M, K, N): no dimension a multiple of any block size
EVEN = (48, 64, 32)  # every dimension a multiple of the blocks: the unmasked reduction loops


def _jvp_inputs(M, Kd, N, dtype, gen, flags=(True, True, True, True)):
    x = randn(M, Kd, gen=gen, dtype=dtype)
    w = randn(N, Kd, gen=gen, dtype=dtype)
    xd = randn(M, Kd, gen=gen, dtype=dtype) if flags[0] else None
    wd = randn(N, Kd, gen=gen, dtype=dtype) if flags[1] else None
    bd = randn(N, gen=gen, dtype=dtype) if flags[2] else None
    da = randn(M, N, gen=gen, dtype=dtype) if flags[3] else None
    return x, xd, w, wd, bd, da


def _jvp_ref(x, xd, w, wd, bd, da):
    return R.linear_jvp(up(x), up(xd), up(w), up(wd), up(bd), up(da))


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)),
                         ids=lambda f: "".join("1" if b else "0" for b in f))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [ODD, EVEN], ids=["odd", "even"])
def test_jvp_optional_arguments(shape, flags, dtype, gen):
    """Every None-combination of x_dot, weight_dot, bias_dot, dact; a ragged and a whole K."""
    M, Kd, N = shape
    args = _jvp_inputs(M, Kd, N, dtype, gen, flags)
    out = K.linear_jvp(*args)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, _jvp_ref(*args), dtype, scale=math.sqrt(2 * Kd))


@pytest.mark.parametrize("shape", [(1, 1, 1), (16, 16, 16), (64, 96, 48), (5, 70, 33)],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jvp_shapes(shape, dtype, gen):
    M, Kd, N = shape
    args = _jvp_inputs(M, Kd, N, dtype, gen)
    assert_close(K.linear_jvp(*args), _jvp_ref(*args), dtype, scale=math.sqrt(2 * Kd))


def test_jvp_strided_inputs(gen):
    """Transposed / sliced views are read through their strides."""
    M, Kd, N = ODD
    x = randn(M, 2 * Kd, gen=gen)[:, ::2]
    xd = randn(M + 3, Kd, gen=gen)[3:]
    w = randn(Kd, N, gen=gen).t()
    wd = randn(Kd, N, gen=gen).t()
    bd = randn(2 * N, gen=gen)[::2]
    da = randn(N, M, gen=gen).t()
    out = K.linear_jvp(x, xd, w, wd, bd, da)
    assert_close(out, R.linear_jvp(x, xd, w, wd, bd, da), torch.float32, scale=8)


def test_matmul_precision_setting(gen):
    assert get_matmul_precision() == "ieee"
    args = _jvp_inputs(*ODD, torch.float32, gen)
    try:
        set_matmul_precision("TF32")
        assert get_matmul_precision() == "tf32"
        out = K.linear_jvp(*args)
    finally:
        set_matmul_precision("ieee")
    # tf32 keeps 10 mantissa bits of the operands (the interpreter computes in full fp32)
    torch.testing.assert_close(out, _jvp_ref(*args), rtol=1e-2, atol=1e-2 * 8)
    with pytest.raises(ValueError):
        set_matmul_precision("bf16")


def _vjp_inputs(M, Kd, N, dtype, gen, has_dact=True):
    x = randn(M, Kd, gen=gen, dtype=dtype)
    w = randn(N, Kd, gen=gen, dtype=dtype)
    go = randn(M, N, gen=gen, dtype=dtype)
    da = randn(M, N, gen=gen, dtype=dtype) if has_dact else None
    return x, w, go, da


def _check_vjp(got, x, w, go, da, needs, dtype):
    ref = R.linear_vjp(up(x), up(w), up(go), up(da), *needs)
    M, Kd = x.shape
    N = w.shape[0]
    for g, r, n_red, shape in zip(got, ref, (N, M, M), ((M, Kd), (w.shape), (N,))):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype and tuple(g.shape) == tuple(shape)
        assert_close(g, r, dtype, scale=math.sqrt(n_red))


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "".join("1" if b else "0" for b in f))
@pytest.mark.parametrize("has_dact", [False, True], ids=["nodact", "dact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [ODD, EVEN], ids=["odd", "even"])
def test_vjp_need_combinations(shape, needs, has_dact, dtype, gen):
    x, w, go, da = _vjp_inputs(*shape, dtype, gen, has_dact)
    _check_vjp(K.linear_vjp(x, w, go, da, *needs), x, w, go, da, needs, dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (64, 96, 48), (5, 70, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vjp_shapes(shape, dtype, gen):
    x, w, go, da = _vjp_inputs(*shape, dtype, gen)
    needs = (True, True, True)
    _check_vjp(K.linear_vjp(x, w, go, da, *needs), x, w, go, da, needs, dtype)


def test_vjp_strided_inputs(gen):
    """Views strided in both dimensions (copied once) and transposed ones (read in place)."""
    M, Kd, N = ODD
    x = randn(M, 2 * Kd, gen=gen)[:, ::2]
    w = randn(Kd, N, gen=gen).t()
    go = randn(2 * M, 3 * N, gen=gen)[::2, ::3]
    da = randn(N, M, gen=gen).t()
    needs = (True, True, True)
    _check_vjp(K.linear_vjp(x, w, go, da, *needs), x, w, go, da, needs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_vjp_split_k_tall_batch(dtype, gen):
    """Tall M, small N·K: the batch reduction of gw/gb is split over programs (fp32 workspace,
    second reduction) and the result is deterministic."""
    M, Kd, N = 300, 12, 10
    split, rows = K.choose_split(M, N, Kd, torch.device(DEVICE))
    assert split > 1 and (split - 1) * rows < M <= split * rows
    x, w, go, da = _vjp_inputs(M, Kd, N, dtype, gen)
    needs = (True, True, True)
    first = K.linear_vjp(x, w, go, da, *needs)
    _check_vjp(first, x, w, go, da, needs, dtype)
    again = K.linear_vjp(x, w, go, da, *needs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [1, 2, 7])
@pytest.mark.parametrize("needs", [(False, True, True), (False, True, False), (False, False, True)],
                         ids=["w+b", "w", "b"])
@pytest.mark.parametrize("M", [150, 224], ids=["ragged", "whole"])
def test_vjp_explicit_split(M, split, needs, gen):
    """Splits of ragged row runs, and (224 rows: 2 splits of 112, 7 of 32) of whole blocks."""
    Kd, N = 20, 17
    x, w, go, da = _vjp_inputs(M, Kd, N, torch.float32, gen)
    got = K.linear_vjp_split(x, w, go, da, *needs, split=split)
    _check_vjp(got, x, w, go, da, needs, torch.float32)


def test_vjp_empty_batch(gen):
    x, w, go, da = _vjp_inputs(0, 5, 3, torch.float32, gen)
    gx, gw, gb = K.linear_vjp(x, w, go, da, True, True, True)
    assert gx.shape == (0, 5) and torch.equal(gw, torch.zeros_like(gw))
    assert torch.equal(gb, torch.zeros_like(gb))
