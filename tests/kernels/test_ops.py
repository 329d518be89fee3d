"""ngtriton.kernels.ops: a drop-in for ngtriton.linearize.ops_torch, dispatching per call."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import DEVICE, randn, spy

from ngtriton.kernels import layernorm as KL
from ngtriton.kernels import linear as KLin
from ngtriton.kernels import ops
from ngtriton.linearize import ops_torch

NAMES = ["linear_jvp", "linear_vjp", "layernorm_jvp", "layernorm_vjp", "linear_jvp_fvp"]


@pytest.mark.parametrize("name", NAMES)
def test_same_signatures(name):
    assert inspect.signature(getattr(ops, name)) == inspect.signature(getattr(ops_torch, name))


def _args(dtype, gen):
    M, K, N = 11, 9, 7
    x, xd = randn(M, K, gen=gen, dtype=dtype), randn(M, K, gen=gen, dtype=dtype)
    w, wd = randn(N, K, gen=gen, dtype=dtype), randn(N, K, gen=gen, dtype=dtype)
    bd, da, go = (randn(N, gen=gen, dtype=dtype), randn(M, N, gen=gen, dtype=dtype),
                  randn(M, N, gen=gen, dtype=dtype))
    xhat = torch.nn.functional.layer_norm(randn(M, K, gen=gen), (K,)).to(dtype)
    rstd = torch.rand(M, 1, generator=gen).add(0.5).to(device=DEVICE, dtype=dtype)
    lw, lwd, lbd = (randn(K, gen=gen, dtype=dtype) for _ in range(3))
    p = torch.softmax(randn(M, N, gen=gen), -1).to(dtype)
    return {
        "linear_jvp": (x, xd, w, wd, bd, da),
        "linear_jvp_fvp": (x, xd, w, wd, bd, da, p, "categorical", 0.5),
        "linear_vjp": (x, w, go, da, True, True, True),
        "layernorm_jvp": (xhat, rstd, xd, lw, lwd, lbd),
        "layernorm_vjp": (xhat, rstd, xd, lw, True, True, True),
    }


def _spy(monkeypatch):
    return spy(monkeypatch, [(KLin, "linear_jvp"), (KLin, "linear_vjp"), (KL, "layernorm_jvp"),
                             (KL, "layernorm_vjp"), (KLin, "linear_jvp_fvp")])


def _flat(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


@pytest.mark.parametrize("name", NAMES)
def test_float32_goes_to_triton(name, gen, monkeypatch):
    calls = _spy(monkeypatch)
    args = _args(torch.float32, gen)[name]
    got = getattr(ops, name)(*args)
    assert calls == [name]
    for g, r in zip(_flat(got), _flat(getattr(ops_torch, name)(*args))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_float64_stays_on_torch(name, gen, monkeypatch):
    calls = _spy(monkeypatch)
    args = _args(torch.float64, gen)[name]
    got = getattr(ops, name)(*args)
    assert calls == []
    for g, r in zip(_flat(got), _flat(getattr(ops_torch, name)(*args))):
        assert torch.equal(g, r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 runs in Triton on CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_in_interpreter_stays_on_torch(name, gen, monkeypatch):
    calls = _spy(monkeypatch)
    args = _args(torch.bfloat16, gen)[name]
    getattr(ops, name)(*args)
    assert calls == []


def test_mixed_dtypes_and_bad_shapes_fall_back(gen, monkeypatch):
    calls = _spy(monkeypatch)
    x, xd, w, wd, bd, da = _args(torch.float32, gen)["linear_jvp"]
    # the reference's own errors, not a kernel reading out of bounds
    with pytest.raises(RuntimeError):
        ops.linear_jvp(x, xd.half(), w, wd, bd, da)
    with pytest.raises(RuntimeError):
        ops.linear_jvp(x, xd, w, wd[:, :-1], bd, da)
    x3 = x[None]
    xd3 = xd[None]
    assert torch.equal(ops.linear_jvp(x3, xd3, w, None, None, None),
                       ops_torch.linear_jvp(x3, xd3, w, None, None, None))
    assert calls == []


def test_import_without_triton(tmp_path):
    """ngtriton and the torch parts of ngtriton.kernels import when triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import ngtriton, ngtriton.kernels as k, torch\n"
        "from ngtriton.kernels import ops, output, krylov\n"
        "assert not k.triton_available()\n"
        "x = torch.randn(4, 3); w = torch.randn(2, 3)\n"
        "assert torch.equal(ops.linear_jvp(x, x, w, None, None, None), x @ w.t())\n"
        "s = torch.rand(4, 2)\n"
        "assert torch.equal(ops.linear_jvp_fvp(x, x, w, None, None, None, s, 'bernoulli', 1.0),"
        " s * (1 - s) * (x @ w.t()))\n"
        "p = torch.softmax(torch.randn(3, 5), -1); v = torch.randn(3, 5)\n"
        "assert torch.equal(output.categorical_fvp(p, v), output.categorical_fvp_reference(p, v))\n"
        "print(float(krylov.dot(v.flatten(), v.flatten())))\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    path = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
