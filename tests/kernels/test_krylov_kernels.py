"""Fused Krylov vector updates against their torch references (ngtriton.kernels.krylov)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, cuda_only, randn

from ngtriton.kernels import krylov as Kr

VEC_DTYPES = [torch.float32, torch.float16, torch.float64,
              pytest.param(torch.bfloat16, marks=cuda_only)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _close(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("n", [1, 1000])
@pytest.mark.parametrize("alpha_kind", ["tensor", "float"])
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_cg_update(dtype, alpha_kind, n, gen):
    x, r, p, ap = (randn(n, gen=gen, dtype=dtype) for _ in range(4))
    alpha = (torch.tensor(0.37, dtype=torch.float32, device=DEVICE) if alpha_kind == "tensor"
             else 0.37)
    xr, rr = x.clone(), r.clone()
    rr_ref = Kr.cg_update_reference(xr, rr, p, ap, alpha)
    ptr_x, ptr_r = x.data_ptr(), r.data_ptr()
    rr_new = Kr.cg_update(x, r, p, ap, alpha)
    assert x.data_ptr() == ptr_x and r.data_ptr() == ptr_r  # in place
    assert rr_new.dim() == 0 and rr_new.device == x.device
    assert rr_new.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(x, xr, dtype)
    _close(r, rr, dtype)
    _close(rr_new, rr_ref, dtype)
    _close(rr_new, (r.double() ** 2).sum(), dtype)  # the norm of the residual as stored


@pytest.mark.parametrize("beta_kind", ["tensor", "float"])
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_update_direction(dtype, beta_kind, gen):
    p, r = (randn(777, gen=gen, dtype=dtype) for _ in range(2))
    beta = torch.tensor(1.7, dtype=torch.float64, device=DEVICE) if beta_kind == "tensor" else 1.7
    expected = Kr.update_direction_reference(p.clone(), r, beta)
    out = Kr.update_direction(p, r, beta)
    assert out is p
    _close(p, expected, dtype)


@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_dot(dtype, gen):
    a, b = (randn(1000, gen=gen, dtype=dtype) for _ in range(2))
    d = Kr.dot(a, b)
    assert d.dim() == 0
    _close(d, Kr.dot_reference(a, b), dtype)


def test_noncontiguous_falls_back(gen):
    x, r, p, ap = (randn(40, gen=gen)[::2] for _ in range(4))
    xr, rr = x.clone(), r.clone()
    rr_ref = Kr.cg_update_reference(xr, rr, p, ap, 0.5)
    torch.testing.assert_close(Kr.cg_update(x, r, p, ap, 0.5), rr_ref)
    torch.testing.assert_close(x, xr)


def test_cg_solves_spd_system(gen):
    """A few CG iterations with the fused updates solve a small SPD system (no .item())."""
    n = 50
    q = randn(n, n, gen=gen)
    a = q @ q.t() / n + torch.eye(n, device=DEVICE)
    b = randn(n, gen=gen)
    x = torch.zeros(n, device=DEVICE)
    r = b.clone()
    p = r.clone()
    rs = Kr.dot(r, r)
    for _ in range(20):  # κ(a) ≤ ~5: converged long before rs reaches 0
        ap = a @ p
        alpha = rs / Kr.dot(p, ap)
        rs_new = Kr.cg_update(x, r, p, ap, alpha)
        Kr.update_direction(p, r, rs_new / rs)
        rs = rs_new
    torch.testing.assert_close(a @ x, b, rtol=1e-4, atol=1e-4)
