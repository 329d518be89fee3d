"""Dense float64 GGN oracles of a loss written as torch computes it (torch.func only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev


def model_fn(model: nn.Module, inputs: tuple[Any, ...],
             select: Callable[[Any], torch.Tensor] = lambda o: o):
    """``f(*params) -> outputs`` over the trainable parameters, and those parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for n, p in model.named_parameters() if p.requires_grad)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return select(functional_call(model, dict(zip(names, ps)), inputs))

    return f, params


def dense_jacobian(f, params) -> torch.Tensor:
    """J of the flattened outputs of ``f`` w.r.t. ``params``: (numel, P)."""
    jac = jacrev(lambda *ps: f(*ps).reshape(-1), argnums=tuple(range(len(params))))(*params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def ggn_oracle(model: nn.Module, inputs: tuple[Any, ...], loss_of_z: Callable[[torch.Tensor], Any],
               select: Callable[[Any], torch.Tensor] = lambda o: o
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(GGN, gradient, loss)``: ``Jᵀ (∂²L/∂z²) J`` with the Hessian of the loss in the
    outputs from :func:`torch.func.hessian`, ``Jᵀ ∇_z L`` and ``L``, all dense."""
    f, params = model_fn(model, inputs, select)
    with torch.no_grad():
        z = f(*params)
    J = dense_jacobian(f, params)
    n = z.numel()
    H = hessian(loss_of_z)(z).reshape(n, n)
    gz = grad(loss_of_z)(z).reshape(n)
    return J.T @ H @ J, J.T @ gz, loss_of_z(z)
