"""``solve``: the natural-gradient solve ``(F + λI) x = rhs`` on a Fisher operator, any method."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._vecops import norm
from .cg import cg
from .dual import dual_direct, dual_krylov
from .lsmr import lsmr
from .minres import minres
from .result import SolveResult, check_options
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


def _pick(method: str, R: int, P: int, have_b: bool, lam: float, have_x0: bool,
          narrow: bool = False) -> str:
    if method == "auto":
        if have_x0:
            return "cg"
        # At λ = 0 the pseudo-inverse drops eigenvalues below the rounding noise of A, which in
        # half precision is most of them: LSMR then keeps to the operator's accuracy.
        if R <= DUAL_DIRECT_MAX_ROWS and R <= P and not (narrow and lam == 0):
            return "dual-direct"
        return "lsmr" if have_b or lam == 0 else "minres"
    if method == "lsqr":
        return "lsmr"
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
          workspace: Workspace | None = None) -> SolveResult:
    """Solve ``(F + λI) x = rhs`` for a Fisher operator ``op`` (λ = ``op.damping``).

    At λ = 0 every method returns the minimum-norm solution ``F⁺ rhs`` (from ``x0 = 0``).

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
            ``"dual-direct"``: eigh of ``AAᵀ`` (R × R); ``"dual-krylov"``: MINRES on
            ``AAᵀ + λI`` (needs ``b``; at λ = 0 also R ≤ P, and LSMR on ``A`` runs, the same
            Krylov space, see :func:`~ngtriton.solvers.dual_krylov`); ``"dual"``: direct when
            R ≤ ``DUAL_DIRECT_MAX_ROWS``, else Krylov (LSMR at λ = 0 when R > P).
            ``"auto"``: ``"cg"`` when ``x0`` is given; else dual-direct when R ≤ 512 and R ≤ P;
            else ``"lsmr"`` when ``b`` exists or λ = 0, else ``"minres"``.
        tol, atol: stop when the relative residual ≤ ``max(tol, atol/‖rhs‖)``.
        maxiter: iteration cap (default: twice the system's dimension + 10, at most 10 000).
        x0: warm start (flat or list), for ``"cg"``/``"minres"`` only. At λ = 0 it gives up the
            minimum-norm property (a warning says so).
        check_every: read the stopping test on the host every ``check_every`` iterations (on
            CUDA, > 1 avoids a synchronisation per iteration).
        workspace: a :class:`~ngtriton.solvers.workspace.Workspace` whose buffers CG reuses
            for its vectors (worth it on the CPU, for repeated solves); ``result.x`` then lives
            in it and is overwritten by the next solve given the same workspace.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, "
                         f"got {method!r}")
    tol, atol, maxiter, check_every = check_options(tol, atol, maxiter, check_every)
    workspace = Workspace.check(workspace)
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
    chosen = _pick(method, R, P, b is not None, lam, x0 is not None,
                   op.dtype in (torch.float16, torch.bfloat16))
    x0_flat = None
    if x0 is not None:
        if chosen not in ("cg", "minres"):
            raise ValueError(f"x0: not supported by method {chosen!r} (use 'cg' or 'minres')")
        x0_flat = _flat_rhs(op, x0, "x0")[0]
        if lam == 0:
            warnings.warn("x0: a warm start at damping 0 gives up the minimum-norm solution "
                          "F⁺rhs (null-space components of x0 are kept)", stacklevel=2)
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
    if as_list:
        result.x = op.unflatten(result.x)
    return result


__all__ = ["DUAL_DIRECT_MAX_ROWS", "METHODS", "solve"]

