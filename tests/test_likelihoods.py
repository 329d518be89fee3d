"""Likelihoods: F_R = Hessian of ℓ in z (torch.func), L Lᵀ = F_R, L b = ∇ℓ, sampling, protocol."""

from __future__ import annotations

import pytest
import torch
from oracles import per_example_nll
from torch.func import grad, hessian

from ngtriton import FisherOperator, Likelihood
from ngtriton.likelihoods import get_likelihood

N, M = 7, 4


def draw(name: str, seed: int = 0, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(N, M, generator=gen, dtype=torch.float64)
    if name == "categorical":
        y = torch.randint(0, M, (N,), generator=gen)
    elif name == "gaussian":
        y = torch.randn(N, M, generator=gen, dtype=torch.float64)
    else:
        y = torch.rand(N, M, generator=gen, dtype=torch.float64)
    return z, y


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli"])
def test_structure_matches_torch_func(name):
    lik = get_likelihood(name)
    z, y = draw(name, seed=3)

    def nll(zi, yi):
        return per_example_nll(name, zi[None], yi[None]).sum()

    H = torch.stack([hessian(nll)(z[i], y[i]) for i in range(N)])
    G = torch.stack([grad(nll)(z[i], y[i]) for i in range(N)])
    state = lik.fisher_state(z)
    L = lik.factor_matrix(state)
    torch.testing.assert_close(L @ L.transpose(1, 2), H)
    torch.testing.assert_close(lik.output_grad(z, y), G)
    torch.testing.assert_close(lik.loss(z, y), per_example_nll(name, z, y).mean())
    v = torch.randn(N, M, dtype=torch.float64)
    u = torch.randn(N, lik.factor_dim(M), dtype=torch.float64)
    torch.testing.assert_close(lik.fvp(state, v), torch.einsum("nab,nb->na", H, v))
    torch.testing.assert_close(lik.factor_t(state, v), torch.einsum("nab,na->nb", L, v))
    torch.testing.assert_close(lik.factor(state, u), torch.einsum("nab,nb->na", L, u))
    b = lik.gradient_factor(state, z, y)
    torch.testing.assert_close(torch.einsum("nab,nb->na", L, b), G)


@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_gradient_factor_stays_finite_for_confident_wrong_outputs(name):
    lik = get_likelihood(name)
    z, y = draw(name, scale=60.0)
    if name == "bernoulli":
        y = (z < 0).to(z.dtype)  # every output confidently wrong
    b = lik.gradient_factor(lik.fisher_state(z), z, y)
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli"])
def test_sampling_gives_the_fisher_as_score_covariance(name):
    lik = get_likelihood(name)
    z, _ = draw(name, seed=5, scale=1.0)
    gen = torch.Generator().manual_seed(0)
    S = 40000
    zz = z.repeat(S, 1)
    scores = lik.output_grad(zz, lik.sample(zz, gen)).reshape(S, N, M)
    cov = torch.einsum("sna,snb->nab", scores, scores) / S
    L = lik.factor_matrix(lik.fisher_state(z))
    torch.testing.assert_close(cov, L @ L.transpose(1, 2), atol=0.03, rtol=0.05)


class SquaredError(Likelihood):
    """A user's likelihood written with the two required methods only: Gaussian, variance 1/2."""

    name = "squared-error"

    def loss_per_example(self, outputs, targets):
        return ((outputs - targets) ** 2).sum(-1)

    def factor_matrix(self, state):
        n, m = state.shape
        eye = torch.eye(m, dtype=state.dtype) * 2 ** 0.5
        return eye.expand(n, m, m)


def test_custom_likelihood_protocol_matches_builtin():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    custom = FisherOperator(model, x, SquaredError(), targets=y, backend="autograd")
    gauss = FisherOperator(model, x, "gaussian", targets=y, backend="autograd")
    torch.testing.assert_close(custom.to_dense(), 2 * gauss.to_dense())
    torch.testing.assert_close(custom.gradient(), 2 * gauss.gradient())
    b = custom.gradient_factor()
    torch.testing.assert_close(custom.factor_to_dense().T @ b, custom.gradient())
    with pytest.raises(ValueError, match="fisher"):
        FisherOperator(model, x, SquaredError(), fisher="nope")
    with pytest.raises(ValueError, match="fisher"):
        FisherOperator(model, x, SquaredError(), fisher="mc", backend="autograd")
