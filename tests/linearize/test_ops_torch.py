"""The torch primitives (the kernels' reference) against torch.func on F.linear / F.layer_norm."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vjp

from ngtriton.linearize import ops_torch

ACTS = {
    None: lambda s: s,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def _dact(act, s):
    if act is None:
        return None
    return jvp(ACTS[act], (s,), (torch.ones_like(s),))[1]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize(("with_x", "with_w", "with_b"),
                         [c for c in itertools.product([True, False], repeat=3) if any(c)])
def test_linear_jvp_vjp(act, with_x, with_w, with_b):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(9, 5), (4, 5), (4,)])
    xd, wd, bd = (torch.randn(*t.shape, generator=g, dtype=torch.float64) for t in (x, w, b))

    def f(x_, w_, b_):
        return ACTS[act](F.linear(x_, w_, b_))

    zeros = [torch.zeros_like(t) for t in (x, w, b)]
    tangents = [xd if with_x else zeros[0], wd if with_w else zeros[1], bd if with_b else zeros[2]]
    ref = jvp(f, (x, w, b), tuple(tangents))[1]
    dact = _dact(act, F.linear(x, w, b))
    out = ops_torch.linear_jvp(x, xd if with_x else None, w, wd if with_w else None,
                               bd if with_b else None, dact)
    torch.testing.assert_close(out, ref)

    u = torch.randn(9, 4, generator=g, dtype=torch.float64)
    gx_ref, gw_ref, gb_ref = vjp(f, x, w, b)[1](u)
    gx, gw, gb = ops_torch.linear_vjp(x, w, u, dact, with_x, with_w, with_b)
    for got, ref_, need in [(gx, gx_ref, with_x), (gw, gw_ref, with_w), (gb, gb_ref, with_b)]:
        if need:
            torch.testing.assert_close(got, ref_)
        else:
            assert got is None


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_jvp_vjp(affine):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(7, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    eps = 1e-5
    mean = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = (x - mean) * rstd
    xd, wd, bd, u = (torch.randn(*t.shape, generator=g, dtype=torch.float64)
                     for t in (x, w, b, x))
    if affine:
        def f(x_, w_, b_):
            return F.layer_norm(x_, (7,), w_, b_, eps)

        ref = jvp(f, (x, w, b), (xd, wd, bd))[1]
        out = ops_torch.layernorm_jvp(xhat, rstd, xd, w, wd, bd)
        grads_ref = vjp(f, x, w, b)[1](u)
        grads = ops_torch.layernorm_vjp(xhat, rstd, u, w, True, True, True)
    else:
        def f(x_):
            return F.layer_norm(x_, (7,), None, None, eps)

        ref = jvp(f, (x,), (xd,))[1]
        out = ops_torch.layernorm_jvp(xhat, rstd, xd, None, None, None)
        grads_ref = vjp(f, x)[1](u)
        grads = ops_torch.layernorm_vjp(xhat, rstd, u, None, True, False, False)[:1]
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
