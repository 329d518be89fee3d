"""Helpers for the solver tests: a dense factored Fisher operator with a known answer.

``DenseFactorOperator`` implements the FisherOperator protocol (docs/CONTRACTS.md) for an
explicit factor ``A`` (R × P): ``F = AᵀA``, ``g = Aᵀb``. It is used ONLY in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

TOL = {torch.float64: 1e-11, torch.float32: 1e-5}  # solver tolerances per dtype
RTOL = {torch.float64: 1e-8, torch.float32: 2e-3}  # accepted relative error per dtype
PINV_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}  # rank cutoff of the float64 oracle


def random_factor(R: int, P: int, rank: int | None = None, *, cond: float = 3.0,
                  dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """``A = U diag(s) Vᵀ`` (R × P) of the given rank, singular values in ``[1, cond]``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(R, P) if rank is None else rank
    U = torch.linalg.qr(torch.randn(R, k, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(P, k, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


class DenseFactorOperator:
    """``F + λI`` with ``F = AᵀA`` for an explicit dense ``A`` (the FisherOperator protocol)."""

    def __init__(self, A: Tensor, b: Tensor, damping: float = 0.0, has_b: bool = True,
                 shapes: Sequence[tuple[int, ...]] | None = None) -> None:
        self.A = A
        self.num_rows, self.num_params = A.shape
        self.damping = float(damping)
        self.dtype, self.device = A.dtype, A.device
        self.b = b
        self.has_b = has_b
        P = self.num_params
        self.shapes = list(shapes) if shapes is not None else [(2, P // 4), (P - 2 * (P // 4),)]
        self.products = 0

    # products
    def fisher_matvec(self, v: Tensor) -> Tensor:
        self.products += 1
        return self.A.T @ (self.A @ v)

    def damped_matvec(self, v: Tensor) -> Tensor:
        return self.fisher_matvec(v) + self.damping * v

    def factor_matvec(self, v: Tensor) -> Tensor:
        return self.A @ v

    def factor_rmatvec(self, u: Tensor) -> Tensor:
        return self.A.T @ u

    def factor_matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def factor_rmatmat(self, U: Tensor) -> Tensor:
        return self.A.T @ U

    # gradient
    def gradient(self) -> Tensor:
        return self.A.T @ self.b

    def gradient_factor(self) -> Tensor | None:
        return self.b if self.has_b else None

    # parameter lists
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        if len(tensors) != len(self.shapes):
            raise ValueError(f"v: expected {len(self.shapes)} tensors, got {len(tensors)}")
        for t, s in zip(tensors, self.shapes):
            if tuple(t.shape) != tuple(s):
                raise ValueError(f"v: expected shape {s}, got {tuple(t.shape)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        sizes = [int(torch.tensor(s).prod()) if s else 1 for s in self.shapes]
        return [c.view(s) for c, s in zip(flat.split(sizes), self.shapes)]

    # oracles (float64)
    def dense_fisher(self) -> Tensor:
        A = self.A.double()
        return A.T @ A

    def reference(self, rhs: Tensor) -> Tensor:
        """pinv(F) rhs at λ = 0, solve(F + λI, rhs) otherwise; float64."""
        F = self.dense_fisher()
        if self.damping == 0:
            return torch.linalg.pinv(F, hermitian=True, rtol=PINV_RTOL[self.dtype]) @ rhs.double()
        eye = torch.eye(self.num_params, dtype=torch.float64)
        return torch.linalg.solve(F + self.damping * eye, rhs.double())

    def null_basis(self) -> Tensor:
        """Orthonormal basis of null(F) (float64, from the SVD of A)."""
        _, s, Vh = torch.linalg.svd(self.A.double(), full_matrices=True)
        rank = int((s > PINV_RTOL[self.dtype] * s.max()).sum())
        return Vh[rank:].T


OpFactory = Callable[..., DenseFactorOperator]


def make_operator(R: int, P: int, rank: int | None = None, *, damping: float = 0.0,
                  dtype: torch.dtype = torch.float64, seed: int = 0, has_b: bool = True,
                  cond: float = 3.0) -> DenseFactorOperator:
    A = random_factor(R, P, rank, cond=cond, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(R, generator=gen, dtype=torch.float64).to(dtype)
    return DenseFactorOperator(A, b, damping=damping, has_b=has_b)


def rel_err(x: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    den = float(ref.norm())
    return float((x.double() - ref).norm()) / (den if den > 0 else 1.0)


# the shapes every solver is checked on: over-/under-determined, full rank and rank-deficient
SHAPES = [(40, 12, None), (12, 40, None), (30, 25, 6), (10, 50, 4), (60, 20, 20)]
