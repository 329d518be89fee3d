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


@pytest.mark.parametrize("n", [1, 1000, 4097])  # 4097: several blocks on a GPU too (4096)
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


# ----------------------------------------------------------------------------------------------
# MINRES / LSMR kernels. Lengths 1 and 1001 (not a multiple of the block); scalars as 0-d
# tensors and as Python numbers. Where the kernel can launch (fp32/fp16/fp64 here, bf16 on
# CUDA) the references are made to fail, so these tests prove the kernel path ran.
# ----------------------------------------------------------------------------------------------

LENGTHS = [1, 1001]


@pytest.fixture
def kernels_only(monkeypatch):
    """Make every ``*_reference`` of the module raise: a silent fallback would fail the test.
    Call the saved references through the returned dict."""
    saved = {name: getattr(Kr, name) for name in dir(Kr) if name.endswith("_reference")}

    def boom(*args, **kwargs):
        raise AssertionError("the torch reference ran instead of the kernel")

    for name in saved:
        monkeypatch.setattr(Kr, name, boom)
    return saved


def _s(value: float, kind: str):
    """A scalar as a 0-d float32 tensor on the device, or as a Python float."""
    return torch.tensor(value, dtype=torch.float32, device=DEVICE) if kind == "tensor" else value


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["tensor", "float"])
@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("keep", [None, True, False, "tensor-true", "tensor-false"])
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_sub_scaled_dot(dtype, keep, with_d, kind, n, gen, kernels_only):
    y, a, b, d = (randn(n, gen=gen, dtype=dtype) for _ in range(4))
    if isinstance(keep, str):
        keep = torch.tensor(keep == "tensor-true", device=DEVICE)
    if keep is not None and not bool(keep):
        a[0] = float("nan")  # must not survive keep = False
    dd = d if with_d else None
    y_ref = y.clone()
    expected = kernels_only["sub_scaled_dot_reference"](y_ref, a, b, _s(0.37, kind), dd, keep)
    out = Kr.sub_scaled_dot(y, a, b, _s(0.37, kind), dd, keep)
    assert out.dim() == 0 and out.device == y.device
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if keep is not None and not bool(keep):
        assert torch.equal(y, torch.zeros_like(y)) and float(out) == 0.0
    else:
        _close(y, a.double() - float(_s(0.37, kind)) * b.double(), dtype)  # one rounding
        _close_to_terms(y, y_ref, dtype, a.double().abs() + 0.37 * b.double().abs())
        partner = (d if with_d else y).double()
        _close(out, (partner * y.double()).sum(), dtype)  # the reduction of y as stored
        # the reference rounds s·b and y its own way (fp16: an ulp of the operands, not of
        # y): compare relative to the size of the terms, not of the result
        scale = float(partner.norm() * (a.double().norm() + 0.37 * b.double().norm()))
        torch.testing.assert_close(out.double(), expected.double(), rtol=0,
                                   atol=TOL[dtype] * scale)


@pytest.mark.parametrize("alias", ["a", "b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sub_scaled_dot_in_place(dtype, alias, gen, kernels_only):
    """``y`` may be one of the operands (MINRES's ``y −= c r2``, LSMR's ``u = Av − α u``)."""
    y, other = (randn(777, gen=gen, dtype=dtype) for _ in range(2))
    a, b = (y, other) if alias == "a" else (other, y)
    expected = a.float() - 1.5 * b.float()
    out = Kr.sub_scaled_dot(y, a, b, torch.tensor(1.5, device=DEVICE))
    _close(y, expected, dtype)
    _close(out, (y.double() ** 2).sum(), dtype)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["tensor", "float"])
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_minres_update(dtype, kind, n, gen, kernels_only):
    x, v, w1, w2, y = (randn(n, gen=gen, dtype=dtype) for _ in range(5))
    scalars = [_s(c, kind) for c in (0.3, -0.7, 1.9, 0.45, 2.5)]  # ε, δ, denom, φ, vscale
    eps, delta, denom, phi, vscale = (float(c) for c in scalars)
    x0, v0, w10, w20 = (t.to(torch.float64, copy=True) for t in (x, v, w1, w2))
    ref = [t.clone() for t in (x, v, w1, w2, y)]
    w_ref = kernels_only["minres_update_reference"](*ref, *scalars)
    w = Kr.minres_update(x, v, w1, w2, y, *scalars)
    assert w is w1 and w_ref is ref[2]
    # the kernel: exact arithmetic, one rounding per stored vector (x from the stored w)
    _close(w1, (v0 - eps * w10 - delta * w20) * denom, dtype)
    _close(x, x0 + phi * w1.double(), dtype)
    _close(v, vscale * y.double(), dtype)  # the next Lanczos vector
    # the reference rounds after each op: within a few ulps of the terms (not of the result)
    w_terms = (v0.abs() + abs(eps) * w10.abs() + abs(delta) * w20.abs()) * abs(denom)
    for got, want, terms in zip((x, v, w1, w2, y), ref,
                                (x0.abs() + abs(phi) * w_terms, 0, w_terms, 0, 0)):
        _close_to_terms(got, want, dtype, terms)


def _close_to_terms(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, terms) -> None:
    """``|a − b| ≤ 4·tol·(terms + 1)`` elementwise: roundings of the summands, not the sum."""
    err = (a.double() - b.double()).abs()
    assert bool((err <= 4 * TOL[dtype] * (terms + 1)).all()), float(err.max())


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["tensor", "float"])
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_normalize(dtype, kind, n, gen, kernels_only):
    v = randn(n, gen=gen, dtype=dtype)
    nv = float(v.double().norm())
    expected = v.double() / nv
    out = Kr.normalize(v, _s(nv, kind) if dtype != torch.float64 else nv)
    assert out is v
    _close(v, expected, dtype)


@pytest.mark.parametrize("nv", [0.0, float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_normalize_unusable_norm_gives_zeros(dtype, nv, gen, kernels_only):
    v = randn(300, gen=gen, dtype=dtype)
    v[5] = float("nan")
    v[6] = float("inf")
    Kr.normalize(v, torch.tensor(nv, dtype=Kr._acc_dtype(dtype), device=DEVICE))
    assert torch.equal(v, torch.zeros_like(v))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["tensor", "float"])
@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=str)
def test_lsmr_update(dtype, kind, n, gen, kernels_only):
    x, h, hbar, v = (randn(n, gen=gen, dtype=dtype) for _ in range(4))
    nv = float(v.double().norm())
    scalars = [_s(c, kind) for c in (nv, 0.6, -1.3, 0.8)]  # ‖v‖, c1, c2, c3
    nv_s, c1, c2, c3 = (float(c) for c in scalars)
    x0, h0, hbar0, v0 = (t.to(torch.float64, copy=True) for t in (x, h, hbar, v))
    ref = [t.clone() for t in (x, h, hbar, v)]
    kernels_only["lsmr_update_reference"](*ref, *scalars)
    out = Kr.lsmr_update(x, h, hbar, v, *scalars)
    assert out is x
    # the kernel: exact arithmetic, one rounding per stored vector
    _close(v, v0 / nv_s, dtype)
    _close(hbar, h0 - c1 * hbar0, dtype)
    _close(x, x0 + c2 * hbar.double(), dtype)
    _close(h, v.double() - c3 * h0, dtype)
    # the reference, within a few ulps of the terms
    hbar_terms = h0.abs() + abs(c1) * hbar0.abs()
    terms = (x0.abs() + abs(c2) * hbar_terms, v0.abs() / nv_s + abs(c3) * h0.abs(), hbar_terms,
             v0.abs() / nv_s)
    for got, want, t in zip((x, h, hbar, v), ref, terms):
        _close_to_terms(got, want, dtype, t)


def test_new_kernels_fall_back_when_noncontiguous(gen):
    y, a, b, d = (randn(80, gen=gen)[::2] for _ in range(4))
    y_ref = y.clone()
    expected = Kr.sub_scaled_dot_reference(y_ref, a, b, 0.5, d)
    torch.testing.assert_close(Kr.sub_scaled_dot(y, a, b, 0.5, d), expected)
    torch.testing.assert_close(y, y_ref)
    v = randn(80, gen=gen)[::2]
    expected = v / v.norm()
    torch.testing.assert_close(Kr.normalize(v, v.norm()), expected)
