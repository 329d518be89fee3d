"""``solve``: the natural-gradient solve ``(F + λI) x = rhs`` on a Fisher operator, any method."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._frames import user_stacklevel
from ._vecops import norm
from .cg import cg
from .dual import DENSE_FACTOR_MAX_ELEMENTS, dual_direct, dual_krylov
from .lsmr import lsmr
from .minres import minres
from .result import (
    ConvergenceError,
    ConvergenceWarning,
    SolveResult,
    check_on_unconverged,
    check_options,
    default_maxiter,
)
from .workspace import Workspace

DUAL_DIRECT_MAX_ROWS = 512
METHODS = ("auto", "cg", "minres", "lsmr", "lsqr", "dual", "dual-direct", "dual-krylov")


def _flat_rhs(op: Any, rhs: Any, name: str = "rhs") -> tuple[Tensor, bool]:
    """``rhs`` as a flat vector of length P (detached); True when it came as a list of tensors.
    Errors name ``name``."""
    P = int(op.num_params)
    if isinstance(rhs, Tensor):
        if rhs.ndim != 1 or rhs.shape[0] != P:
            raise ValueError(f"{name}: expected a flat vector of length {P} or a list of "
                             f"parameter-shaped tensors, got shape {tuple(rhs.shape)}")
        return rhs.detach().to(dtype=op.dtype, device=op.device), False
    if isinstance(rhs, Sequence) and not isinstance(rhs, str):
        try:
            flat = op.flatten([t.detach() if isinstance(t, Tensor) else t for t in rhs])
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"{name}: does not match the parameters' shapes ({err})"
                             ) from None
        if flat.shape != (P,):
            raise ValueError(f"{name}: expected {P} values in all, got {flat.numel()}")
        return flat.to(dtype=op.dtype, device=op.device), True
    what = "None, a flat Tensor" if name == "rhs" else "a flat Tensor"
    raise TypeError(f"{name}: expected {what} or a list of Tensors, got {type(rhs).__name__}")


def _power_of_two_scale(g: Tensor, gnorm: float) -> float:
    """1, or the power of two near ``max|g|`` when ``g``'s size (``gnorm = ‖g‖``, as the
    solvers' accumulators compute it: 0 or Inf when squares underflow or overflow) is extreme.
    Dividing by a power of two is exact, so a scaled solve returns the unscaled one's iterates
    bit for bit."""
    wide = torch.finfo(torch.float64 if g.dtype == torch.float64 else torch.float32)
    limit = math.frexp(wide.max)[1] // 3  # squares of n ≤ 2^limit values stay finite
    if g.dtype in (torch.float16, torch.bfloat16):  # the operator itself is narrow
        limit = 2
    if 0.0 < gnorm < math.inf and abs(math.frexp(gnorm)[1]) <= limit:
        return 1.0  # the usual case: no extra pass
    lo, hi = torch.aminmax(g)
    amax = max(-float(lo), float(hi))
    if amax == 0.0 or not math.isfinite(amax):
        return 1.0
    exponent = math.frexp(amax)[1]
    return 1.0 if abs(exponent) <= limit else math.ldexp(1.0, exponent)


# What one column of a batched (vmapped) product costs against one product alone. Measured on a
# 2-core CPU (torch 2.13), ResNet-style convnets at batch 4: 0.2–0.45 for the VJP columns of
# Aᵀ, 0.2–0.75 for the JVP columns of A; the upper end keeps the dual's estimate on the safe
# side (the Krylov estimate, its cap, errs the other way).
BATCHED_COLUMN_COST = 0.75


def dual_cost(num_rows: int, num_params: int) -> float:
    """Products (a JVP or a VJP each) of the exact dual solve: R batched columns of ``Aᵀ``
    (:data:`BATCHED_COLUMN_COST` each), R of ``A`` too when the dense ``Aᵀ`` exceeds
    ``DENSE_FACTOR_MAX_ELEMENTS``, then the residual check (and, there, the products with the
    right-hand side)."""
    if num_rows * num_params <= DENSE_FACTOR_MAX_ELEMENTS:
        return BATCHED_COLUMN_COST * num_rows + 2
    return BATCHED_COLUMN_COST * 2 * num_rows + 5


def krylov_cost(num_rows: int, num_params: int, maxiter: int | None,
                products_per_iteration: int = 2) -> float:
    """Products of a Krylov solve at most: ``products_per_iteration`` × its iterations, which
    ``maxiter`` caps and which exceed the Krylov space's dimension ``min(R, P)`` only through
    rounding (counted as ``2·min(R, P) + 10``, the default cap's rule)."""
    space = min(num_rows, num_params)
    return products_per_iteration * min(default_maxiter(maxiter, num_params), 2 * space + 10)


def choose_method(op: Any, *, maxiter: int | None = None, factor_rhs: bool = True,
                  rhs_in_range: bool = True, warm_start: bool = False) -> str:
    """The method ``solve(op, method="auto")`` runs: the cheaper of the exact dual solve and a
    Krylov solve capped at ``maxiter``, counted in products (:func:`dual_cost`,
    :func:`krylov_cost`).

    The dual solve needs R ≤ ``DUAL_DIRECT_MAX_ROWS`` (and, at λ = 0, a dtype wider than 16
    bits: its pseudo-inverse drops eigenvalues below A's rounding noise, most of them in half
    precision). It always meets its tolerance; a Krylov solve may not within ``maxiter``, so the
    dual wins ties. The Krylov method is LSMR on ``A`` when the factor right-hand side ``b``
    exists (``factor_rhs``), MINRES on ``F + λI`` when λ > 0 or ``rhs_in_range``, else LSMR on
    ``F`` itself (two products per iteration; it gives ``F⁺ rhs`` for an rhs outside range(F)).
    ``warm_start``: CG, the only method that takes ``x0`` besides MINRES.

    A caller with its own Krylov method (NGD's truncated CG) uses the answer only to decide
    between ``"dual-direct"`` and its own.
    """
    if warm_start:
        return "cg"
    R, P, lam = int(op.num_rows), int(op.num_params), float(op.damping)
    narrow = op.dtype in (torch.float16, torch.bfloat16)
    if factor_rhs:
        krylov, per_iteration = "lsmr", 2
    elif lam > 0 or rhs_in_range:
        krylov, per_iteration = "minres", 2
    else:
        krylov, per_iteration = "lsmr", 4
    if R <= DUAL_DIRECT_MAX_ROWS and not (narrow and lam == 0) and (
            dual_cost(R, P) <= krylov_cost(R, P, maxiter, per_iteration)):
        return "dual-direct"
    return krylov


def _pick(method: str, op: Any, have_b: bool, have_x0: bool, maxiter: int | None) -> str:
    if method == "auto":
        return choose_method(op, maxiter=maxiter, factor_rhs=have_b, rhs_in_range=have_b,
                             warm_start=have_x0)
    if method == "lsqr":
        return "lsmr"
    R, P, lam = int(op.num_rows), int(op.num_params), float(op.damping)
    if method == "dual":
        if R <= DUAL_DIRECT_MAX_ROWS:
            return "dual-direct"
        # At λ = 0 with R > P the sample-space system is singular and, in general, inconsistent:
        # LSMR on the factor searches the same Krylov space and stays stable there.
        return "dual-krylov" if lam > 0 or R <= P else "lsmr"
    return method


def solve(op: Any, rhs: Tensor | Sequence[Tensor] | None = None, method: str = "auto", *,
          tol: float = 1e-6, atol: float = 0.0, maxiter: int | None = None,
          x0: Tensor | Sequence[Tensor] | None = None, check_every: int = 1,
          workspace: Workspace | None = None, on_unconverged: str = "warn") -> SolveResult:
    """Solve ``(F + λI) x = rhs`` for a Fisher operator ``op`` (λ = ``op.damping``).

    At λ = 0 the answer is the minimum-norm solution ``F⁺ rhs`` (from ``x0 = 0``). LSMR and
    the dual solves return it for any rhs. CG and MINRES return it when rhs ∈ range(F): the
    gradient (``rhs=None``, or ``g = Jᵀr`` of the exact or empirical Fisher, whose residuals
    ``r`` lie in the range of ``F_R``), or any ``F w``. For an rhs outside range(F) (an
    arbitrary vector; the gradient against the Monte-Carlo Fisher) the system is inconsistent:
    CG and MINRES then do not converge, and say so (``on_unconverged``); ``"auto"`` never runs
    them there.

    Args:
        op: a :class:`~ngtriton.fisher.FisherOperator` (or anything with its protocol).
        rhs: None for the gradient ``g`` (then ``b = op.gradient_factor()``, ``Aᵀb = g``, lets
            LSMR and the dual work on the factor ``A``); a flat tensor of length P; or a list of
            parameter-shaped tensors, in which case ``result.x`` is a list too.
        method:
            ``"cg"``, ``"minres"``: Krylov on ``F + λI``.
            ``"lsmr"``: LSMR on ``A`` with ``damp = √λ`` when ``rhs`` is None and ``b`` exists
            (accuracy ~κ(A)·u instead of κ(A)²·u); otherwise LSMR on ``M = F + λI`` itself,
            which gives the minimum-norm least-squares ``M⁺ rhs`` even for an rhs outside
            range(F); its ``residual`` is then ``‖M(rhs − Mx)‖/‖M rhs‖``. ``"lsqr"`` is an
            alias of ``"lsmr"``.
            ``"dual-direct"``: eigh of ``AAᵀ`` (R × R), exact; ``"dual-krylov"``: MINRES on
            ``AAᵀ + λI`` (needs ``b``; at λ = 0 also R ≤ P, and LSMR on ``A`` runs, the same
            Krylov space, see :func:`~ngtriton.solvers.dual_krylov`); ``"dual"``: direct when
            R ≤ ``DUAL_DIRECT_MAX_ROWS``, else Krylov (LSMR at λ = 0 when R > P).
            ``"auto"``: :func:`choose_method`: ``"cg"`` when ``x0`` is given; else the exact
            dual solve when R ≤ ``DUAL_DIRECT_MAX_ROWS`` and it costs no more products than
            the Krylov solve capped at ``maxiter`` (with the default cap it does unless
            R > 5P, where the Krylov space is small); else LSMR (``b`` exists, or λ = 0) or
            MINRES.
        tol, atol: stop when the relative residual ≤ ``max(tol, atol/‖rhs‖)``.
        maxiter: iteration cap (default: twice the system's dimension + 10, at most 10 000).
        x0: warm start (flat or list), for ``"cg"``/``"minres"`` only. At λ = 0 it gives up the
            minimum-norm property (a warning says so).
        check_every: read the stopping test on the host every ``check_every`` iterations (on
            CUDA, > 1 avoids a synchronisation per iteration).
        workspace: a :class:`~ngtriton.solvers.workspace.Workspace` whose buffers CG reuses
            for its vectors (worth it on the CPU, for repeated solves); ``result.x`` then lives
            in it and is overwritten by the next solve given the same workspace.
        on_unconverged: what to do when the solve ends without meeting its tolerance
            (``result.converged`` False: the iteration cap, a breakdown, an inconsistent
            system): ``"warn"`` (a :class:`ConvergenceWarning` that names the method, the
            iterations, the residual against the tolerance and the remedies), ``"raise"``
            (:class:`ConvergenceError`, with the result as ``.result``) or ``"ignore"`` (for a
            deliberately truncated solve). A Krylov space exhausted with the residual within
            ``max(tol, √eps)`` counts as converged here.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, "
                         f"got {method!r}")
    tol, atol, maxiter, check_every = check_options(tol, atol, maxiter, check_every)
    on_unconverged = check_on_unconverged(on_unconverged)
    workspace = Workspace.check(workspace)
    missing = [a for a in ("damping", "num_params", "num_rows", "damped_matvec")
               if not hasattr(op, a)]
    if missing:
        raise TypeError(f"op: expected a FisherOperator (or an object with its interface), got "
                        f"{type(op).__name__} without {missing}")
    lam = float(op.damping)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"op: damping must be finite and ≥ 0, got {lam}")
    P, R = int(op.num_params), int(op.num_rows)
    if rhs is None:
        g, b, as_list = op.gradient(), op.gradient_factor(), False
    else:
        (g, as_list), b = _flat_rhs(op, rhs), None
    # One pass: a finite ‖g‖ means a finite g; the exact test only when it is not (NaN, Inf,
    # or huge finite values whose squares overflow).
    gnorm = float(norm(g))
    if not math.isfinite(gnorm) and not bool(torch.isfinite(g).all()):
        what = "the gradient" if rhs is None else "rhs"
        raise ValueError(f"rhs: {what} contains NaN or Inf (check the inputs and the loss)")
    chosen = _pick(method, op, b is not None, x0 is not None, maxiter)
    x0_flat = None
    if x0 is not None:
        if chosen not in ("cg", "minres"):
            raise ValueError(f"x0: not supported by method {chosen!r} (use 'cg' or 'minres')")
        x0_flat = _flat_rhs(op, x0, "x0")[0]
        if not bool(torch.isfinite(x0_flat).all()):
            raise ValueError("x0: contains NaN or Inf")
        if lam == 0:
            warnings.warn("x0: a warm start at damping 0 gives up the minimum-norm solution "
                          "F⁺rhs (null-space components of x0 are kept)", stacklevel=2)
    rel_atol = atol / gnorm if gnorm > 0 else 0.0
    scale = _power_of_two_scale(g, gnorm)
    if scale != 1.0:  # solve for rhs/scale (b/scale, x0/scale), then scale x back
        g, atol = g / scale, atol / scale
        b = None if b is None else b / scale
        x0_flat = None if x0_flat is None else x0_flat / scale
    kw: dict[str, Any] = dict(tol=tol, atol=atol, maxiter=maxiter, check_every=check_every)
    if chosen == "cg":
        result = cg(op.damped_matvec, g, x0=x0_flat, workspace=workspace, **kw)
    elif chosen == "minres":
        result = minres(op.damped_matvec, g, x0=x0_flat, **kw)
    elif chosen == "lsmr":
        if b is not None:
            result = lsmr(op.factor_matvec, op.factor_rmatvec, b, damp=math.sqrt(lam), **kw)
        else:
            result = lsmr(op.damped_matvec, op.damped_matvec, g, **kw)
    elif chosen == "dual-direct":
        result = dual_direct(op, g, b, tol=tol)
    else:  # dual-krylov
        if b is None:
            raise ValueError(f"method: {method!r} (dual Krylov) needs the gradient factor b, "
                             "i.e. rhs=None and op.gradient_factor() not None; use 'minres' "
                             "or 'dual-direct'")
        if lam == 0 and R > P:
            raise ValueError(f"method: 'dual-krylov' at damping 0 needs R ≤ P (here R = {R} "
                             f"rows > P = {P}): the sample-space system is then singular and "
                             "inconsistent; use 'lsmr' or 'dual-direct'")
        result = dual_krylov(op, b, rhs=g, **kw)
    if scale != 1.0:
        result.x = result.x.mul_(scale)
    if on_unconverged != "ignore" and not _acceptable(result, tol, op.dtype):
        message = _unconverged_message(result, op, method, tol, rel_atol, maxiter,
                                       explicit_rhs=b is None)
        if on_unconverged == "raise":
            raise ConvergenceError(message, result)
        warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())
    if as_list:
        result.x = op.unflatten(result.x)
    return result


def _acceptable(result: SolveResult, tol: float, dtype: torch.dtype) -> bool:
    """Converged, or the Krylov space exhausted (the iterate is then the Krylov space's best)
    with the residual within ``max(tol, √eps)``."""
    if result.converged:
        return True
    good = max(tol, torch.finfo(dtype).eps ** 0.5)
    return result.reason == "krylov space exhausted" and result.residual <= good


def _unconverged_message(result: SolveResult, op: Any, method: str, tol: float, rtol_abs: float,
                         maxiter: int | None, explicit_rhs: bool) -> str:
    """What happened and what to do, for an unconverged solve."""
    R, P, lam = int(op.num_rows), int(op.num_params), float(op.damping)
    ran = result.method if method == result.method else f"{result.method} (method={method!r})"
    threshold = max(tol, rtol_abs)
    what = {"maxiter": "hit its iteration cap",
            "breakdown": "broke down (a non-finite or non-positive curvature, or a step that "
                         f"does not fit {op.dtype})",
            "krylov space exhausted": "exhausted its Krylov space",
            "converged": "met its recurrence's stopping test (not the explicit residual's)",
            }.get(result.reason, result.reason)
    if result.method == "dual-direct":
        head = (f"solve: {ran}, the exact solve, left a relative residual {result.residual:.2e}"
                f" > tol {threshold:.1e}: the Fisher is too ill-conditioned for {op.dtype}.")
    else:
        head = (f"solve: {ran} {what} after {result.iterations} iterations with relative "
                f"residual {result.residual:.2e} > tol {threshold:.1e}; its x is not the "
                "solution.")
    fixes = []
    if result.reason == "maxiter":
        cap = default_maxiter(maxiter, P)
        fixes.append(f"raise maxiter (it was {cap})")
    fixes.append("add damping" if lam == 0 else f"raise the damping (it is {lam:.1e})")
    if result.method != "dual-direct" and R <= DUAL_DIRECT_MAX_ROWS:
        fixes.append(f"use method='dual' (exact for R = {R} rows)")
    if result.method == "dual-direct":
        fixes.append("use float64")
    note = ""
    if lam == 0 and explicit_rhs and result.method in ("cg", "minres"):
        note = (" At damping 0, CG and MINRES do not converge when rhs lies outside range(F) "
                "(an arbitrary rhs, or the gradient against the Monte-Carlo Fisher), and do not "
                "return F⁺rhs: use method='lsmr' or 'dual' there.")
    return (f"{head} To fix it: {', '.join(fixes)}.{note} on_unconverged='ignore' silences this "
            "for a deliberately truncated solve; 'raise' raises ConvergenceError.")


__all__ = ["BATCHED_COLUMN_COST", "DUAL_DIRECT_MAX_ROWS", "METHODS", "choose_method", "dual_cost",
           "krylov_cost", "solve"]

