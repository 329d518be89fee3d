"""The result type shared by every solver, and the device-side stopping bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

REASONS = ("converged", "maxiter", "breakdown", "krylov space exhausted", "direct", "zero rhs")
MAXITER_CAP = 10_000
ON_UNCONVERGED = ("warn", "raise", "ignore")

_CONVERGED, _EXHAUSTED, _BREAKDOWN = 1, 2, 3
_CODE_REASON = {0: "maxiter", _CONVERGED: "converged", _EXHAUSTED: "krylov space exhausted",
                _BREAKDOWN: "breakdown"}


@dataclass
class SolveResult:
    """What a solve returns.

    Attributes:
        x: the solution, a flat tensor (a list of parameter-shaped tensors when
            :func:`ngtriton.solvers.solve` was given ``rhs`` as a list).
        iterations: Krylov iterations done (0 for direct solves).
        residual: final relative residual of the damped normal equations,
            ``‖rhs − (F+λI)x‖/‖rhs‖``, as CG's and LSMR's recurrences estimate it, computed
            explicitly by MINRES and the dual solves (0.0 for rhs = 0).
        converged: whether the stopping test was met.
        reason: one of ``REASONS``.
        method: the method that ran (``"cg"``, ``"minres"``, ``"lsmr"``, ``"dual-direct"``, ...).
        history: relative residual after each iteration.
    """

    x: Any
    iterations: int
    residual: float
    converged: bool
    reason: str
    method: str
    history: list[float] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return (f"SolveResult(method={self.method!r}, reason={self.reason!r}, "
                f"converged={self.converged}, iterations={self.iterations}, "
                f"residual={self.residual:.3e})")


class ConvergenceWarning(UserWarning):
    """A solve stopped before its stopping test was met: its ``x`` is an approximation."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` under ``on_unconverged="raise"``; the
    unconverged :class:`SolveResult` is its ``result``."""

    def __init__(self, message: str, result: SolveResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def check_on_unconverged(value: Any) -> str:
    """Validate ``on_unconverged``; the error names it."""
    if not isinstance(value, str):
        raise TypeError(f"on_unconverged: expected one of {', '.join(map(repr, ON_UNCONVERGED))}"
                        f", got {type(value).__name__}")
    if value not in ON_UNCONVERGED:
        raise ValueError(f"on_unconverged: expected one of "
                         f"{', '.join(map(repr, ON_UNCONVERGED))}, got {value!r}")
    return value


def check_options(tol: float, atol: float, maxiter: int | None, check_every: int
                  ) -> tuple[float, float, int | None, int]:
    """Validate the common solver options; errors name the offending argument."""
    out = []
    for name, value in (("tol", tol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{name}: {value!r:.40} is too large for a float") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite number ≥ 0, got {value!r}")
        out.append(float(value))
    if maxiter is not None:
        if isinstance(maxiter, bool) or not isinstance(maxiter, int):
            raise TypeError(f"maxiter: expected an int or None, got {type(maxiter).__name__}")
        if maxiter < 0:
            raise ValueError(f"maxiter: expected an int ≥ 0, got {maxiter}")
    return out[0], out[1], maxiter, check_check_every(check_every)


def check_check_every(check_every: Any) -> int:
    """Validate ``check_every`` (an int ≥ 1); the error names it."""
    if isinstance(check_every, bool) or not isinstance(check_every, int):
        raise TypeError(f"check_every: expected an int, got {type(check_every).__name__}")
    if check_every < 1:
        raise ValueError(f"check_every: expected an int ≥ 1, got {check_every}")
    return check_every


def check_vector(v: Any, name: str, length: int | None = None) -> Tensor:
    """``v`` as a 1-D floating tensor (of ``length`` if given); errors name ``name``."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name}: expected a 1-D Tensor, got {type(v).__name__}")
    if v.ndim != 1 or (length is not None and v.shape[0] != length):
        want = f"length {length}" if length is not None else "a 1-D tensor"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
    return v.detach()  # the solvers are not differentiable (and write with out=)


def default_maxiter(maxiter: int | None, n: int) -> int:
    """Twice the Krylov space's dimension (+10): rounding slows Krylov methods past n steps."""
    return min(2 * n + 10, MAXITER_CAP) if maxiter is None else maxiter


def trivial_result(x: Tensor, method: str, reason: str = "zero rhs", residual: float = 0.0
                   ) -> SolveResult:
    """Result of a solve that needed no iteration (rhs = 0, or x0 already good enough)."""
    return SolveResult(x=x, iterations=0, residual=residual, converged=True, reason=reason,
                       method=method, history=[])


class Monitor:
    """Stopping state of a Krylov loop, kept on the device and read every ``check_every`` steps.

    Each iteration calls :meth:`record` with ``ok`` (the update was applied; once it is False the
    iterates are frozen for good), the new relative residual and optional flags. The flags live
    in 0-d tensors so the loop never synchronises with the host between checks.
    """

    def __init__(self, res0: Tensor, threshold: float, check_every: int, *,
                 eps_floor: bool = True) -> None:
        dev = res0.device
        self.running = torch.ones((), dtype=torch.bool, device=dev)
        self.code = torch.zeros((), dtype=torch.int64, device=dev)
        self.iters = torch.zeros((), dtype=torch.int64, device=dev)
        self.res = res0
        # eps_floor=False: the test is ``res ≤ threshold`` as given (PCG's, even for tol = 0)
        self.threshold = max(threshold, torch.finfo(res0.dtype).eps) if eps_floor else threshold
        self.check_every = check_every
        self.pending: list[Tensor] = []
        self.history: list[float] = []
        self.iterations = 0
        self.final_code = 0
        self.residual = float(res0)

    def record(self, ok: Tensor, res: Tensor, exhausted: Tensor | None = None,
               also_converged: Tensor | None = None) -> bool:
        """Book one iteration; returns True when the host knows the loop can stop.

        ``exhausted`` ends the loop (after this step if ``ok``, else without it) with reason
        "krylov space exhausted"; ``also_converged`` likewise with reason "converged" (the
        caller refuses the step when the previous iterate is the answer); a refused step
        (``ok`` False) otherwise means "breakdown".
        """
        ok = ok & self.running & torch.isfinite(res)
        self.res = torch.where(ok, res, self.res)
        self.iters = self.iters + ok.to(torch.int64)
        conv = ok & (res <= self.threshold)
        if also_converged is not None:
            conv = conv | (self.running & also_converged)
        exh = torch.zeros_like(ok) if exhausted is None else self.running & ~conv & exhausted
        broke = self.running & ~ok & ~exh
        self.code = torch.where(conv, _CONVERGED, torch.where(
            exh, _EXHAUSTED, torch.where(broke, _BREAKDOWN, self.code)))
        self.running = self.running & ok & ~conv & ~exh
        self.pending.append(res)
        if len(self.pending) >= self.check_every:
            return self.sync()
        return False

    def sync(self) -> bool:
        """Read the device state on the host (one synchronisation); True when stopped."""
        tail = [self.iters.double(), self.code.double(), self.res.double()]
        vals = torch.stack([t.double() for t in self.pending] + tail).tolist()
        self.pending = []
        self.history.extend(vals[:-3])
        self.iterations = int(vals[-3])
        self.final_code = int(vals[-2])
        self.residual = float(vals[-1])
        del self.history[self.iterations:]
        return self.final_code != 0

    def result(self, x: Tensor, method: str) -> SolveResult:
        if self.pending:
            self.sync()
        return SolveResult(x=x, iterations=self.iterations, residual=self.residual,
                           converged=self.final_code == _CONVERGED,
                           reason=_CODE_REASON[self.final_code], method=method,
                           history=self.history)
