"""Row-wise LayerNorm JVP / VJP kernels against ngtriton.linearize.ops_torch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_helpers import DTYPES, assert_close, randn, up

from ngtriton.kernels import layernorm as K
from ngtriton.linearize import ops_torch as R


def _normalised(M, D, dtype, gen):
    x = randn(M, D, gen=gen, scale=3.0) + 1.5
    mean = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    return ((x - mean) * rstd).to(dtype), rstd.to(dtype)


def _bits(f):
    return "".join("1" if b else "0" for b in f)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)), ids=_bits)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_jvp_optional_arguments(flags, dtype, gen):
    """Every None-combination of x_dot, weight, weight_dot, bias_dot."""
    M, D = 37, 29
    xhat, rstd = _normalised(M, D, dtype, gen)
    xd, w, wd, bd = (randn(*s, gen=gen, dtype=dtype) if f else None
                     for f, s in zip(flags, ((M, D), (D,), (D,), (D,))))
    out = K.layernorm_jvp(xhat, rstd, xd, w, wd, bd)
    assert out.dtype == dtype and out.shape == (M, D)
    ref = R.layernorm_jvp(up(xhat), up(rstd), up(xd), up(w), up(wd), up(bd))
    assert_close(out, ref, dtype, scale=4)


@pytest.mark.parametrize("shape", [(1, 1), (3, 64), (70, 96), (9, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jvp_shapes(shape, dtype, gen):
    M, D = shape
    xhat, rstd = _normalised(M, D, dtype, gen)
    xd = randn(M, D, gen=gen, dtype=dtype)
    w, wd, bd = (randn(D, gen=gen, dtype=dtype) for _ in range(3))
    out = K.layernorm_jvp(xhat, rstd, xd, w, wd, bd)
    ref = R.layernorm_jvp(up(xhat), up(rstd), up(xd), up(w), up(wd), up(bd))
    assert_close(out, ref, dtype, scale=4)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)), ids=_bits)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_vjp_combinations(flags, dtype, gen):
    """weight present or not × every need_* combination."""
    M, D = 37, 29
    has_w, *needs = flags
    xhat, rstd = _normalised(M, D, dtype, gen)
    go = randn(M, D, gen=gen, dtype=dtype)
    w = randn(D, gen=gen, dtype=dtype) if has_w else None
    got = K.layernorm_vjp(xhat, rstd, go, w, *needs)
    ref = R.layernorm_vjp(up(xhat), up(rstd), up(go), up(w), *needs)
    for g, r, s in zip(got, ref, (4, math.sqrt(M) * 2, math.sqrt(M))):
        if g is not None:
            assert g.dtype == dtype
        assert_close(g, r, dtype, scale=s)


@pytest.mark.parametrize("shape", [(1, 1), (70, 96), (201, 24), (9, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vjp_shapes_and_partial_sums(shape, dtype, gen):
    """Tall inputs spread the parameter sums over several programs (fp32 partials, second
    reduction); the result is deterministic."""
    M, D = shape
    xhat, rstd = _normalised(M, D, dtype, gen)
    go = randn(M, D, gen=gen, dtype=dtype)
    w = randn(D, gen=gen, dtype=dtype)
    got = K.layernorm_vjp(xhat, rstd, go, w, True, True, True)
    ref = R.layernorm_vjp(up(xhat), up(rstd), up(go), up(w), True, True, True)
    for g, r, s in zip(got, ref, (4, math.sqrt(M) * 2, math.sqrt(M))):
        assert_close(g, r, dtype, scale=s)
    again = K.layernorm_vjp(xhat, rstd, go, w, True, True, True)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_rstd_fp32_with_fp16_rows(gen):
    """An fp32 rstd cache next to fp16 activations (autocast-style) is accepted."""
    M, D = 21, 40
    xhat, rstd = _normalised(M, D, torch.float16, gen)
    rstd32 = rstd.float().reshape(M)  # (rows,) as well as (rows, 1)
    xd = randn(M, D, gen=gen, dtype=torch.float16)
    out = K.layernorm_jvp(xhat, rstd32, xd, None, None, None)
    ref = R.layernorm_jvp(up(xhat), rstd32[:, None], up(xd), None, None, None)
    assert_close(out, ref, torch.float16, scale=4)
