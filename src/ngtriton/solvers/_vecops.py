"""Vector updates of the Krylov solvers, without host synchronisation.

Each function is one step of a solver's per-iteration vector work. On CUDA (with Triton) it is
one fused pass of ``ngtriton.kernels.krylov``; elsewhere it runs the plain torch ops the solvers
have always used, in the same order, so results off CUDA do not depend on the kernels.

Scalars (``alpha``, ``beta``, ...) are 0-d tensors on the vectors' device and are never read on
the host here, except on the CPU, where reading one is free and lets a branch replace a masking
pass. Reductions come back as 0-d tensors (float64 for float64 vectors, float32 otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of reductions over vectors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(a: Tensor) -> Tensor:
    """Whether ``a`` holds no NaN/Inf, as a 0-d bool tensor: one summing pass (NaN and Inf
    propagate through a sum), about 10× cheaper than ``isfinite(a).all()``. A sum that overflows
    from finite values reads as non-finite: with a float32 accumulator that needs values near
    1e38, which callers treat as broken anyway."""
    return torch.isfinite(a.sum(dtype=acc_dtype(a.dtype)))


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``a·b`` as a 0-d tensor."""
    acc = acc_dtype(a.dtype)
    return torch.dot(a.to(acc), b.to(acc))


def norm(a: Tensor) -> Tensor:
    """``‖a‖₂`` as a 0-d tensor."""
    return torch.linalg.vector_norm(a.to(acc_dtype(a.dtype)))


def host_reads_free(t: Tensor) -> bool:
    """Whether reading a scalar of ``t``'s device on the host costs nothing (the CPU, where a
    read waits for no queue). The solvers' host-side shortcuts hang on it: CG's and PCG's host
    loops under ``check_every=1``, and the branches below that replace a masking pass. Tests
    replace it (``monkeypatch.setattr``) by one returning False to run the device-side loops on
    the CPU exactly as on CUDA, and to count their host reads."""
    return t.device.type == "cpu"


def _fused(x: Tensor) -> Any:
    """``ngtriton.kernels.krylov`` for CUDA vectors when Triton is there, else None.

    The one dispatch predicate of this module: tests replace it (``monkeypatch.setattr``) by
    one returning the module for CPU vectors too, to run the solvers through the kernels in the
    Triton interpreter.
    """
    if not x.is_cuda:
        return None
    from ..kernels import triton_available

    if not triton_available():
        return None
    from ..kernels import krylov

    return krylov


def cg_update(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor) -> Tensor:
    """``x += α p`` and ``r −= α Ap`` in place; returns the new ``r·r`` (one fused pass on CUDA)."""
    fused = _fused(x)
    if fused is not None:
        return fused.cg_update(x, r, p, Ap, alpha)
    a = alpha.to(x.dtype)
    x.addcmul_(p, a)
    r.addcmul_(Ap, a, value=-1)
    return dot(r, r)


def update_direction(p: Tensor, r: Tensor, beta: Tensor) -> Tensor:
    """``p = r + β p`` in place; returns ``p``."""
    fused = _fused(p)
    if fused is not None:
        return fused.update_direction(p, r, beta)
    if host_reads_free(p):  # one pass (reading β is free here) instead of mul_ then add_
        b = float(beta)
        if abs(b) <= torch.finfo(p.dtype).max:  # else torch refuses the Python float (float16)
            return torch.add(r, p, alpha=b, out=p)
    return p.mul_(beta.to(p.dtype)).add_(r)


def scale_add(p: Tensor, z: Tensor, beta: Tensor) -> Tensor:
    """``p = z + β p`` in place, as PCG's host loop does off CUDA (``mul_`` then ``add_``, no
    host read: the same rounding in both of its loops); one fused pass on CUDA. Returns ``p``."""
    fused = _fused(p)
    if fused is not None:
        return fused.update_direction(p, z, beta)
    return p.mul_(beta.to(p.dtype)).add_(z)


def axpy(y: Tensor, x: Tensor, a: Tensor) -> Tensor:
    """``y += a x`` in place; returns ``y``."""
    return y.addcmul_(x, a.to(y.dtype))


def _zero_unless(t: Tensor, keep: Tensor) -> Tensor:
    """``t ← 0`` (NaN/Inf included) unless the 0-d bool ``keep``, in place. On the CPU a host
    branch (no pass at all in the usual case), elsewhere a masked fill (no synchronisation)."""
    if host_reads_free(t):
        if not bool(keep):
            t.zero_()
        return t
    return t.masked_fill_(~keep, 0)


def lanczos_project(y: Tensor, Av: Tensor, r1: Tensor, v: Tensor, ratio: Tensor) -> Tensor:
    """MINRES's Lanczos step, first half: ``y ← Av − ratio·r1`` into the buffer ``y``; returns
    ``α = v·y`` (one fused pass on CUDA)."""
    if Av.dtype != y.dtype:  # a matvec returning another dtype: work in the solver's
        Av = Av.to(y.dtype)
    fused = _fused(y)
    if fused is not None:
        return fused.sub_scaled_dot(y, Av, r1, ratio, v)
    torch.addcmul(Av, r1, -ratio.to(y.dtype), out=y)
    return dot(v, y)


def lanczos_orthogonalize(y: Tensor, r2: Tensor, coef: Tensor, keep: Tensor) -> Tensor:
    """MINRES's Lanczos step, second half: ``y ← y − coef·r2`` in place, all zeros unless
    ``keep`` (a non-finite ``α``: nothing of that product may leak on); returns ``‖y‖`` (one
    fused pass on CUDA)."""
    fused = _fused(y)
    if fused is not None:
        return fused.sub_scaled_dot(y, y, r2, coef, keep=keep).sqrt()
    _zero_unless(y, keep).addcmul_(r2, -coef.to(y.dtype))
    return norm(y)


def minres_update(x: Tensor, v: Tensor, w1: Tensor, w2: Tensor, y: Tensor, oldeps: Tensor,
                  delta: Tensor, denom: Tensor, phi: Tensor, vscale: Tensor) -> Tensor:
    """MINRES direction and step, and the next Lanczos vector: ``w1 ← (v − ε w1 − δ w2)·denom``,
    ``x += φ w1``, then ``v ← vscale·y``, all in place (one fused pass on CUDA).

    Returns ``w1``, which now holds the newest direction (the caller rotates its buffers).
    """
    fused = _fused(x)
    if fused is not None:
        return fused.minres_update(x, v, w1, w2, y, oldeps, delta, denom, phi, vscale)
    dt = x.dtype
    w1.mul_(-oldeps.to(dt)).addcmul_(w2, -delta.to(dt)).add_(v).mul_(denom.to(dt))
    x.addcmul_(w1, phi.to(dt))
    torch.mul(y, vscale.to(dt), out=v)
    return w1


def bidiag_step(u: Tensor, Av: Tensor, alpha: Tensor) -> Tensor:
    """Golub-Kahan step of LSMR: ``u ← Av − α u`` in place; returns ``‖u‖`` (one fused pass on
    CUDA)."""
    if Av.dtype != u.dtype:
        Av = Av.to(u.dtype)
    fused = _fused(u)
    if fused is not None:
        return fused.sub_scaled_dot(u, Av, u, alpha).sqrt()
    torch.addcmul(Av, u, -alpha.to(u.dtype), out=u)
    return norm(u)


def _unit_(v: Tensor, nv: Tensor) -> Tensor:
    """``v ← v/nv`` in place, all zeros when ``nv`` is 0 or not finite (torch ops)."""
    good = torch.isfinite(nv) & (nv > 0)
    v.mul_(torch.where(good, 1 / torch.where(good, nv, 1), 0).to(v.dtype))
    return _zero_unless(v, good)


def normalize(v: Tensor, nv: Tensor) -> Tensor:
    """``v ← v/‖v‖`` in place given ``nv = ‖v‖``, all zeros when it is 0 or not finite."""
    fused = _fused(v)
    if fused is not None:
        return fused.normalize(v, nv)
    return _unit_(v, nv)


def lsmr_update(x: Tensor, h: Tensor, hbar: Tensor, v: Tensor, nv: Tensor, c1: Tensor,
                c2: Tensor, c3: Tensor) -> Tensor:
    """LSMR's vector work after the rotations: ``v ← v/nv`` (as :func:`normalize`),
    ``h̄ ← h − c₁ h̄``, ``x += c₂ h̄``, ``h ← v − c₃ h``, in place (one fused pass on CUDA)."""
    fused = _fused(x)
    if fused is not None:
        return fused.lsmr_update(x, h, hbar, v, nv, c1, c2, c3)
    _unit_(v, nv)
    update_direction(hbar, h, -c1)
    axpy(x, hbar, c2)
    update_direction(h, v, -c3)
    return x
