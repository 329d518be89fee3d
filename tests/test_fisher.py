"""FisherOperator against dense float64 oracles built with torch.func (tests/oracles.py)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from oracles import dense_fisher
from torch import nn

from ngtriton import FisherOperator

LIKELIHOODS = ["categorical", "gaussian", "bernoulli"]
BACKENDS = ["torch", "autograd"]


def make_problem(likelihood: str, n: int, m: int = 3, seed: int = 0, dtype=torch.float64):
    """A small tanh MLP (P = 38 for m = 3) and a batch with targets for ``likelihood``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, m)).to(dtype)
    x = torch.randn(n, 3, generator=gen, dtype=dtype)
    if likelihood == "categorical":
        y = torch.randint(0, m, (n,), generator=gen)
    elif likelihood == "gaussian":
        y = torch.randn(n, m, generator=gen, dtype=dtype)
    else:
        y = torch.rand(n, m, generator=gen, dtype=dtype).round()
    return model, x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("n", [4, 20])  # N·m < P and N·m > P
def test_fisher_and_gradient_match_dense_oracle(likelihood, fisher, backend, n):
    model, x, y = make_problem(likelihood, n, seed=n)
    op = FisherOperator(model, x, likelihood, targets=y, fisher=fisher, backend=backend)
    F_ref, g_ref = dense_fisher(model, x, y, likelihood, fisher)
    torch.testing.assert_close(op.to_dense(), F_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gradient(), g_ref, rtol=1e-10, atol=1e-12)
    A = op.factor_to_dense()
    assert A.shape == (op.num_rows, op.num_params)
    torch.testing.assert_close(A.T @ A, F_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A.T @ op.gradient_factor(), g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_damping_adds_identity(likelihood):
    model, x, y = make_problem(likelihood, 6)
    op0 = FisherOperator(model, x, likelihood, targets=y, backend="autograd")
    op1 = FisherOperator(model, x, likelihood, targets=y, damping=0.3, backend="autograd")
    eye = torch.eye(op0.num_params, dtype=torch.float64)
    torch.testing.assert_close(op1.to_dense(), op0.to_dense() + 0.3 * eye)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_monte_carlo_fisher_is_exact_in_expectation(likelihood):
    model, x, y = make_problem(likelihood, 5)
    F_ref, _ = dense_fisher(model, x, y, likelihood, "exact")
    gen = torch.Generator().manual_seed(1)
    op = FisherOperator(model, x, likelihood, targets=y, fisher="mc", mc_samples=20000,
                        generator=gen, backend="autograd")
    err = torch.linalg.matrix_norm(op.to_dense() - F_ref) / torch.linalg.matrix_norm(F_ref)
    assert err < 0.05
    assert op.gradient_factor() is None
    # One sample per example is a rank-N Fisher; the same seed gives the same operator.
    ops = [FisherOperator(model, x, likelihood, fisher="mc", backend="autograd",
                          generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(ops[0].to_dense(), ops[1].to_dense(), rtol=0, atol=0)
    assert torch.linalg.matrix_rank(ops[0].to_dense()) <= 5


def test_vectors_as_lists_and_flat():
    model, x, y = make_problem("categorical", 6)
    op = FisherOperator(model, x, targets=y, backend="autograd")
    v = [torch.randn_like(p) for p in model.parameters()]
    out = op @ v
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in v]
    flat = op @ op.flatten(v)
    torch.testing.assert_close(op.flatten(out), flat)
    assert op.shape == (38, 38)


def test_to_scipy_agrees_with_scipy_cg():
    from scipy.sparse.linalg import cg

    model, x, y = make_problem("gaussian", 30)
    op = FisherOperator(model, x, "gaussian", targets=y, damping=1e-2, backend="autograd")
    g = op.gradient().numpy()
    sol, info = cg(op.to_scipy(), g, rtol=1e-12, maxiter=500)
    assert info == 0
    ref = torch.linalg.solve(op.to_dense(), op.gradient()).numpy()
    np.testing.assert_allclose(sol, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_products_reuse_one_forward(backend):
    model, x, y = make_problem("categorical", 8)
    calls = []
    module_call = nn.Module.__call__

    def counting_call(self, *args, **kwargs):  # no hook: the engine would not trace the model
        calls.append(type(self).__name__)
        return module_call(self, *args, **kwargs)
    with mock.patch.object(nn.Module, "__call__", counting_call):
        op = FisherOperator(model, x, targets=y, backend=backend)
        assert calls.count(type(model).__name__) <= 1
        built = len(calls)
        v = torch.randn(op.num_params, dtype=torch.float64)
        for _ in range(5):
            op @ v
            op.factor_rmatvec(op.factor_matvec(v))
        op.gradient()
    assert len(calls) == built


def test_sequence_outputs_are_examples():
    """Outputs (B, T, m) count B·T examples (a language model's token-level loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3))
    op = FisherOperator(model, x, targets=y, backend="autograd")
    op_flat = FisherOperator(model, x.reshape(6, 4), targets=y.reshape(6), backend="autograd")
    assert op.num_examples == 6
    torch.testing.assert_close(op.to_dense(), op_flat.to_dense())
    torch.testing.assert_close(op.gradient(), op_flat.gradient())


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"likelihood": "poisson"}, "likelihood"),
    ({"fisher": "kfac"}, "fisher"),
    ({"damping": -1.0}, "damping"),
    ({"damping": float("nan")}, "damping"),
    ({"backend": "cuda-magic"}, "backend"),
    ({"fisher": "empirical", "targets": None}, "targets"),
    ({"targets": torch.tensor([0, 1, 2, 7, 0, 1])}, "targets"),
    ({"targets": torch.tensor([0, 1, 2])}, "targets"),
    ({"targets": torch.zeros(6)}, "targets"),
    ({"mc_samples": 0, "fisher": "mc"}, "mc_samples"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    model, x, y = make_problem("categorical", 6)
    args = {"targets": y, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        FisherOperator(model, x, backend=args.pop("backend", "autograd"), **args)


def test_bad_vectors_and_inputs_name_the_argument():
    model, x, y = make_problem("categorical", 6)
    op = FisherOperator(model, x, targets=y, backend="autograd")
    with pytest.raises(ValueError, match="v"):
        op @ torch.zeros(op.num_params + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\[0\]"):
        op @ ([torch.zeros(2, 2)] * 4)
    with pytest.raises(ValueError, match="inputs"):
        FisherOperator(model, x.float(), targets=y)
    with pytest.raises(ValueError, match="model"):
        FisherOperator(nn.ReLU(), x, targets=y)
    with pytest.raises(ValueError, match="targets"):
        FisherOperator(model, x, backend="autograd").gradient()
    with pytest.raises(ValueError, match="targets"):
        FisherOperator(model, x, "gaussian", targets=torch.zeros(6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="targets"):
        FisherOperator(model, x, "bernoulli", targets=torch.full((6, 3), 2.0, dtype=torch.float64))


def test_public_jvp_vjp_and_output_fisher_compose_to_the_product():
    model, x, y = make_problem("bernoulli", 6)
    op = FisherOperator(model, x, "bernoulli", targets=y)
    v = torch.randn(op.num_params, dtype=torch.float64)
    u = op.jvp(v)
    assert u.shape == (6, 3)
    torch.testing.assert_close(op.vjp(op.output_fvp(u)) / 6, op @ v)
    with pytest.raises(ValueError, match="u"):
        op.output_fvp(u[:2])
    with pytest.raises(ValueError, match="w"):
        op.vjp(u[:2])


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus])  # Softplus: a module without a rule
def test_batched_factor_products_match_column_by_column(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    op = FisherOperator(model, x, backend="torch")
    V = torch.randn(op.num_params, 4, dtype=torch.float64)
    U = torch.randn(op.num_rows, 4, dtype=torch.float64)
    torch.testing.assert_close(op.factor_matmat(V),
                               torch.stack([op.factor_matvec(c) for c in V.unbind(1)], 1))
    torch.testing.assert_close(op.factor_rmatmat(U),
                               torch.stack([op.factor_rmatvec(c) for c in U.unbind(1)], 1))
