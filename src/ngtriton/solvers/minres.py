"""MINRES (Paige & Saunders) for symmetric, possibly indefinite or singular, systems."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _vecops as vo
from .result import (
    Monitor,
    SolveResult,
    check_options,
    check_vector,
    default_maxiter,
    trivial_result,
)

Matvec = Callable[[Tensor], Tensor]


def minres(matvec: Matvec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-6,
           atol: float = 0.0, maxiter: int | None = None, check_every: int = 1,
           lstsq: bool = False) -> SolveResult:
    """Solve ``M x = b`` for symmetric ``M`` by MINRES (Lanczos + Givens QR).

    From ``x0 = 0`` on a consistent singular system the iterates stay in range(M) and MINRES
    returns ``M⁺ b``. ``history`` holds ``‖b − Mx‖/‖b‖`` from the recurrence; the final
    ``residual`` is computed explicitly (one more product), since the recurrence drifts from it
    in low precision and on inconsistent systems, and ``converged`` needs both to be below the
    threshold (the explicit one within a factor 2, or within the ``10·eps·‖M‖‖x‖/‖b‖`` that a
    residual computed in this precision can reach). Stops
    when it is ``≤ max(tol, atol/‖b‖)``; when the next Lanczos coefficient vanishes
    (``β ≤ 10·eps·‖T‖``, or a pivot ``γ`` that small: the Krylov space is exhausted, the
    iterate is then the least-squares solution in it); on non-finite scalars (breakdown, iterate
    frozen, never NaN); or after ``maxiter`` iterations (default ``min(2n + 10, 10_000)``).

    ``lstsq=True`` also stops, as converged, when ``‖M r‖ ≤ tol·‖M‖·‖r‖`` (a least-squares
    solution of an inconsistent system has been reached; ``residual`` then stays large).
    ``check_every``: as in :func:`~ngtriton.solvers.cg`.

    Per iteration, besides the product, the vector work is three passes on CUDA (fused kernels
    through ``_vecops``: the Lanczos recurrence with ``α``, its second half with ``‖·‖``, then
    the direction, solution and next Lanczos vector), with every scalar on the device.
    """
    b = check_vector(b, "b")
    tol, atol, maxiter, check_every = check_options(tol, atol, maxiter, check_every)
    maxiter = default_maxiter(maxiter, b.numel())
    bnorm = float(vo.norm(b))
    if bnorm == 0.0:
        return trivial_result(torch.zeros_like(b), "minres")
    if x0 is None:
        x = torch.zeros_like(b)
        r1 = b.clone()
    else:
        x = check_vector(x0, "x0", b.numel()).to(b.dtype).clone()
        r1 = b - matvec(x)
    beta = vo.norm(r1)
    mon = Monitor(beta / bnorm, max(tol, atol / bnorm), check_every)
    if mon.residual <= mon.threshold:
        return trivial_result(x, "minres", "converged", mon.residual)

    sdt = beta.dtype
    eps, tiny = torch.finfo(sdt).eps, torch.finfo(sdt).tiny

    def zero() -> Tensor:
        return torch.zeros((), dtype=sdt, device=b.device)

    def inverse(t: Tensor) -> Tensor:  # 1/t, 0 where t = 0
        return torch.where(t > 0, 1 / torch.where(t > 0, t, 1), 0)

    oldb, dbar, epsln, tnorm2, sn = zero(), zero(), zero(), zero(), zero()
    first = True  # β₁ = ‖r₀‖ is not an entry of the Lanczos matrix T: keep it out of ‖T‖
    cs = -torch.ones((), dtype=sdt, device=b.device)
    phibar = beta.clone()
    # Lanczos vectors: r1, r2 the last two (unnormalised), v = r2/β the current one; y is
    # written into the spare buffer, then the three rotate. r1 = r2 = the residual at the start.
    r2, spare = r1, torch.empty_like(b)
    v = r1 * inverse(beta).to(b.dtype)
    w1, w2 = torch.zeros_like(b), torch.zeros_like(b)  # w_{k-2}, w_{k-1}
    for _ in range(maxiter):
        y = spare
        ratio = torch.where(oldb > 0, beta / torch.where(oldb > 0, oldb, 1), 0)
        alfa = vo.lanczos_project(y, matvec(v), r1, v, ratio)  # y = Av − (β/β₋₁) r1, α = v·y
        fin = torch.isfinite(alfa)
        alfa = torch.where(fin, alfa, 0)
        coef = torch.where(beta > 0, alfa / torch.where(beta > 0, beta, 1), 0)
        # y −= (α/β) r2 and ‖y‖; a non-finite product must not leak into the iterates
        ynorm = vo.lanczos_orthogonalize(y, r2, coef, fin)
        spare = r1 if r1 is not r2 else torch.empty_like(b)
        r1, r2 = r2, y
        oldb, beta = beta, ynorm
        fin = fin & torch.isfinite(beta)
        beta = torch.where(fin, beta, 0)
        tnorm2 = tnorm2 + alfa * alfa + beta * beta + (0 if first else oldb * oldb)
        first = False
        # apply the previous rotation, then build the next one
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        arnorm = phibar * torch.hypot(gbar, dbar)
        gamma = torch.hypot(gbar, beta)
        anorm = tnorm2.sqrt()
        # gamma ≈ 0: T_k is singular and the Krylov space exhausted (b ∉ range(M)); the
        # previous iterate is the least-squares solution in it, so stop without this step
        singular = gamma <= 10 * eps * anorm
        # lstsq: ‖M r‖ small relative to ‖M‖‖r‖ for the previous iterate, which is kept
        ls = fin & (arnorm <= mon.threshold * anorm * phibar) if lstsq else None
        ok = mon.running & fin & (gamma > tiny) & ~singular
        if ls is not None:
            ok = ok & ~ls
        gamma_s = torch.where(ok, gamma, 1)
        cs = torch.where(ok, gbar / gamma_s, cs)
        sn = torch.where(ok, beta / gamma_s, sn)
        phi = torch.where(ok, cs * phibar, 0)
        denom = torch.where(ok, 1 / gamma_s, 0)
        # x += φ w with w the new direction (into w1's buffer); v = y/β for the next step
        w = vo.minres_update(x, v, w1, w2, y, oldeps, delta, denom, phi, inverse(beta))
        w1, w2 = w2, w
        phibar = torch.where(ok, sn * phibar, phibar)
        exhausted = fin & (singular | (beta <= 10 * eps * anorm))
        if mon.record(ok, phibar / bnorm, exhausted, ls):
            break
    result = mon.result(x, "minres")
    if result.iterations and not lstsq:
        true_res = float(vo.norm(b - matvec(x))) / bnorm
        if math.isfinite(true_res):
            # what a residual computed in this precision can reach: ~eps·‖M‖‖x‖/‖b‖
            floor = 10 * torch.finfo(b.dtype).eps * float(anorm) * float(vo.norm(x)) / bnorm
            result.residual = true_res
            result.converged = result.converged and true_res <= max(2 * mon.threshold, floor)
    return result
