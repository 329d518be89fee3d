"""``solve``'s "auto" chooses by cost on a convolutional network (a small ResNet-style model,
built here: torchvision's wheels need a torch build of their own).

On resnet18 at batch 4, "auto" ran the dual solve, 5.4 s a step against CG's 1.8 s: its R
columns of ``Aᵀ`` (and, past the dense limit, R of ``A``) cost more products than a Krylov solve
capped at NGD's 20 iterations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ngtriton import FisherOperator
from ngtriton.solvers import BATCHED_COLUMN_COST, choose_method, dual_cost, krylov_cost, solve

pytestmark = pytest.mark.slow


class Block(nn.Module):
    """Two 3×3 convolutions with batch norm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.short(x))


def small_resnet(width: int = 16, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), Block(width, width, 1), Block(width, 2 * width, 2),
                         Block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, classes))


class Counting:
    """The operator, counting its products (a JVP or a VJP each; a batch of c columns is c)."""

    def __init__(self, op: FisherOperator) -> None:
        self.op, self.count = op, 0

    def __getattr__(self, name: str):
        return getattr(self.op, name)

    def damped_matvec(self, v):
        self.count += 2
        return self.op.damped_matvec(v)

    def fisher_matvec(self, v):
        self.count += 2
        return self.op.fisher_matvec(v)

    def factor_matvec(self, v):
        self.count += 1
        return self.op.factor_matvec(v)

    def factor_rmatvec(self, u):
        self.count += 1
        return self.op.factor_rmatvec(u)

    def factor_matmat(self, V):
        self.count += BATCHED_COLUMN_COST * V.shape[1]
        return self.op.factor_matmat(V)

    def factor_rmatmat(self, U):
        self.count += BATCHED_COLUMN_COST * U.shape[1]
        return self.op.factor_rmatmat(U)


@pytest.mark.parametrize(("width", "side", "expected"), [(16, 16, "dual-direct"),
                                                         (96, 8, "minres")])
def test_auto_on_a_convnet_takes_the_cheaper_solve(width, side, expected):
    """NGD's solve (g alone, capped at 20 iterations, tol 1e-3), R = 40 rows. Width 16: the
    dense Aᵀ fits, the dual costs R batched VJP columns, less than 20 iterations. Width 96
    (P = 2.8M, like resnet18 past the dense limit): K = A(AᵀI) takes R JVP columns too, and
    the capped Krylov solve is the cheaper one; the counted products agree."""
    torch.manual_seed(0)
    model = small_resnet(width).eval()
    x, y = torch.randn(4, 3, side, side), torch.randint(0, 10, (4,))
    op = Counting(FisherOperator(model, x, targets=y, damping=1e-3))
    R, P = op.num_rows, op.num_params
    g = op.gradient()
    assert choose_method(op, maxiter=20, factor_rhs=False) == expected
    res = solve(op, g, maxiter=20, tol=1e-3, on_unconverged="ignore")
    assert res.method == expected
    krylov_products, op.count = op.count, 0
    exact = solve(op, g, method="dual-direct")
    assert exact.converged and op.count == pytest.approx(dual_cost(R, P))
    if expected == "minres":
        assert krylov_products <= krylov_cost(R, P, 20) + 2 < op.count
        if res.converged:  # both answer the same system
            assert (res.x - exact.x).norm() / exact.x.norm() < 1e-2
    # uncapped, the exact solve is the one that surely converges
    assert choose_method(op, factor_rhs=False) == "dual-direct"
