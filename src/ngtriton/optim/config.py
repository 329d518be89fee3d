"""NGD's defaults and the checks of its arguments (every error names the argument)."""

from __future__ import annotations

import math
from typing import Any

from ..solvers import METHODS

# Defaults tuned on the digits MLP 64-128-128-10 (tanh, batch 256, 2-core CPU), see
# benchmarks/bench_optim.py: a handful of CG iterations on a moderately damped Fisher is the
# cheapest way to a low loss; the LM rule then moves the damping where the batch needs it.
DEFAULT_DAMPING = 1e-1
DEFAULT_DAMPING_FLOOR = 1e-4
DEFAULT_DAMPING_CEILING = 1e4
DEFAULT_TOL = 1e-3
DEFAULT_MAXITER = 20
# Methods NGD can run: its right-hand side is the closure's gradient, so there is no factor b
# with Aᵀb = g and the dual Krylov solve (which needs one) is out; "dual" is the exact one;
# "pcg" is the preconditioned, truncated CG of ngtriton.solvers.pcg.
NGD_METHODS = (*(m for m in METHODS if m != "dual-krylov"), "pcg")
WARM_START_METHODS = ("auto", "cg", "minres", "pcg")
NONFINITE_MODES = ("skip", "raise")
MOMENTUM_MODES = ("auto",)


def positive(name: str, value: Any, *, allow_zero: bool = False, upper: float | None = None
             ) -> float:
    """``value`` as a finite float > 0 (≥ 0 with ``allow_zero``; ≤ ``upper`` if given)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name}: {value!r} is too large for a float") from None
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if upper is not None:
        ok = ok and value <= upper
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        extra = f" and ≤ {upper:g}" if upper is not None else ""
        raise ValueError(f"{name}: expected a finite number {bound}{extra}, got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    """A real boolean (``"False"`` is a string, not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} "
                        f"{value!r}")
    return value


def count(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer ≥ ``minimum`` (or None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer ≥ {minimum}"
                        f"{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer ≥ {minimum}, got {value!r}")
    return value


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


def momentum_arg(value: Any) -> str | float:
    """``"auto"`` (from the quadratic model), or a fixed coefficient in [0, 1); None means 0."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        return choice("momentum", value, MOMENTUM_MODES)
    return positive("momentum", value, allow_zero=True, upper=1.0 - 1e-12)
