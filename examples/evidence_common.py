"""Shared helpers of the evidence examples: dense float64 oracles built with torch.func.

Nothing here calls ngtriton: these are the independent references the library is measured
against (the Jacobian by ``jacrev``, the Hessian of the loss in the outputs by ``hessian``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from ngtriton.demo import make_mlp

LIKELIHOOD_NAMES = ("categorical", "gaussian", "bernoulli")


def default_backend() -> str:
    """``"auto"`` once the per-module engine exists, else the autograd fallback."""
    return "auto" if importlib.util.find_spec("ngtriton.linearize.engine") else "autograd"


def mlp(sizes: Sequence[int], seed: int = 0, act: type[nn.Module] = nn.Tanh,
        dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Linear-act-...-Linear network with the given layer widths, seeded, in ``dtype``."""
    return make_mlp(sizes, seed=seed, activation=act).to(dtype)


def make_targets(likelihood: str, z: Tensor, seed: int = 1) -> Tensor:
    """Random targets of the right kind for outputs ``z`` of shape (N, m)."""
    gen = torch.Generator().manual_seed(seed)
    n, m = z.shape
    if likelihood == "categorical":
        return torch.randint(0, m, (n,), generator=gen)
    if likelihood == "gaussian":
        return torch.randn(n, m, generator=gen, dtype=z.dtype)
    if likelihood == "bernoulli":
        return torch.randint(0, 2, (n, m), generator=gen).to(z.dtype)
    raise ValueError(likelihood)


def nll(likelihood: str, z: Tensor, y: Tensor) -> Tensor:
    """Negative log-likelihood of ONE example (z: (m,)), written from first principles."""
    if likelihood == "categorical":
        onehot = torch.arange(z.shape[-1], device=z.device) == y  # vmap-safe indexing
        return -(torch.log_softmax(z, -1) * onehot).sum()
    if likelihood == "gaussian":
        return 0.5 * ((z - y) ** 2).sum()
    if likelihood == "bernoulli":
        return (y * F.softplus(-z) + (1 - y) * F.softplus(z)).sum()   # −log σ(±z)
    raise ValueError(likelihood)


def output_grads(likelihood: str, z: Tensor, y: Tensor) -> Tensor:
    """∇_z ℓᵢ for each example: (N, m)."""
    return vmap(torch.func.grad(lambda zi, yi: nll(likelihood, zi, yi)))(z, y)


def output_hessians(likelihood: str, z: Tensor, y: Tensor) -> Tensor:
    """H_L = ∇²_z ℓᵢ for each example: (N, m, m)."""
    return vmap(hessian(lambda zi, yi: nll(likelihood, zi, yi)))(z, y)


def kl(likelihood: str, z: Tensor, w: Tensor) -> Tensor:
    """Mean over examples of KL(r(·|zᵢ) ‖ r(·|wᵢ))."""
    if likelihood == "categorical":
        lp, lq = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()
    if likelihood == "gaussian":
        return 0.5 * ((z - w) ** 2).sum(-1).mean()
    if likelihood == "bernoulli":
        lp1, lp0 = F.logsigmoid(z), F.logsigmoid(-z)
        lq1, lq0 = F.logsigmoid(w), F.logsigmoid(-w)
        return (lp1.exp() * (lp1 - lq1) + lp0.exp() * (lp0 - lq0)).sum(-1).mean()
    raise ValueError(likelihood)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def flat_to_dict(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in params_of(model).items():
        out[name] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def outputs_at(model: nn.Module, x: Tensor, flat: Tensor | None = None) -> Tensor:
    """Model outputs (N, m) at its parameters, or at the flat parameter vector ``flat``."""
    params = params_of(model) if flat is None else flat_to_dict(model, flat)
    with torch.no_grad():
        z = functional_call(model, params, (x,))
    return z.reshape(z.shape[0], -1)


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params_of(model).values()])


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """Per-example Jacobian of the outputs in all trainable parameters: (N, m, P)."""
    names = list(params_of(model))

    def f(*ps: Tensor) -> Tensor:
        z = functional_call(model, dict(zip(names, ps)), (x,))
        return z.reshape(z.shape[0], -1)

    jac = jacrev(f, argnums=tuple(range(len(names))))(*params_of(model).values())
    n, m = jac[0].shape[:2]
    return torch.cat([j.reshape(n, m, -1) for j in jac], dim=-1)


def dense_ggn(model: nn.Module, x: Tensor, y: Tensor, likelihood: str
              ) -> tuple[Tensor, Tensor]:
    """(JᵀH_L J / N, Jᵀ∇_z ℓ / N): the generalised Gauss–Newton matrix and the gradient."""
    z = outputs_at(model, x)
    J = dense_jacobian(model, x)
    H = output_hessians(likelihood, z, y)
    gz = output_grads(likelihood, z, y)
    n = z.shape[0]
    return (torch.einsum("nap,nab,nbq->pq", J, H, J) / n,
            torch.einsum("nap,na->p", J, gz) / n)


def min_norm_solve(F_: Tensor, g: Tensor, rtol: float = 1e-10) -> tuple[Tensor, dict]:
    """F⁺g by eigendecomposition; eigenvalues below ``rtol``·max are treated as zero.

    Also returns the rank and the spectral gap (smallest kept / largest dropped eigenvalue), so a
    caller can see that the cut is unambiguous.
    """
    evals, evecs = torch.linalg.eigh(F_)
    keep = evals > rtol * evals.max()
    x = evecs[:, keep] @ ((evecs[:, keep].T @ g) / evals[keep])
    dropped = evals[~keep].abs().max().item() if (~keep).any() else 0.0
    return x, {"rank": int(keep.sum()), "smallest_kept": evals[keep].min().item(),
               "largest_dropped": dropped}


def rel(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print (and return) a plain-text table; floats in %.3g unless already strings."""
    cells = [[c if isinstance(c, str) else (f"{c:.3g}" if isinstance(c, float) else str(c))
              for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text)
    return text
