"""Evidence 1: the Fisher is the generalised Gauss–Newton matrix and the curvature of the KL.

(a) For categorical, Gaussian and Bernoulli outputs, ngtriton's Fisher (``op.to_dense()``, built
    from its matrix-free products) equals Jᵀ H_L J / N, where J comes from ``torch.func.jacrev``
    and H_L = ∇²_z ℓ from ``torch.func.hessian`` of the loss written from first principles
    (Martens, "New insights and perspectives on the natural gradient method", sec. 8).
(b) KL(p_θ ‖ p_{θ+εd}) = ½ ε² dᵀFd + O(ε³): the log-log slope of KL(ε) over ε ∈ [1e-4, 1e-1] is
    2 and KL / (½ε² dᵀFd) → 1 as ε → 0 (dᵀFd from the library's product ``op @ d``).

Run: ``PYTHONPATH=src python examples/evidence_ggn_kl.py [--n 64 --width 32 ...]`` (float64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence_common import (
    LIKELIHOOD_NAMES,
    default_backend,
    dense_ggn,
    flat_params,
    kl,
    make_targets,
    mlp,
    outputs_at,
    print_table,
    rel,
)

from ngtriton import FisherOperator


def ggn_check(likelihood: str, n: int = 16, d_in: int = 4, width: int = 8, m: int = 3,
              backend: str | None = None, seed: int = 0) -> dict:
    """‖F_ngtriton − JᵀH_L J/N‖/‖JᵀH_L J/N‖ and the same for the gradient."""
    model = mlp([d_in, width, width, m], seed=seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    y = make_targets(likelihood, outputs_at(model, x), seed=seed + 2)
    op = FisherOperator(model, x, likelihood, targets=y, backend=backend or default_backend())
    F_ref, g_ref = dense_ggn(model, x, y, likelihood)
    return {"likelihood": likelihood, "P": op.num_params, "N": n,
            "fisher_err": rel(op.to_dense(), F_ref), "grad_err": rel(op.gradient(), g_ref),
            "norm": float(F_ref.norm())}


def kl_check(likelihood: str, n: int = 16, d_in: int = 4, width: int = 8, m: int = 3,
             backend: str | None = None, seed: int = 0,
             eps: np.ndarray | None = None) -> dict:
    """KL(p_θ ‖ p_{θ+εd}) against ½ε²dᵀFd for a random unit direction d."""
    eps = np.logspace(-4, -1, 13) if eps is None else eps
    model = mlp([d_in, width, width, m], seed=seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    op = FisherOperator(model, x, likelihood, backend=backend or default_backend())
    theta = flat_params(model)
    d = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed + 3),
                    dtype=torch.float64)
    d /= d.norm()
    dFd = float(d @ (op @ d))
    z = outputs_at(model, x)
    kls = np.array([float(kl(likelihood, z, outputs_at(model, x, theta + e * d))) for e in eps])
    ratio = kls / (0.5 * eps**2 * dFd)
    slope = float(np.polyfit(np.log(eps), np.log(kls), 1)[0])
    return {"likelihood": likelihood, "eps": eps, "kl": kls, "ratio": ratio, "slope": slope,
            "dFd": dFd}


def main(n: int = 64, d_in: int = 10, width: int = 32, m: int = 5, seed: int = 0,
         backend: str | None = None) -> None:
    backend = backend or default_backend()
    print(f"float64, backend={backend!r}, tanh MLP {d_in}-{width}-{width}-{m}, N={n}")
    print("\n(a) Fisher = generalised Gauss-Newton  (relative Frobenius error)")
    rows = []
    for lik in LIKELIHOOD_NAMES:
        r = ggn_check(lik, n, d_in, width, m, backend, seed)
        rows.append([lik, r["P"], r["N"], f"{r['fisher_err']:.2e}", f"{r['grad_err']:.2e}"])
    print_table(["likelihood", "P", "N", "|F - J'HJ|/|J'HJ|", "|g - J'dL|/|J'dL|"], rows)

    print("\n(b) KL(p_theta || p_theta+eps*d) vs 1/2 eps^2 d'Fd  (d a random unit vector)")
    res = [kl_check(lik, n, d_in, width, m, backend, seed) for lik in LIKELIHOOD_NAMES]
    eps = res[0]["eps"]
    rows = [[f"{e:.1e}"] + [f"{r['ratio'][i]:.6f}" for r in res] for i, e in enumerate(eps)]
    print_table(["eps"] + [f"KL/(eps^2 dFd/2) {r['likelihood']}" for r in res], rows)
    print_table(["likelihood", "d'Fd", "log-log slope over [1e-4, 1e-1]",
                 "|ratio-1| at 1e-4"],
                [[r["likelihood"], f"{r['dFd']:.4g}", f"{r['slope']:.5f}",
                  f"{abs(r['ratio'][0] - 1):.1e}"] for r in res])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--d-in", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--m", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None)
    a = parser.parse_args()
    main(a.n, a.d_in, a.width, a.m, a.seed, a.backend)
