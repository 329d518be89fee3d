"""What one NGD step reports (:class:`NGDStats`) and the error a non-finite value raises."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NGDStats:
    """Diagnostics of one :meth:`NGD.step` (``opt.last_stats``; ``opt.history``: as dicts).

    ``reason`` is ``"accepted"``, ``"rejected"`` (the trial loss was higher: parameters restored),
    or, for a step skipped because a value was not finite (nothing reached the parameters; counted
    in ``skipped_total``): ``"nonfinite_loss"`` (the closure's loss), ``"nonfinite_grad"`` (the
    parameters' ``.grad``), ``"nonfinite_curvature"`` (a Fisher product, or the quadratic model
    built from one), ``"nonfinite_solution"`` (the solver's result), ``"nonfinite_step"``
    (``lr·n`` or ``θ − lr·n`` overflowed) or ``"nonfinite_trial_loss"`` (the loss at the trial
    point; the parameters were restored). ``alpha`` and ``momentum`` are the step size and the
    momentum coefficient the step used (chosen from the quadratic model with
    ``momentum="auto"``; else ``lr`` and 0).
    """

    step: int
    loss: float
    trial_loss: float
    accepted: bool
    reason: str
    iterations: int
    residual: float
    converged: bool
    method: str
    damping: float
    next_damping: float
    rho: float
    predicted_reduction: float
    actual_reduction: float
    grad_norm: float
    step_norm: float
    time: float
    skipped_total: int
    rejected_total: int
    alpha: float = float("nan")
    momentum: float = 0.0


class NonFiniteError(FloatingPointError):
    """Raised by ``NGD(..., nonfinite="raise")`` when a step meets a non-finite value.

    It is raised after the step's bookkeeping (``skipped_total``, the raised damping, the
    ``history`` entry) with every parameter bit for bit as before the step. ``reason`` is the
    :class:`NGDStats` reason (``"nonfinite_loss"``, ``"nonfinite_grad"``, ...), ``what`` names the
    non-finite quantity (``"loss"``, ``"gradient"``, ``"Fisher product"``, ...), ``step`` the
    optimizer's step count.
    """

    def __init__(self, message: str, *, reason: str, what: str, step: int) -> None:
        super().__init__(message)
        self.reason, self.what, self.step = reason, what, step
