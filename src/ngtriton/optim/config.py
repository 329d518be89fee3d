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
# check_every=None: the Krylov loops read their stopping test on the host every iteration on
# the CPU (free there, and CG's and PCG's host loops spare the ~55 and ~105 0-d tensor ops per
# iteration of the device-side loops, see benchmarks/bench_launches.py) and every
# CUDA_CHECK_EVERY iterations on a GPU, where each read is a synchronisation that drains the
# launch queue (a GPU runs the device-side loops whatever check_every is). 4 cuts a
# 20-iteration solve (DEFAULT_MAXITER, a multiple of 4) from 20 reads to 5 while an early stop
# (tol met, φ stalled, breakdown) wastes at most 3 frozen products, 1.5 on average; a solve
# that runs to maxiter wastes none.
CUDA_CHECK_EVERY = 4
# Methods NGD can run: its right-hand side is the closure's gradient, so there is no factor b
# with Aᵀb = g and the dual Krylov solve (which needs one) is out; "dual" is the exact one;
# "pcg" is the preconditioned, truncated CG of ngtriton.solvers.pcg.
NGD_METHODS = (*(m for m in METHODS if m != "dual-krylov"), "pcg")
WARM_START_METHODS = ("auto", "cg", "minres", "pcg")
NONFINITE_MODES = ("skip", "raise")
MOMENTUM_MODES = ("auto",)
# The largest integer argument: counts and sizes go into int64 tensors and C loops.
MAX_INT = 2**63 - 1


def _short(value: Any) -> str:
    """``repr(value)``, shortened for huge integers (10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} digits)"


def positive(name: str, value: Any, *, allow_zero: bool = False, upper: float | None = None
             ) -> float:
    """``value`` as a finite float > 0 (≥ 0 with ``allow_zero``; ≤ ``upper`` if given)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name}: {_short(value)} is too large for a float") from None
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if upper is not None:
        ok = ok and value <= upper
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        extra = ""
        if upper is not None:  # an upper bound just below 1 reads "< 1", not "≤ 1"
            extra = f" and {'<' if float(f'{upper:g}') > upper else '≤'} {upper:g}"
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
        raise ValueError(f"{name}: expected an integer ≥ {minimum}, got {_short(value)}")
    if value > MAX_INT:
        raise ValueError(f"{name}: {_short(value)} is too large (at most 2**63 - 1)")
    return value


def group_value(index: int, group: dict[str, Any], key: str) -> float:
    """``param_groups[index][key]`` (``"lr"`` or ``"weight_decay"``, which a scheduler or the
    user may set between steps) as a finite float ≥ 0; the ValueError names ``key``, also for a
    missing key, a string, None, a bool or an integer too large for a float."""
    where = f"{key}: param_groups[{index}][{key!r}]"
    if key not in group:
        raise ValueError(f"{where} is missing")
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a finite number ≥ 0 (set by a scheduler?), got "
                         f"{type(value).__name__} {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{where} is too large for a float ({_short(value)})") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where} must be a finite number ≥ 0 (set by a scheduler?), got "
                         f"{value!r}")
    return number


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


# The fastest setting measured on the character-level GPT of benchmarks/time_to_target (2-core
# CPU): two or three preconditioned CG iterations on an eighth of the batch, step size and
# momentum from the quadratic model. On the small MLPs there, the defaults do as well or
# better. ``NGD(model, **LARGE_MODEL_SETTINGS)``.
LARGE_MODEL_SETTINGS: dict[str, object] = {
    "preconditioner": "adam", "momentum": "auto", "maxiter": 3, "curvature_fraction": 0.125}


def resolve_check_every(check_every: int | None, device: Any) -> int:
    """NGD's ``check_every``: as given, or for None 1 off CUDA and :data:`CUDA_CHECK_EVERY` on
    it."""
    if check_every is not None:
        return check_every
    return CUDA_CHECK_EVERY if getattr(device, "type", device) == "cuda" else 1
