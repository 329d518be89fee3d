"""One-call natural gradient: linearize, build the Fisher operator, solve."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .fisher import FisherOperator
from .likelihoods import Likelihood
from .solvers import SolveResult, solve


def natural_gradient(model: nn.Module, inputs: Any, targets: Any, *,
                     likelihood: str | Likelihood | None = None, loss: nn.Module | None = None,
                     fisher: str = "exact",
                     damping: float = 0.0, method: str = "auto", tol: float = 1e-6,
                     maxiter: int | None = None, check_every: int = 1, backend: str = "auto",
                     return_result: bool = False, on_unconverged: str = "warn",
                     **operator_kwargs: Any
                     ) -> list[Tensor] | tuple[list[Tensor], SolveResult]:
    """The natural gradient of a loss of ``model`` on one batch: of ``loss`` (a torch loss
    module, e.g. ``nn.CrossEntropyLoss(ignore_index=-100)``) applied to the model's outputs
    and ``targets``, or of the mean negative log-likelihood of ``likelihood`` (default
    ``"categorical"``). ``damping`` is in the loss's units (see :class:`FisherOperator`;
    ``output=`` picks the tensor of a tuple, dict or ``ModelOutput``).

    Returns one tensor per trainable parameter (``model.parameters()`` order): the direction to
    subtract, like a gradient. ``damping=0`` gives the minimum-norm solution ``F⁺g``;
    ``damping>0`` gives ``(F + λI)⁻¹g``. With ``return_result=True`` the solver's
    :class:`~ngtriton.solvers.SolveResult` (iterations, residual, ...) comes back too.
    A solve that ends unconverged warns (:class:`~ngtriton.ConvergenceWarning`), raises
    (``on_unconverged="raise"``: :class:`~ngtriton.ConvergenceError`) or, with ``"ignore"``,
    says so only in the result's ``converged``. ``check_every``: as in
    :func:`~ngtriton.solvers.solve` (on CUDA, > 1 spares a synchronisation per iteration).
    """
    if not isinstance(return_result, bool):
        raise TypeError(f"return_result: expected True or False, got "
                        f"{type(return_result).__name__} {return_result!r:.40}")
    op = FisherOperator(model, inputs, likelihood, loss=loss, targets=targets, fisher=fisher,
                        damping=damping, backend=backend, **operator_kwargs)
    result = solve(op, method=method, tol=tol, maxiter=maxiter, check_every=check_every,
                   on_unconverged=on_unconverged)
    direction = op.unflatten(result.x)
    return (direction, result) if return_result else direction
