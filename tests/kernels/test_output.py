"""Output-Fisher product kernels against their torch references (ngtriton.kernels.output)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close, randn, up

from ngtriton.kernels import output as O

CATEGORICAL = [
    (O.categorical_fvp, O.categorical_fvp_reference),
    (O.categorical_factor_t, O.categorical_factor_t_reference),
    (O.categorical_factor, O.categorical_factor_reference),
]
BERNOULLI = [
    (O.bernoulli_fvp, O.bernoulli_fvp_reference),
    (O.bernoulli_factor, O.bernoulli_factor_reference),
    (O.bernoulli_factor_t, O.bernoulli_factor_t_reference),
]


def _probs(shape, dtype, gen):
    return torch.softmax(randn(*shape, gen=gen, scale=2.0), dim=-1).to(dtype)


# m = 7 and 64: the row fits one block; m = 300: looped over blocks in the interpreter (block
# 256), m = 4100 on a GPU too (block 4096).
@pytest.mark.parametrize("shape", [(13, 7), (5, 64), (4, 300), (2, 4100), (2, 3, 10)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", CATEGORICAL, ids=lambda f: f[0].__name__)
def test_categorical(fn, dtype, shape, gen):
    kernel, reference = fn
    p = _probs(shape, dtype, gen)
    v = randn(*shape, gen=gen, dtype=dtype)
    out = kernel(p, v)
    assert out.dtype == dtype and out.shape == v.shape
    assert_close(out, reference(up(p), up(v)), dtype)


@pytest.mark.parametrize("shape", [(13, 7), (3, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", BERNOULLI, ids=lambda f: f[0].__name__)
def test_bernoulli(fn, dtype, shape, gen):
    kernel, reference = fn
    s = torch.sigmoid(randn(*shape, gen=gen, scale=2.0)).to(dtype)
    v = randn(*shape, gen=gen, dtype=dtype)
    out = kernel(s, v)
    assert out.dtype == dtype and out.shape == v.shape
    assert_close(out, reference(up(s), up(v)), dtype)


@pytest.mark.parametrize("m", [9, 300])
def test_categorical_factorisation(m, gen):
    """L (Lᵀ v) = F_R v, and Lᵀ annihilates nothing but the direction of 1 (F_R 1 = 0)."""
    p = _probs((6, m), torch.float32, gen)
    v = randn(6, m, gen=gen)
    llt = O.categorical_factor(p, O.categorical_factor_t(p, v))
    torch.testing.assert_close(llt, O.categorical_fvp(p, v), rtol=1e-5, atol=1e-6)
    ones = torch.ones_like(p)
    torch.testing.assert_close(O.categorical_fvp(p, ones), torch.zeros_like(p), rtol=0,
                               atol=1e-6)


def test_float64_uses_reference(gen):
    p = _probs((4, 6), torch.float64, gen)
    v = randn(4, 6, gen=gen, dtype=torch.float64)
    for kernel, reference in CATEGORICAL + BERNOULLI:
        assert torch.equal(kernel(p, v), reference(p, v))
