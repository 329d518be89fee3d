"""Evidence 3: the minimum-norm natural gradient is parametrisation independent.

van Oostrum & Ay (Theorem 1; DESIGN.md §1.3): for any smooth reparametrisation θ = φ(ψ) with
invertible Jacobian Φ, the change of the output distribution that the minimum-norm natural
gradient n = F⁺g produces, F_R·J·n per example, is the same in every parametrisation — even when
F is singular (over-parametrised, N·m < P). Proof sketch: F = AᵀA, g = Aᵀb, so A n = A A⁺ b is
the projection of b onto range(A), and range(AΦ) = range(A). The Euclidean gradient does not
have this property (J_ψ g_ψ = J Φ Φᵀ g), nor does the damped solution (F + λI)⁻¹g, which only
converges to F⁺g as λ → 0.

One tanh MLP (categorical outputs) written three ways, each weight matrix W of every layer:

* ``plain``   W itself;
* ``linear``  W = M·V with M a fixed invertible (well-conditioned) matrix;
* ``cube``    W = V³ elementwise (V away from zero, so Φ = diag(3V²) is invertible).

Run: ``PYTHONPATH=src python examples/evidence_reparam.py [--n 20 --width 16 ...]`` (float64);
it writes ``docs/evidence_reparam.png``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence_common import make_targets, print_table, rel

from ngtriton import FisherOperator, solve

KINDS = ("plain", "linear", "cube")
BACKEND = "autograd"  # custom modules: the whole-model autograd linearization always applies


class ReparamLinear(nn.Module):
    """y = x Wᵀ + b with W = V, M·V or V³ (M fixed); initialised to represent a given W."""

    def __init__(self, W: Tensor, b: Tensor, kind: str, gen: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        if kind == "plain":
            V = W.clone()
        elif kind == "linear":
            q, _ = torch.linalg.qr(torch.randn(W.shape[0], W.shape[0], generator=gen,
                                               dtype=W.dtype))
            scales = torch.linspace(0.5, 2.0, W.shape[0], dtype=W.dtype)
            self.register_buffer("M", q * scales)          # invertible, cond(M) = 4
            V = torch.linalg.solve(self.M, W)
        elif kind == "cube":
            V = W.sign() * W.abs().pow(1.0 / 3.0)
        else:
            raise ValueError(kind)
        self.V = nn.Parameter(V)
        self.b = nn.Parameter(b.clone())

    def weight(self) -> Tensor:
        if self.kind == "linear":
            return self.M @ self.V
        if self.kind == "cube":
            return self.V ** 3
        return self.V

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight().T + self.b


class ReparamMLP(nn.Module):
    def __init__(self, weights: list[tuple[Tensor, Tensor]], kind: str, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 100)
        self.layers = nn.ModuleList(ReparamLinear(W, b, kind, gen) for W, b in weights)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def problem(n: int = 8, d_in: int = 3, width: int = 6, m: int = 3, seed: int = 0
            ) -> tuple[dict[str, nn.Module], Tensor, Tensor]:
    """The same function in the three parametrisations, a batch and categorical labels."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [d_in, width, m]
    weights = []
    for a, b in itertools.pairwise(sizes):
        W = torch.randn(b, a, generator=gen, dtype=torch.float64) / a**0.5
        W = W.sign() * (W.abs() + 0.2)                     # |W| ≥ 0.2: the cube map is regular
        weights.append((W, 0.1 * torch.randn(b, generator=gen, dtype=torch.float64)))
    models = {k: ReparamMLP(weights, k, seed) for k in KINDS}
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        z = models["plain"](x)
    return models, x, make_targets("categorical", z, seed + 1)


def output_change(op: FisherOperator, v: Tensor) -> Tensor:
    """F_R J v per example (N, m): how the direction v moves the output distribution."""
    return op.output_fvp(op.jvp(v))


def natgrad(model: nn.Module, x: Tensor, y: Tensor, damping: float, method: str = "dual",
            info: list | None = None) -> tuple[FisherOperator, Tensor]:
    """The operator and ``solve(op, method)``'s x at tol 1e-12 (its SolveResult → ``info``)."""
    op = FisherOperator(model, x, "categorical", targets=y, damping=damping, backend=BACKEND)
    result = solve(op, method=method, tol=1e-12)
    if info is not None:
        info.append(result)
    return op, result.x


def invariance(models: dict[str, nn.Module], x: Tensor, y: Tensor, damping: float = 0.0,
               method: str = "dual") -> dict[str, dict[str, float]]:
    """Relative difference to ``plain`` of F_R J n (natural gradient) and F_R J g (gradient)."""
    ref_op, ref_n = natgrad(models["plain"], x, y, damping, method)
    ref_nat, ref_grad = output_change(ref_op, ref_n), output_change(ref_op, ref_op.gradient())
    out = {}
    for kind in KINDS[1:]:
        op, n = natgrad(models[kind], x, y, damping, method)
        out[kind] = {"natural": rel(output_change(op, n), ref_nat),
                     "euclidean": rel(output_change(op, op.gradient()), ref_grad),
                     "params": rel(n, ref_n)}
    return out


def damping_curve(models: dict[str, nn.Module], x: Tensor, y: Tensor,
                  lambdas: np.ndarray) -> dict[str, np.ndarray]:
    """‖n_λ − n₀‖/‖n₀‖ per parametrisation, and the λ-solutions' disagreement in F_R J n."""
    curves: dict[str, list[float]] = {k: [] for k in KINDS}
    curves.update({f"dist {k}": [] for k in KINDS[1:]})
    base = {k: natgrad(models[k], x, y, 0.0)[1] for k in KINDS}
    for lam in lambdas:
        sol = {k: natgrad(models[k], x, y, float(lam)) for k in KINDS}
        for k in KINDS:
            curves[k].append(rel(sol[k][1], base[k]))
        ref = output_change(*sol["plain"])
        for k in KINDS[1:]:
            curves[f"dist {k}"].append(rel(output_change(*sol[k]), ref))
    return {k: np.array(v) for k, v in curves.items()}


def plot(lambdas: np.ndarray, curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    for k in KINDS:
        ax.loglog(lambdas, curves[k], "o-", ms=3, label=f"‖n_λ − n₀‖/‖n₀‖  ({k})")
    for k in KINDS[1:]:
        ax.loglog(lambdas, curves[f"dist {k}"], "--", label=f"F_R J n_λ: {k} vs plain")
    ax.set_xlabel("damping λ")
    ax.set_ylabel("relative difference")
    ax.set_title("damped → minimum-norm natural gradient (N·m < P)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(n: int = 20, d_in: int = 5, width: int = 16, m: int = 4, seed: int = 0,
         png: str | None = None) -> None:
    models, x, y = problem(n, d_in, width, m, seed)
    P = sum(p.numel() for p in models["plain"].parameters())
    print(f"tanh MLP {d_in}-{width}-{m}, categorical, N={n}: N·m = {n * m} < P = {P} "
          f"(float64, backend={BACKEND!r})")
    print("\nRelative difference to the plain parametrisation, damping 0")
    rows = []
    for method in ("dual", "cg", "minres", "lsmr"):
        info: list = []
        natgrad(models["plain"], x, y, 0.0, method, info)
        status = f"{info[0].method}: {info[0].iterations} it, {info[0].reason}"
        for kind, r in invariance(models, x, y, 0.0, method).items():
            rows.append([kind, status, f"{r['natural']:.2e}", f"{r['euclidean']:.2e}",
                         f"{r['params']:.2e}"])
    print_table(["parametrisation", "solve (tol 1e-12; plain model)", "F_R J n (natural)",
                 "F_R J g (Euclidean)", "n itself (params differ)"], rows)

    lambdas = np.logspace(-10, 1, 12)
    curves = damping_curve(models, x, y, lambdas)
    print("\nDamped solutions n_λ = (F + λI)⁻¹g against n₀ = F⁺g (method='dual')")
    headers = ["lambda"] + [f"|n_l-n_0|/|n_0| {k}" for k in KINDS] + [
        f"F_R J n_l {k} vs plain" for k in KINDS[1:]]
    keys = list(KINDS) + [f"dist {k}" for k in KINDS[1:]]
    print_table(headers, [[f"{lam:.0e}"] + [f"{curves[k][i]:.2e}" for k in keys]
                          for i, lam in enumerate(lambdas)])
    path = Path(png) if png else Path(__file__).resolve().parents[1] / "docs" / \
        "evidence_reparam.png"
    plot(lambdas, curves, path)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--d-in", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default=None)
    a = parser.parse_args()
    main(a.n, a.d_in, a.width, a.m, a.seed, a.png)
