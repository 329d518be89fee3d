"""Evidence 4: the "natural chain rule" of the first seed document — where is the mistake?

Its batch formula, with G = Jᵀ (P × N·m, the Jacobians stacked over the batch), F_η the
block-diagonal output Fisher (blocks F_R(zᵢ)/N) and g_η the output gradients (∇_z ℓᵢ/N):

    n_chain = G (GᵀG)⁻¹ F_η⁻¹ g_η .

It satisfies F n = G F_η Gᵀ G (GᵀG)⁻¹ F_η⁻¹ g_η = G g_η = g and lies in range(G), so it IS F⁺g
when F_η is invertible and G has full column rank (N·m ≤ P). Where an inverse does not exist we
use the Moore–Penrose pseudo-inverse (``torch.linalg.pinv``, hermitian) — softmax logits make
F_η singular (each block has the null vector 1), N·m > P makes GᵀG singular — and measure what the
formula then gives. The per-layer (modular) version treats each Linear layer's output hₗ as η:
nₗ = Gₗ(GₗᵀGₗ)⁺ F_hₗ⁺ g_hₗ with Gₗ = (∂hₗ/∂θₗ)ᵀ, F_hₗ = blockdiag(Tᵢᵀ F_R Tᵢ)/N, g_hₗ = Tᵢᵀ∇_z ℓᵢ/N
and Tᵢ = ∂zᵢ/∂hₗᵢ, and stacks the layers' nₗ.

Every result is compared with F⁺g computed densely (F = Jᵀ H_L J/N from torch.func, eigh with a
cut at 1e-10·λ_max; the spectral gap is printed), and with what the library computes instead:
the sample-space (dual) form n = Aᵀ(AAᵀ + λI)⁺ b, ``solve(op, method="dual")``, at λ = 0.

Run: ``PYTHONPATH=src python examples/evidence_chain_rule.py`` (float64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence_common import (
    default_backend,
    dense_jacobian,
    make_targets,
    min_norm_solve,
    mlp,
    output_grads,
    output_hessians,
    outputs_at,
    print_table,
    rel,
)

from ngtriton import Likelihood, solve
from ngtriton.fisher import FisherOperator


class HeteroscedasticGaussian(Likelihood):
    """Gaussian with a fixed, known standard deviation per example and output (σ: (N, m)).

    F_R(zᵢ) = diag(1/σᵢ²): invertible but not a multiple of the identity. A user-defined
    likelihood: only ``loss_per_example`` and ``factor_matrix`` are written.
    """

    name = "heteroscedastic-gaussian"

    def __init__(self, sigma: Tensor) -> None:
        self.sigma = sigma

    def loss_per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (((outputs - targets) / self.sigma) ** 2).sum(-1)

    def factor_matrix(self, state: Tensor) -> Tensor:
        return torch.diag_embed(1.0 / self.sigma)


def block_diag(blocks: Tensor) -> Tensor:
    return torch.block_diag(*blocks.unbind(0))


def pinv(M: Tensor) -> Tensor:
    return torch.linalg.pinv(M, hermitian=True)


def output_terms(likelihood: str, z: Tensor, y: Tensor, sigma: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
    """(H_L per example (N, m, m), ∇_z ℓ per example (N, m)) from torch.func."""
    if likelihood == "hetero":
        return torch.diag_embed(sigma**-2), (z - y) / sigma**2
    return output_hessians(likelihood, z, y), output_grads(likelihood, z, y)


def batch_chain_rule(J: Tensor, H: Tensor, gz: Tensor) -> Tensor:
    """G (GᵀG)⁺ F_η⁺ g_η with G = Jᵀ stacked; pinv = inverse wherever the inverse exists."""
    n, m, P = J.shape
    G = J.reshape(n * m, P).T
    F_eta = block_diag(H) / n
    g_eta = gz.reshape(-1) / n
    return G @ (pinv(G.T @ G) @ (pinv(F_eta) @ g_eta))


def layerwise_chain_rule(model: nn.Sequential, x: Tensor, H: Tensor, gz: Tensor) -> Tensor:
    """The batch formula applied layer by layer, each Linear layer's output hₗ taken as η."""
    linears = [mod for mod in model if isinstance(mod, nn.Linear)]
    acts = [mod for mod in model if not isinstance(mod, nn.Linear)]
    n = x.shape[0]
    Ws = [(lin.weight.detach(), lin.bias.detach()) for lin in linears]

    def tail(l: int, h: Tensor) -> Tensor:                 # z as a function of hₗ (one example)
        for j in range(l + 1, len(linears)):
            h = acts[j - 1](h) @ Ws[j][0].T + Ws[j][1]
        return h

    pieces, a = [], x
    for l, (W, b) in enumerate(Ws):
        jw, jb = jacrev(lambda W_, b_, a=a: a @ W_.T + b_, argnums=(0, 1))(W, b)
        d = W.shape[0]
        G = torch.cat([jw.reshape(n * d, -1), jb.reshape(n * d, -1)], 1).T   # (P_l, N·d_l)
        h = a @ W.T + b
        T = vmap(jacrev(lambda hi, l=l: tail(l, hi)))(h)                       # (N, m, d_l)
        F_h = block_diag(torch.einsum("nad,nab,nbe->nde", T, H, T)) / n
        g_h = torch.einsum("nad,na->nd", T, gz).reshape(-1) / n
        pieces.append(G @ (pinv(G.T @ G) @ (pinv(F_h) @ g_h)))
        if l < len(acts):
            a = acts[l](h)
    return torch.cat(pieces)


def case(name: str, likelihood: str, sizes: list[int], n: int, layerwise: bool = False,
         seed: int = 0, backend: str | None = None) -> dict:
    """One row: the chain rule (batch or per layer) and the library's dual solve vs F⁺g."""
    model = mlp(sizes, seed=seed)
    x = torch.randn(n, sizes[0], generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    z = outputs_at(model, x)
    sigma = None
    if likelihood == "hetero":
        sigma = torch.rand(z.shape, generator=torch.Generator().manual_seed(seed + 4),
                           dtype=torch.float64) * 1.5 + 0.25          # σ ∈ [0.25, 1.75]
        y = make_targets("gaussian", z, seed + 2)
        lib: str | Likelihood = HeteroscedasticGaussian(sigma)
    else:
        y = make_targets(likelihood, z, seed + 2)
        lib = likelihood
    J = dense_jacobian(model, x)
    H, gz = output_terms(likelihood, z, y, sigma)
    F_ = torch.einsum("nap,nab,nbq->pq", J, H, J) / n
    g = torch.einsum("nap,na->p", J, gz) / n
    ref, info = min_norm_solve(F_, g)
    chain = layerwise_chain_rule(model, x, H, gz) if layerwise else batch_chain_rule(J, H, gz)
    op = FisherOperator(model, x, lib, targets=y, backend=backend or default_backend())
    dual = solve(op, method="dual", tol=1e-12).x
    P = J.shape[-1]
    return {"case": name, "likelihood": likelihood, "N*m": n * z.shape[1], "P": P,
            "chain_err": rel(chain, ref), "chain_residual": rel(F_ @ chain, g),
            "chain_norm_ratio": float(chain.norm() / ref.norm()),
            "dual_err": rel(dual, ref), "lib_fisher_err": rel(op.to_dense(), F_),
            "rank": info["rank"],
            "gap": (info["smallest_kept"] / info["largest_dropped"]
                    if info["largest_dropped"] else float("inf"))}


def rank_text(r: dict) -> str:
    gap = f"gap {r['gap']:.0e}" if r["gap"] < float("inf") else "full"
    return f"{r['rank']} ({gap})"


def cases(big: list[int], small: list[int], n_big: int, n_small: int, seed: int = 0,
          backend: str | None = None) -> list[dict]:
    """The six measurements of the results page (sizes: ``big`` with N·m ≤ P, ``small`` with
    N·m > P)."""
    return [
        case("Gaussian, N·m ≤ P", "gaussian", big, n_big, seed=seed, backend=backend),
        case("softmax logits, N·m ≤ P", "categorical", big, n_big, seed=seed, backend=backend),
        case("heterosc. Gaussian, N·m > P", "hetero", small, n_small, seed=seed,
             backend=backend),
        case("Bernoulli, N·m > P", "bernoulli", small, n_small, seed=seed, backend=backend),
        case("Gaussian (F_η ∝ I), N·m > P", "gaussian", small, n_small, seed=seed,
             backend=backend),
        case("Gaussian, per layer", "gaussian", big, n_big, layerwise=True, seed=seed,
             backend=backend),
    ]


def main(big: tuple[int, ...] = (8, 16, 16, 3), small: tuple[int, ...] = (3, 4, 2),
         n_big: int = 6, n_small: int = 20, seed: int = 0, backend: str | None = None) -> None:
    print(f"tanh MLPs, float64: {'-'.join(map(str, big))} with N={n_big}; "
          f"{'-'.join(map(str, small))} with N={n_small}; backend={backend or default_backend()!r}")
    rows = []
    for r in cases(list(big), list(small), n_big, n_small, seed, backend):
        rows.append([r["case"], f"{r['N*m']}/{r['P']}", f"{r['chain_err']:.2e}",
                     f"{r['chain_residual']:.2e}", f"{r['chain_norm_ratio']:.3f}",
                     f"{r['dual_err']:.2e}", rank_text(r)])
    print_table(["case", "N·m/P", "|n_chain - F⁺g|/|F⁺g|", "|F n_chain - g|/|g|",
                 "|n_chain|/|F⁺g|", "library dual vs F⁺g", "rank F"], rows)
    print("\nsoftmax logits (F_η singular): |n_chain - F⁺g|/|F⁺g| over seeds 0-4 "
          "(|F n_chain - g|/|g| stays at round-off: a solution, but not the minimum-norm one)")
    srows = []
    for sizes, n in ((list(big), n_big), ([3, 5, 4], 8), ([5, 4, 2], 3)):
        res = [case("", "categorical", sizes, n, seed=s, backend=backend) for s in range(5)]
        errs = sorted(r["chain_err"] for r in res)
        srows.append(["-".join(map(str, sizes)), n, f"{res[0]['N*m']}/{res[0]['P']}",
                      " ".join(f"{e:.2f}" for e in errs),
                      f"{max(r['chain_residual'] for r in res):.0e}"])
    print_table(["MLP", "N", "N·m/P", "errors (sorted)", "max residual"], srows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, nargs="+", default=[8, 16, 16, 3])
    parser.add_argument("--small", type=int, nargs="+", default=[3, 4, 2])
    parser.add_argument("--n-big", type=int, default=6)
    parser.add_argument("--n-small", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None)
    a = parser.parse_args()
    main(tuple(a.big), tuple(a.small), a.n_big, a.n_small, a.seed, a.backend)
