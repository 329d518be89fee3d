"""Dense float64 oracles built with torch.func, independent of ngtriton's own code paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev


def per_example_nll(likelihood: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓᵢ written directly with torch's losses (z: (N, m))."""
    if likelihood == "categorical":
        return F.cross_entropy(z, y, reduction="none")
    if likelihood == "gaussian":
        return 0.5 * ((z - y) ** 2).sum(-1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1)
    raise ValueError(likelihood)


def dense_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J of the flattened outputs w.r.t. all trainable parameters: (N·m, P)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

    jac = jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def dense_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str,
                 fisher: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(F, g): the exact (GGN: Hessian of ℓ in z) or empirical Fisher, and the loss gradient."""
    with torch.no_grad():
        z = model(x)
    n, m = z.reshape(z.shape[0], -1).shape
    J = dense_jacobian(model, x).reshape(n, m, -1)
    z = z.reshape(n, m)
    grads_z = torch.stack([
        torch.func.grad(lambda zi, yi: per_example_nll(likelihood, zi[None], yi[None]).sum())(
            z[i], y[i]) for i in range(n)])
    if fisher == "exact":
        H = torch.stack([
            hessian(lambda zi, yi: per_example_nll(likelihood, zi[None], yi[None]).sum())(
                z[i], y[i]) for i in range(n)])
    elif fisher == "empirical":
        H = grads_z.unsqueeze(-1) * grads_z.unsqueeze(-2)
    else:
        raise ValueError(fisher)
    Fd = torch.einsum("nap,nab,nbq->pq", J, H, J) / n
    g = torch.einsum("nap,na->p", J, grads_z) / n
    return Fd, g
