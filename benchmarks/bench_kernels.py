"""Benchmarks of the fused Linear JVP kernels against the same products done separately.

Run on a CUDA machine (skipped otherwise)::

    PYTHONPATH=src pytest benchmarks/bench_kernels.py --benchmark-only \
        --benchmark-columns=mean,stddev,rounds --benchmark-sort=name

``ngtriton.kernels.linear.linear_jvp`` computes ``σ′ ⊙ (ẋ Wᵀ + x Ẇᵀ + ḃ)`` in one kernel; the
baseline is :func:`ngtriton.linearize.ops_torch.linear_jvp`: two cuBLAS matmuls (``mm`` then an
in-place ``addmm``) plus the bias add and the ``σ′`` product as separate passes. Both do
``4·M·N·K`` flops; ``benchmark.extra_info`` records the achieved TFLOP/s, from pytest-benchmark's
mean (host timer, one synchronisation per round of ``REPS`` calls) and from
``triton.testing.do_bench`` (CUDA events).

``test_linear_jvp_fvp`` times the last layer's JVP with the categorical output-Fisher product in
its epilogue (``ops.linear_jvp_fvp``: one kernel, ``ẏ`` never leaves registers) against the
unfused path (``ops.linear_jvp``, then ``kernels.output.categorical_fvp`` and the scale: what
``ops.linear_jvp_fvp`` falls back to), for output widths 10 and 256 over the same (M, K). The
unfused path is the group's baseline; the fused one also records
``speedup_vs_separate_do_bench``, both paths timed by ``do_bench`` in the same test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")

from ngtriton.kernels import linear as K  # noqa: E402
from ngtriton.kernels import ops, set_matmul_precision  # noqa: E402
from ngtriton.kernels import output as O  # noqa: E402
from ngtriton.linearize import ops_torch as R  # noqa: E402

# (M, K, N): batch rows, in_features, out_features
SHAPES = [(4096, 1024, 1024), (4096, 4096, 4096), (256, 4096, 4096)]
# (label, dtype, matmul precision for fp32 operands)
MODES = [
    ("fp32-ieee", torch.float32, "ieee"),
    ("fp32-tf32", torch.float32, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
]
REPS = 10
FVP_WIDTHS = [10, 256]  # output widths of the categorical last layer


def _inputs(M, Kd, N, dtype):
    g = torch.Generator(device="cuda")
    g.manual_seed(0)

    def r(*s):
        return torch.randn(*s, device="cuda", dtype=torch.float32, generator=g).to(dtype)

    return r(M, Kd), r(M, Kd), r(N, Kd), r(N, Kd), r(N), r(M, N)


def _bench(benchmark, fn, flops):
    fn()  # compile + autotune outside the timing
    torch.cuda.synchronize()

    def rounds():
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=20, warmup_rounds=2, iterations=1)
    per_call = benchmark.stats.stats.mean / REPS
    ms = triton.testing.do_bench(fn, warmup=25, rep=100)
    benchmark.extra_info["flops"] = flops
    benchmark.extra_info["tflops"] = flops / per_call / 1e12
    benchmark.extra_info["tflops_do_bench"] = flops / (ms * 1e-3) / 1e12
    benchmark.extra_info["ms_do_bench"] = ms


@pytest.fixture
def precision():
    def set_(p):
        set_matmul_precision(p)
        torch.backends.cuda.matmul.allow_tf32 = p == "tf32"

    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    yield set_
    set_matmul_precision("torch")
    torch.backends.cuda.matmul.allow_tf32 = old_tf32


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_jvp(benchmark, impl, shape, mode, precision):
    label, dtype, prec = mode
    precision(prec)
    M, Kd, N = shape
    args = _inputs(M, Kd, N, dtype)
    fn = (lambda: K.linear_jvp(*args)) if impl == "triton" else (lambda: R.linear_jvp(*args))
    benchmark.group = f"linear_jvp {label} {M}x{Kd}x{N}"
    benchmark.extra_info.update(impl=impl, dtype=label, M=M, K=Kd, N=N)
    if impl == "torch":
        benchmark.extra_info["baseline"] = True  # benchmarks/conftest.py: ratio_to_baseline
    _bench(benchmark, fn, 4 * M * N * Kd)
    if impl == "triton":  # sanity: the timed kernel computes the right thing
        ref = R.linear_jvp(*(a.float() for a in args))
        err = (fn().float() - ref).abs().max() / ref.abs().max()
        benchmark.extra_info["max_rel_err_vs_fp32"] = float(err)


def _fvp_paths(M, Kd, N, dtype):
    """(fused, separate) closures computing ``(1/M) · F_R ẏ`` for a categorical last layer."""
    args = _inputs(M, Kd, N, dtype)
    g = torch.Generator(device="cuda")
    g.manual_seed(1)
    p = torch.softmax(2 * torch.randn(M, N, device="cuda", generator=g), -1).to(dtype)
    scale = 1.0 / M

    def fused():
        return ops.linear_jvp_fvp(*args, p, "categorical", scale)

    def separate():
        return O.categorical_fvp(p, ops.linear_jvp(*args)).mul_(scale)

    return fused, separate


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:2])))
@pytest.mark.parametrize("width", FVP_WIDTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("impl", ["fused", "separate"])
def test_linear_jvp_fvp(benchmark, impl, width, shape, mode, precision):
    label, dtype, prec = mode
    precision(prec)
    M, Kd, _ = shape
    fused, separate = _fvp_paths(M, Kd, width, dtype)
    fn = fused if impl == "fused" else separate
    benchmark.group = f"linear_jvp_fvp {label} {M}x{Kd}x{width}"
    benchmark.extra_info.update(impl=impl, dtype=label, M=M, K=Kd, N=width)
    if impl == "separate":
        benchmark.extra_info["baseline"] = True  # benchmarks/conftest.py: ratio_to_baseline
    _bench(benchmark, fn, 4 * M * width * Kd)
    if impl == "fused":
        separate()  # compiled and tuned before timing
        torch.cuda.synchronize()
        ms_sep = triton.testing.do_bench(separate, warmup=25, rep=100)
        benchmark.extra_info["ms_separate_do_bench"] = ms_sep
        benchmark.extra_info["speedup_vs_separate_do_bench"] = (
            ms_sep / benchmark.extra_info["ms_do_bench"])
        ref = separate().float()
        err = (fn().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        benchmark.extra_info["max_rel_err_vs_separate"] = float(err)
