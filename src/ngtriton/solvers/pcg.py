"""Preconditioned, truncated conjugate gradients for a damped Fisher (Hessian-free style).

NGD's Krylov solve rarely needs to converge: what matters is how much of the quadratic model
``φ(x) = ½xᵀAx − bᵀx`` each product buys. :func:`pcg` therefore

- takes a diagonal preconditioner (any positive vector ``d``: it solves with ``M = diag(d)``),
- stops when the relative residual reaches ``tol``, after ``maxiter`` iterations, or when φ
  stalls: at iteration ``i`` with ``k = max(min_window, ⌈window_frac·i⌉)``, once
  ``(φᵢ − φᵢ₋ₖ)/φᵢ < k·progress_tol`` (Martens 2010, §4.4),
- returns ``A·x`` alongside ``x`` (it is ``b − r``, free from the recurrence), so a caller can
  evaluate the quadratic model of ``x`` without another product.

From ``x0 = 0`` the iterates satisfy ``xᵀAx = xᵀb`` (Galerkin), with or without a
preconditioner. With a preconditioner, at λ = 0 the solve of a singular system returns the
minimum-``M``-norm solution rather than the Euclidean minimum-norm one; every solution gives the
same function-space step ``J·x``.

Scalars stay on the device and the host reads them every ``check_every`` iterations, as in
:func:`~ngtriton.solvers.cg`: the φ values are kept on the device (0-d tensors, one per
iteration) and the progress test is evaluated there, so the iterate freezes at the iteration
where the host loop would have stopped. On the CPU with ``check_every=1`` (the default) the
scalars are read every iteration instead, which is free there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _vecops as vo
from .result import _CONVERGED, _EXHAUSTED, Monitor, SolveResult, check_check_every, check_vector

Matvec = Callable[[Tensor], Tensor]


@dataclass(repr=False)
class PCGResult(SolveResult):
    """A :class:`SolveResult` plus ``Ax`` (= ``b − r``) and the quadratic's value ``phi`` at
    ``x``; ``reason`` may also be ``"stalled"`` (φ's relative progress fell below the bound)."""

    Ax: Tensor | None = None
    phi: float = 0.0


def pcg(matvec: Matvec, b: Tensor, *, precond: Tensor | None = None, x0: Tensor | None = None,
        tol: float = 1e-6, maxiter: int = 50, progress_tol: float = 5e-4, min_window: int = 10,
        window_frac: float = 0.1, check_every: int = 1) -> PCGResult:
    """Solve ``A x = b`` (``A`` symmetric PSD, as ``matvec``) by CG preconditioned with
    ``diag(precond)`` (``None``: plain CG), stopping as the module docstring says.

    A breakdown (``pᵀAp`` not finite or ≤ 0) freezes the iterate: ``x`` stays finite.
    ``check_every``: as in :func:`~ngtriton.solvers.cg` (an int ≥ 1; > 1 spares CUDA a
    synchronisation per iteration for up to ``check_every − 1`` wasted products after the
    stop; the result is the same to round-off)."""
    b = check_vector(b, "b")
    n = b.numel()
    if precond is not None:
        precond = check_vector(precond, "precond", n)
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter: expected an integer ≥ 1, got {maxiter!r}")
    for name, value in (("tol", tol), ("progress_tol", progress_tol)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{name}: expected a number ≥ 0, got {value!r}")
    check_every = check_check_every(check_every)
    bnorm = float(vo.norm(b))
    if bnorm == 0.0 or not math.isfinite(bnorm):
        x = torch.zeros_like(b)
        return PCGResult(x=x, iterations=0, residual=0.0 if bnorm == 0 else math.nan,
                         converged=bnorm == 0, reason="zero rhs" if bnorm == 0 else "breakdown",
                         method="pcg", Ax=torch.zeros_like(b), phi=0.0)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = check_vector(x0, "x0", n).to(b.dtype).clone()
        r = b - matvec(x)
    z = r / precond if precond is not None else r
    p = z.clone()
    args = (matvec, b, x, r, p, precond, bnorm, tol, maxiter, progress_tol, min_window,
            window_frac)
    if check_every == 1 and vo.host_reads_free(b):
        return _pcg_host(*args)
    return _pcg_device(*args, check_every)


def _stall_window(i: int, min_window: int, window_frac: float) -> int:
    """Martens' window ``k`` at iteration ``i``."""
    return max(min_window, math.ceil(window_frac * i))


def _pcg_host(matvec: Matvec, b: Tensor, x: Tensor, r: Tensor, p: Tensor,
              precond: Tensor | None, bnorm: float, tol: float, maxiter: int,
              progress_tol: float, min_window: int, window_frac: float) -> PCGResult:
    """The loop with its scalars read on the host every iteration (the CPU, check_every=1)."""
    z = r / precond if precond is not None else r
    rz = float(vo.dot(r, z))
    phis = [-0.5 * float(vo.dot(x, b + r))]
    history: list[float] = []
    reason = "maxiter"
    tiny = torch.finfo(b.dtype).tiny
    res = math.sqrt(float(vo.dot(r, r))) / bnorm
    if res <= tol:
        reason, maxiter = "converged", 0
    for i in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = float(vo.dot(p, Ap))
        if not math.isfinite(pAp) or pAp <= tiny:
            reason = "breakdown"
            break
        alpha = rz / pAp
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        rr = float(vo.dot(r, r))
        phi = -0.5 * float(vo.dot(x, b + r))
        if not (math.isfinite(rr) and math.isfinite(phi)):
            x.sub_(p, alpha=alpha)
            r.add_(Ap, alpha=alpha)
            reason = "breakdown"
            break
        phis.append(phi)
        res = math.sqrt(rr) / bnorm
        history.append(res)
        if res <= tol:
            reason = "converged"
            break
        k = _stall_window(i, min_window, window_frac)
        if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * progress_tol:
            reason = "stalled"
            break
        z = r / precond if precond is not None else r
        rz_new = float(vo.dot(r, z))
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return PCGResult(x=x, iterations=len(history), residual=res,
                     converged=reason in ("converged", "stalled"), reason=reason, method="pcg",
                     history=history, Ax=b - r, phi=phis[-1])


def _pcg_device(matvec: Matvec, b: Tensor, x: Tensor, r: Tensor, p: Tensor,
                precond: Tensor | None, bnorm: float, tol: float, maxiter: int,
                progress_tol: float, min_window: int, window_frac: float, check_every: int
                ) -> PCGResult:
    """The host loop's iteration with every scalar a 0-d device tensor, read every
    ``check_every`` iterations (:class:`Monitor`). The stopping tests run in float64 on the
    very values the host loop reads (its Python floats), so both stop at the same iteration.
    A step whose ``r·r`` or φ is not finite is taken back as the host loop does (``x − αp``,
    ``r + αAp``, masked so that no host read decides it); every later iteration is frozen
    (α = 0, the product masked out). Stall: the Monitor's "exhausted" code."""
    f64, acc = torch.float64, vo.acc_dtype(b.dtype)
    z = r / precond if precond is not None else r
    rz = vo.dot(r, z).to(f64)
    phi = -0.5 * vo.dot(x, b + r).to(f64)
    mon = Monitor(vo.dot(r, r).to(f64).sqrt() / bnorm, tol, check_every, eps_floor=False)
    if mon.residual <= tol:
        return PCGResult(x=x, iterations=0, residual=mon.residual, converged=True,
                         reason="converged", method="pcg", history=[], Ax=b - r,
                         phi=float(phi))
    tiny = torch.finfo(b.dtype).tiny
    phis = [phi]  # φ after each iteration, on the device; phis[i − k] for the progress test
    poisoned = torch.zeros((), dtype=torch.bool, device=b.device)  # β not finite: stop next
    for i in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = vo.dot(p, Ap).to(f64)
        ok = mon.running & ~poisoned & torch.isfinite(pAp) & (pAp > tiny)
        alpha = torch.where(ok, rz / torch.where(ok, pAp, 1), 0)
        Ap = torch.where(ok, Ap, 0)  # a non-finite product must not leak into the iterates
        rr = vo.cg_update(x, r, p, Ap, alpha.to(acc)).to(f64)
        phi_new = -0.5 * vo.dot(x, b + r).to(f64)
        fin = torch.isfinite(rr) & torch.isfinite(phi_new)
        back = torch.where(ok & ~fin, alpha, 0)  # 0 unless this step must be taken back
        vo.axpy(x, p, -back)
        vo.axpy(r, Ap, back)
        ok = ok & fin
        phi = torch.where(ok, phi_new, phi)
        phis.append(phi)
        res = rr.sqrt() / bnorm
        go = ok & ~(res <= tol)
        k = _stall_window(i, min_window, window_frac)
        stall = None
        if i > k:
            stall = go & (phi < 0) & ((phi - phis[i - k]) / phi < k * progress_tol)
            go = go & ~stall
        z = r / precond if precond is not None else r
        rz_new = vo.dot(r, z).to(f64)
        beta = torch.where(go & (rz > 0), rz_new / torch.where(rz > 0, rz, 1), 0)
        poisoned = poisoned | (go & ~torch.isfinite(beta))
        vo.scale_add(p, z, torch.where(torch.isfinite(beta), beta, 0).to(acc))
        rz = torch.where(go, rz_new, rz)
        if mon.record(ok, res, stall):
            break
    if mon.pending:
        mon.sync()
    reason = {_CONVERGED: "converged", _EXHAUSTED: "stalled"}.get(
        mon.final_code, "maxiter" if mon.final_code == 0 else "breakdown")
    return PCGResult(x=x, iterations=mon.iterations, residual=mon.residual,
                     converged=reason in ("converged", "stalled"), reason=reason, method="pcg",
                     history=mon.history, Ax=b - r, phi=float(phi))
