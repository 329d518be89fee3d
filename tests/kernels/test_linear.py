"""Fused Linear(+activation) JVP / VJP kernels against ngtriton.linearize.ops_torch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, assert_close, randn, up

from ngtriton.kernels import get_matmul_precision, set_matmul_precision
from ngtriton.kernels import linear as K
from ngtriton.kernels import tiles as tile_configs
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


@pytest.fixture
def torch_precision():
    """Restore torch's float32 matmul setting and ngtriton's override after the test."""
    old = torch.get_float32_matmul_precision()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.set_float32_matmul_precision(old)
    torch.backends.cuda.matmul.allow_tf32 = old_tf32
    set_matmul_precision("torch")


def test_matmul_precision_setting(gen, torch_precision):
    torch.set_float32_matmul_precision("highest")
    assert get_matmul_precision() == "ieee"
    args = _jvp_inputs(*ODD, torch.float32, gen)
    set_matmul_precision("TF32")
    assert get_matmul_precision() == "tf32"
    out = K.linear_jvp(*args)
    set_matmul_precision("torch")
    assert get_matmul_precision() == "ieee"
    # tf32 keeps 10 mantissa bits of the operands (the interpreter computes in full fp32)
    torch.testing.assert_close(out, _jvp_ref(*args), rtol=1e-2, atol=1e-2 * 8)
    with pytest.raises(ValueError):
        set_matmul_precision("bf16")


@pytest.mark.parametrize("setting,tf32,want", [
    ("highest", False, "ieee"), ("high", None, "tf32"), ("medium", None, "tf32"),
    ("highest", True, "tf32")])
def test_matmul_precision_follows_torch(setting, tf32, want, torch_precision):
    """fp32 dots use "ieee" only where torch's own fp32 matmuls would: precision "highest" with
    TF32 off; "high"/"medium" or ``allow_tf32 = True`` give "tf32"."""
    torch.set_float32_matmul_precision(setting)
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    from ngtriton.kernels import _config, torch_matmul_precision

    assert torch_matmul_precision() == want
    assert get_matmul_precision() == want
    assert _config.dot_precision(torch.float32) == want
    assert _config.dot_precision(torch.float16) == "tf32"  # half precision: tensor cores always
    set_matmul_precision("ieee")  # ngtriton's own override wins over torch's setting
    assert _config.dot_precision(torch.float32) == "ieee"


def test_autotune_key_buckets_the_batch():
    """Batch sizes share an autotuning key per power of two; the pruner benchmarks at most
    MAX_TRIALS configurations per key."""
    assert [K._bucket(m) for m in (0, 1, 2, 3, 4, 5, 100, 128, 129, 4096, 4097)] == [
        1, 1, 2, 4, 4, 8, 128, 128, 256, 4096, 8192]
    for kern in (K._linear_jvp_kernel, K._linear_jvp_row_kernel, K._linear_vjp_dx_kernel,
                 K._linear_vjp_dw_kernel):
        assert "M_BUCKET" in kern.keys and "M" not in kern.keys
        assert "rows_per_split" not in kern.keys
    tiles = [(128, 128, 64, 8, 4)] * 10
    kept = tile_configs._prune_tiles(tiles, [True] * 10, [64] * 10, 132)
    assert kept == list(range(tile_configs.MAX_TRIALS))
    assert tile_configs._prune_tiles(tiles, [False] * 10, [64] * 10, 132) == [0]  # never empty


@pytest.mark.parametrize("offset,cols", [(1, 29), (3, 32), (0, 30)], ids=["both", "ptr", "stride"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_misaligned_operands_are_realigned(offset, cols, dtype, gen, monkeypatch):
    """Tangents are views into a flat vector at arbitrary offsets: an operand whose address or
    row stride a launch cannot prove 16-byte aligned is copied into an aligned, padded buffer
    before the launch; the results are those of the reference."""
    M, N = 19, 23
    flat = randn(offset + N * cols + M * cols + 64, gen=gen, dtype=dtype)
    wd = flat[offset:offset + N * cols].view(N, cols)
    xd = flat[offset + N * cols:offset + N * cols + M * cols].view(M, cols)
    assert not K.is_aligned(wd) and not K.is_aligned(xd)
    x = randn(M, cols, gen=gen, dtype=dtype)
    w = randn(N, cols, gen=gen, dtype=dtype)
    bd = randn(N, gen=gen, dtype=dtype)
    seen = []
    orig = K._streamable
    monkeypatch.setattr(K, "_streamable", lambda t: seen.append(orig(t)) or seen[-1])
    out = K.linear_jvp(x, xd, w, wd, bd, None)
    assert all(t is None or K.is_aligned(t) for t in seen)
    assert_close(out, _jvp_ref(x, xd, w, wd, bd, None), dtype, scale=math.sqrt(2 * cols))
    go = flat[offset:offset + M * N].view(M, N)
    seen.clear()
    got = K.linear_vjp(x, w, go, None, True, True, True)
    assert all(t is None or K.is_aligned(t) for t in seen)
    _check_vjp(got, x, w, go, None, (True, True, True), dtype)


def test_aligned_copy_pads_rows(gen):
    t = randn(5, 30, gen=gen)[:, 1:]
    c = K.aligned_copy(t)
    assert torch.equal(c, t) and K.is_aligned(c) and c.stride() == (32, 1)
    a = randn(4, 32, gen=gen)
    assert K.is_aligned(a) and K._streamable(a) is a  # aligned operands are not copied


def test_split_workspace_keeps_32bit_offsets(monkeypatch):
    """The fp32 workspace (split, N, K) of the batch split stays within 32-bit offsets."""
    monkeypatch.setattr(K, "INT32_MAX", 1000)
    assert K._max_split(10, 30, True) == 3
    assert K._max_split(10, 30, False) == 100
    split, rows = K.choose_split(10**6, 10, 30, torch.device("meta"), sms=132)
    assert split <= 3 and split * rows >= 10**6


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
    # long enough for a split with this backend's constants (the GPU's need far more rows than
    # the interpreter's)
    M, Kd, N = 4 * K._SPLIT_MIN_ROWS + 44, 12, 10
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
