"""One-call natural gradient: linearize, build the Fisher operator, solve."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .fisher import FisherOperator
from .likelihoods import Likelihood
from .solvers import SolveResult, solve


def natural_gradient(model: nn.Module, inputs: Any, targets: Tensor, *,
                     likelihood: str | Likelihood = "categorical", fisher: str = "exact",
                     damping: float = 0.0, method: str = "auto", tol: float = 1e-6,
                     maxiter: int | None = None, backend: str = "auto",
                     return_result: bool = False, **operator_kwargs: Any
                     ) -> list[Tensor] | tuple[list[Tensor], SolveResult]:
    """The natural gradient of the mean negative log-likelihood of ``model`` on one batch.

    Returns one tensor per trainable parameter (``model.parameters()`` order): the direction to
    subtract, like a gradient. ``damping=0`` gives the minimum-norm solution ``F⁺g``;
    ``damping>0`` gives ``(F + λI)⁻¹g``. With ``return_result=True`` the solver's
    :class:`~ngtriton.solvers.SolveResult` (iterations, residual, ...) comes back too.
    """
    op = FisherOperator(model, inputs, likelihood, targets=targets, fisher=fisher,
                        damping=damping, backend=backend, **operator_kwargs)
    result = solve(op, method=method, tol=tol, maxiter=maxiter)
    direction = op.unflatten(result.x)
    return (direction, result) if return_result else direction
