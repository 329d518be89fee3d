"""Compile every kernel for Hopper (sm_90) ahead of time, without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: this catches what only the
compiler rejects (unsupported constructs, layouts, shared memory). It runs in a subprocess with
``TRITON_INTERPRET`` unset and needs Triton's NVIDIA backend (bundled ptxas). On a CUDA machine
the other tests compile the kernels anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ngtriton.kernels import _common, krylov, layernorm, linear, output

TARGET = GPUTarget("cuda", 90, 32)


def build(kernel, dtype, consts, ptrs=None, num_warps=4, num_stages=3, scalars=None):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    ptrs = ptrs or {}
    scalars = scalars or {}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, dtype)
        else:
            sig[name] = scalars.get(name, "i32")
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=opts)


F32 = dict(scale="fp32")
for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "tf32")):
    build(linear._linear_jvp_kernel, dt, dict(
        HAS_XDOT=True, HAS_WDOT=True, HAS_BDOT=True, HAS_DACT=True, EPILOGUE=0, PRECISION=prec,
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP=8, st_ptr=None), num_warps=8, scalars=F32)
build(linear._linear_jvp_kernel, "fp16", dict(
    HAS_XDOT=False, HAS_WDOT=True, HAS_BDOT=False, HAS_DACT=False, EPILOGUE=0, PRECISION="tf32",
    BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP=8, xd_ptr=None, bd_ptr=None, da_ptr=None,
    st_ptr=None), scalars=F32)
# the output-Fisher epilogues: categorical on a whole 256-wide row, bernoulli on any tile
for dt, prec, bm, warps in (("fp32", "ieee", 64, 8), ("bf16", "tf32", 128, 8),
                            ("fp16", "tf32", 64, 4)):
    build(linear._linear_jvp_row_kernel, dt, dict(
        HAS_XDOT=True, HAS_WDOT=True, HAS_BDOT=True, HAS_DACT=True, EPILOGUE=1, PRECISION=prec,
        BLOCK_M=bm, BLOCK_N=256, BLOCK_K=32, GROUP=8), num_warps=warps, scalars=F32)
build(linear._linear_jvp_kernel, "bf16", dict(
    HAS_XDOT=True, HAS_WDOT=True, HAS_BDOT=False, HAS_DACT=False, EPILOGUE=2, PRECISION="tf32",
    BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP=8, bd_ptr=None, da_ptr=None), num_warps=8,
    scalars=F32)
build(linear._linear_vjp_dx_kernel, "bf16", dict(
    HAS_DACT=True, PRECISION="tf32", BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP=8), num_warps=8)
build(linear._linear_vjp_dw_kernel, "bf16", dict(
    HAS_DACT=True, NEED_W=True, NEED_B=True, PRECISION="tf32", BLOCK_N=128, BLOCK_K=128,
    BLOCK_M=64, GROUP=8), ptrs=dict(gw_ptr="fp32", gb_ptr="fp32"), num_warps=8)
build(linear._linear_vjp_dw_kernel, "fp32", dict(
    HAS_DACT=False, NEED_W=False, NEED_B=True, PRECISION="ieee", BLOCK_N=128, BLOCK_K=128,
    BLOCK_M=64, GROUP=8, da_ptr=None, gw_ptr=None))
build(_common._sum_partials_kernel, "bf16", dict(BLOCK=1024), ptrs=dict(part_ptr="fp32"))
build(layernorm._layernorm_jvp_kernel, "bf16", dict(
    HAS_XDOT=True, HAS_W=True, HAS_WDOT=True, HAS_BDOT=True, BLOCK_R=4, BLOCK_D=1024),
    ptrs=dict(rstd_ptr="fp32"), num_stages=1)
build(layernorm._layernorm_vjp_kernel, "bf16", dict(
    HAS_W=True, NEED_X=True, NEED_W=True, NEED_B=True, BLOCK_R=4, BLOCK_D=1024),
    ptrs=dict(rstd_ptr="fp32", gw_ptr="fp32", gb_ptr="fp32"), num_stages=1)
for single, block in ((True, 128), (False, 4096)):
    for mode in (0, 1, 2):
        build(output._categorical_kernel, "bf16", dict(MODE=mode, BLOCK=block, SINGLE=single),
              num_stages=1)
build(output._bernoulli_kernel, "fp16", dict(SQRT=True, BLOCK=2048), num_stages=1)
for dt, acc in (("bf16", "fp32"), ("fp64", "fp64")):
    build(krylov._cg_update_kernel, dt, dict(BLOCK=4096),
          ptrs=dict(alpha_ptr="fp32", part_ptr=acc), num_warps=8, num_stages=1)
    build(krylov._update_direction_kernel, dt, dict(BLOCK=4096, ACC64=dt == "fp64"),
          ptrs=dict(beta_ptr="fp64"), num_warps=8, num_stages=1)
    build(krylov._dot_kernel, dt, dict(BLOCK=4096), ptrs=dict(part_ptr=acc), num_warps=8,
          num_stages=1)
print("compiled")
'''


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels compile in the tests")
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas for the NVIDIA backend")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout
