"""Vector updates of the Krylov solvers, in plain torch, without host synchronisation.

Scalars (``alpha``, ``beta``, ...) are 0-d tensors on the vectors' device and are never read on
the host here. Reductions come back as 0-d tensors (float64 for float64 vectors, float32
otherwise). ``ngtriton.kernels.krylov`` provides fused Triton versions with the same signatures.
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


def _fused(x: Tensor) -> Any:
    """``ngtriton.kernels.krylov`` for CUDA vectors when Triton is there, else None."""
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
    return p.mul_(beta.to(p.dtype)).add_(r)


def axpy(y: Tensor, x: Tensor, a: Tensor) -> Tensor:
    """``y += a x`` in place; returns ``y``."""
    return y.addcmul_(x, a.to(y.dtype))


def minres_update(x: Tensor, v: Tensor, w1: Tensor, w2: Tensor, oldeps: Tensor, delta: Tensor,
                  denom: Tensor, phi: Tensor) -> Tensor:
    """MINRES direction and step: ``w1 ← (v − ε w1 − δ w2)·denom`` (in place), ``x += φ w1``.

    Returns ``w1``, which now holds the newest direction (the caller rotates its buffers).
    """
    dt = x.dtype
    w1.mul_(-oldeps.to(dt)).addcmul_(w2, -delta.to(dt)).add_(v).mul_(denom.to(dt))
    x.addcmul_(w1, phi.to(dt))
    return w1
