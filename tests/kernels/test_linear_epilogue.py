"""The Linear JVP kernel with the output-Fisher product in its epilogue (``linear_jvp_fvp``)
against its torch reference (``ops_torch.linear_jvp_fvp``: the JVP, then ``F_R``, times scale)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, assert_close, randn, spy, up

from ngtriton.kernels import linear as K
from ngtriton.kernels import ops
from ngtriton.kernels import output as O
from ngtriton.linearize import ops_torch as R

KINDS = ["categorical", "bernoulli"]


def _state(kind, M, N, dtype, gen):
    z = randn(M, N, gen=gen, scale=2.0)
    return (torch.softmax(z, -1) if kind == "categorical" else torch.sigmoid(z)).to(dtype)


def _inputs(M, Kd, N, dtype, gen, x_dot=True, bias_dot=True, dact=True):
    x, w, wd = (randn(*s, gen=gen, dtype=dtype) for s in ((M, Kd), (N, Kd), (N, Kd)))
    xd = randn(M, Kd, gen=gen, dtype=dtype) if x_dot else None
    bd = randn(N, gen=gen, dtype=dtype) if bias_dot else None
    da = randn(M, N, gen=gen, dtype=dtype) if dact else None
    return x, xd, w, wd, bd, da


def _ref(args, state, kind, scale):
    return R.linear_jvp_fvp(*(up(a) for a in args), up(state), kind, scale)


def _check(got, args, state, kind, scale, dtype):
    Kd = args[0].shape[1]
    assert got.dtype == dtype and got.shape == state.shape
    # F_R has entries in [-1, 1]: the JVP's tolerance, times the scale
    assert_close(got, _ref(args, state, kind, scale), dtype, scale=math.sqrt(2 * Kd) * scale)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=2)),
                         ids=lambda f: f"xdot{int(f[0])}-bdot{int(f[1])}")
@pytest.mark.parametrize("N", [10, 7, 19])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_reference(dtype, kind, N, flags, gen):
    """fp32/fp16 (bf16 on CUDA), with and without the x and bias tangents, odd widths."""
    M, Kd = 37, 29
    args = _inputs(M, Kd, N, dtype, gen, *flags)
    state = _state(kind, M, N, dtype, gen)
    _check(K.linear_jvp_fvp(*args, state, kind, 0.25), args, state, kind, 0.25, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_only_weight_tangent_no_activation(kind, gen):
    """The last layer of most models: x constant wrt nothing but W, b; no activation."""
    args = _inputs(21, 13, 10, torch.float32, gen, x_dot=False, bias_dot=True, dact=False)
    state = _state(kind, 21, 10, torch.float32, gen)
    _check(K.linear_jvp_fvp(*args, state, kind, 1 / 21), args, state, kind, 1 / 21,
           torch.float32)


@pytest.mark.parametrize("N", [1, 16, 33, K.FVP_MAX_N])
def test_categorical_row_widths_and_zero_row_sums(N, gen):
    """Up to the widest fused row; 1ᵀ F_R = 0 (masked columns add nothing to p·ẏ)."""
    M, Kd = 5, 9
    args = _inputs(M, Kd, N, torch.float32, gen)
    state = _state("categorical", M, N, torch.float32, gen)
    got = K.linear_jvp_fvp(*args, state, "categorical", 1.0)
    _check(got, args, state, "categorical", 1.0, torch.float32)
    torch.testing.assert_close(got.sum(-1), torch.zeros(M, device=DEVICE), rtol=0, atol=1e-4)


def test_bernoulli_wide_rows_use_general_tiles(gen):
    """The elementwise epilogue needs no whole row: any width, several column tiles."""
    args = _inputs(11, 7, 300, torch.float32, gen)
    state = _state("bernoulli", 11, 300, torch.float32, gen)
    _check(K.linear_jvp_fvp(*args, state, "bernoulli", 0.5), args, state, "bernoulli", 0.5,
           torch.float32)


def test_strided_state(gen):
    M, Kd, N = 13, 11, 10
    args = _inputs(M, Kd, N, torch.float32, gen)
    state = torch.empty(N, M, device=DEVICE).t().copy_(_state("categorical", M, N,
                                                               torch.float32, gen))
    assert not state.is_contiguous()
    _check(K.linear_jvp_fvp(*args, state, "categorical", 1.0), args, state, "categorical", 1.0,
           torch.float32)


def test_kernel_rejects_what_it_cannot_fuse(gen):
    args = _inputs(4, 3, K.FVP_MAX_N + 1, torch.float32, gen)
    state = _state("categorical", 4, K.FVP_MAX_N + 1, torch.float32, gen)
    with pytest.raises(ValueError, match="out_features"):
        K.linear_jvp_fvp(*args, state, "categorical", 1.0)
    for fn in (K.linear_jvp_fvp, ops.linear_jvp_fvp, R.linear_jvp_fvp):
        with pytest.raises(ValueError, match="kind"):
            fn(*args, state, "gaussian", 1.0)


SPIED = [(K, "linear_jvp_fvp"), (K, "linear_jvp"), (O, "categorical_fvp"), (O, "bernoulli_fvp")]


def test_ops_constant_matches_kernel():
    assert ops._FVP_MAX_N == K.FVP_MAX_N


@pytest.mark.parametrize("kind,N,fused", [("categorical", K.FVP_MAX_N, True),
                                          ("categorical", K.FVP_MAX_N + 1, False),
                                          ("bernoulli", 300, True)])
def test_ops_dispatch_and_width_fallback(kind, N, fused, gen, monkeypatch):
    """ops.linear_jvp_fvp: one fused kernel, or (categorical rows wider than the tile) the JVP
    kernel then the separate row kernel; the same result either way."""
    calls = spy(monkeypatch, SPIED)
    args = _inputs(6, 5, N, torch.float32, gen)
    state = _state(kind, 6, N, torch.float32, gen)
    got = ops.linear_jvp_fvp(*args, state, kind, 0.5)
    _check(got, args, state, kind, 0.5, torch.float32)
    want = ["linear_jvp_fvp"] if fused else ["linear_jvp", f"{kind}_fvp"]
    assert calls == want


def test_ops_float64_stays_on_torch(gen, monkeypatch):
    calls = spy(monkeypatch, SPIED[:2])
    args = _inputs(6, 5, 4, torch.float64, gen)
    state = _state("categorical", 6, 4, torch.float64, gen)
    got = ops.linear_jvp_fvp(*args, state, "categorical", 0.5)
    torch.testing.assert_close(got, R.linear_jvp_fvp(*args, state, "categorical", 0.5),
                               rtol=1e-12, atol=1e-12)
    assert calls == []
