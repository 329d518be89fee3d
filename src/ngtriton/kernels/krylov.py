"""Fused Krylov vector updates on flat parameter vectors, with no host synchronisation.

- ``cg_update(x, r, p, Ap, alpha)``: ``x += α p``, ``r −= α Ap`` in place and ``‖r‖²`` of the new
  residual from the same pass (one read of x, r, p, Ap, one write of x, r). Each program writes
  the partial sum of its block to a small buffer, reduced on the device by ``.sum()``.
- ``update_direction(p, r, beta)``: ``p = r + β p`` in place.
- ``dot(a, b)``: ``a·b`` as a 0-d tensor (per-block partials, then ``.sum()``).
- ``sub_scaled_dot(y, a, b, s, d=None, keep=None)``: ``y = a − s b`` (all zeros when ``keep`` is
  False) and ``d·y`` (``‖y‖²`` without ``d``) from the same pass. The Lanczos / Golub-Kahan step
  of MINRES and LSMR: ``y = Av − (β/β₋₁) v₋₁`` with ``α = v·y``, then ``y −= (α/β) v`` with
  ``‖y‖²``; LSMR's ``u = Av − α u`` with ``‖u‖²``.
- ``minres_update(x, v, w1, w2, y, oldeps, delta, denom, phi, vscale)``: MINRES's direction
  ``w1 = (v − ε w1 − δ w2)·denom``, solution ``x += φ w1`` and next Lanczos vector
  ``v = vscale·y`` in one pass (read x, v, w1, w2, y; write x, w1, v).
- ``normalize(v, nv)``: ``v = v/nv`` in place, all zeros when ``nv`` is 0 or non-finite.
- ``lsmr_update(x, h, hbar, v, nv, c1, c2, c3)``: LSMR's ``v = v/nv`` (as ``normalize``),
  ``h̄ = h − c₁ h̄``, ``x += c₂ h̄``, ``h = v − c₃ h`` in one pass.

Scalars (``alpha``, ``beta``, ``s``, ``phi``, ...) are 0-d device tensors read inside the kernel
(never ``.item()``), computed in the accumulation dtype; Python numbers are accepted too, and
``keep`` is a 0-d bool tensor or a Python bool. Reductions are returned as 0-d tensors: float64
for float64 vectors, float32 otherwise (fp32 accumulation for fp16/bf16/fp32). The
``*_reference`` torch functions have the same signatures (and the semantics of
``ngtriton.solvers._vecops``); the public functions use them whenever the kernels cannot run (no
triton, CPU without the interpreter, non-contiguous input).
This module imports without triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._config import INTERPRET, can_launch, cdiv, kernel_dtypes, launch_on_device, offsets_fit

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

_BLOCK = 256 if INTERPRET else 4096
_WARPS = 4 if INTERPRET else 8


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(s: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(s, Tensor):
        return s
    return torch.tensor(float(s), dtype=_acc_dtype(like.dtype), device=like.device)


def _flag(keep: Tensor | bool, like: Tensor) -> Tensor:
    if isinstance(keep, Tensor):
        return keep
    return torch.tensor(bool(keep), device=like.device)


def _finite_max(dtype: torch.dtype) -> float:
    """Largest finite value of the accumulation dtype: ``0 < nv ≤ it`` is the kernels' test of
    a usable norm (Triton has no ``isfinite``; NaN fails both comparisons)."""
    return torch.finfo(_acc_dtype(dtype)).max


def _unit_scale(nv: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(good, 1/nv or 0)`` for a norm ``nv``: good when it is finite and > 0."""
    nv = nv.to(_acc_dtype(dtype))  # as the kernels: 1/nv in the accumulation dtype
    good = torch.isfinite(nv) & (nv > 0)
    return good, torch.where(good, 1 / torch.where(good, nv, 1), 0).to(dtype)


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------


def cg_update_reference(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor | float
                        ) -> Tensor:
    """``x += α p``, ``r −= α Ap`` (in place); returns ``‖r‖²`` (0-d, fp32 or fp64)."""
    a = _scalar(alpha, x).to(x.dtype)
    x.addcmul_(p, a)
    r.addcmul_(Ap, a, value=-1)
    ra = r.to(_acc_dtype(r.dtype))
    return torch.dot(ra, ra)


def update_direction_reference(p: Tensor, r: Tensor, beta: Tensor | float) -> Tensor:
    """``p = r + β p`` in place; returns ``p``."""
    b = _scalar(beta, p).to(p.dtype)
    return p.mul_(b).add_(r)


def dot_reference(a: Tensor, b: Tensor) -> Tensor:
    """``a·b`` as a 0-d tensor (fp32, or fp64 for fp64 inputs)."""
    acc = _acc_dtype(a.dtype)
    return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc))


def sub_scaled_dot_reference(y: Tensor, a: Tensor, b: Tensor, s: Tensor | float,
                             d: Tensor | None = None, keep: Tensor | bool | None = None
                             ) -> Tensor:
    """``y = a − s b`` in place (zeros when ``keep`` is False; ``y`` may be ``a`` or ``b``);
    returns ``d·y``, or ``‖y‖²`` when ``d`` is None (0-d, fp32 or fp64)."""
    torch.addcmul(a, b, -_scalar(s, y).to(y.dtype), out=y)
    if keep is not None:
        y.masked_fill_(~_flag(keep, y), 0)
    acc = _acc_dtype(y.dtype)
    ya = y.to(acc)
    return torch.dot(ya, ya if d is None else d.to(acc))


def minres_update_reference(x: Tensor, v: Tensor, w1: Tensor, w2: Tensor, y: Tensor,
                            oldeps: Tensor | float, delta: Tensor | float,
                            denom: Tensor | float, phi: Tensor | float,
                            vscale: Tensor | float) -> Tensor:
    """``w1 = (v − ε w1 − δ w2)·denom``, ``x += φ w1``, then ``v = vscale·y``, all in place;
    returns ``w1`` (the newest direction)."""
    dt = x.dtype
    w1.mul_(-_scalar(oldeps, x).to(dt)).addcmul_(w2, -_scalar(delta, x).to(dt))
    w1.add_(v).mul_(_scalar(denom, x).to(dt))
    x.addcmul_(w1, _scalar(phi, x).to(dt))
    torch.mul(y, _scalar(vscale, x).to(dt), out=v)
    return w1


def _normalize_torch(v: Tensor, nv: Tensor | float) -> Tensor:
    good, inv = _unit_scale(_scalar(nv, v), v.dtype)
    return v.mul_(inv).masked_fill_(~good, 0)


def normalize_reference(v: Tensor, nv: Tensor | float) -> Tensor:
    """``v = v/nv`` in place, all zeros (NaN/Inf entries included) when ``nv`` is 0 or not
    finite; returns ``v``."""
    return _normalize_torch(v, nv)


def lsmr_update_reference(x: Tensor, h: Tensor, hbar: Tensor, v: Tensor, nv: Tensor | float,
                          c1: Tensor | float, c2: Tensor | float, c3: Tensor | float
                          ) -> Tensor:
    """``v = v/nv`` (as :func:`normalize_reference`), ``h̄ = h − c₁ h̄``, ``x += c₂ h̄``,
    ``h = v − c₃ h``, all in place; returns ``x``."""
    dt = x.dtype
    _normalize_torch(v, nv)
    hbar.mul_(-_scalar(c1, x).to(dt)).add_(h)
    x.addcmul_(hbar, _scalar(c2, x).to(dt))
    h.mul_(-_scalar(c3, x).to(dt)).add_(v)
    return x


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _cg_update_kernel(x_ptr, r_ptr, p_ptr, ap_ptr, alpha_ptr, part_ptr, n,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = part_ptr.dtype.element_ty
        alpha = tl.load(alpha_ptr).to(acc_t)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_t)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc_t)
        ap = tl.load(ap_ptr + offs, mask=mask, other=0.0).to(acc_t)
        x_new = (x + alpha * p).to(x_ptr.dtype.element_ty)
        r_new = (r - alpha * ap).to(r_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, x_new, mask=mask)
        tl.store(r_ptr + offs, r_new, mask=mask)
        rr = r_new.to(acc_t)  # the norm of the residual as stored
        tl.store(part_ptr + pid, tl.sum(rr * rr, axis=0))

    @triton.jit
    def _update_direction_kernel(p_ptr, r_ptr, beta_ptr, n, BLOCK: tl.constexpr,
                                 ACC64: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if ACC64 else tl.float32
        beta = tl.load(beta_ptr).to(acc_t)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(acc_t)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(p_ptr + offs, (r + beta * p).to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, part_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = part_ptr.dtype.element_ty
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_t)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(part_ptr + pid, tl.sum(a * b, axis=0))

    @triton.jit
    def _sub_scaled_dot_kernel(y_ptr, a_ptr, b_ptr, d_ptr, s_ptr, keep_ptr, part_ptr, n,
                               BLOCK: tl.constexpr, HAS_D: tl.constexpr,
                               HAS_KEEP: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = part_ptr.dtype.element_ty
        s = tl.load(s_ptr).to(acc_t)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_t)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_t)
        y = a - s * b
        if HAS_KEEP:
            y = tl.where(tl.load(keep_ptr) != 0, y, 0.0)
        y_st = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, y_st, mask=mask)
        ya = y_st.to(acc_t)  # reduce what was stored, as the next pass will read it
        if HAS_D:
            d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(acc_t)
            tl.store(part_ptr + pid, tl.sum(d * ya, axis=0))
        else:
            tl.store(part_ptr + pid, tl.sum(ya * ya, axis=0))

    @triton.jit
    def _minres_update_kernel(x_ptr, v_ptr, w1_ptr, w2_ptr, y_ptr, oldeps_ptr, delta_ptr,
                              denom_ptr, phi_ptr, vscale_ptr, n, BLOCK: tl.constexpr,
                              ACC64: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if ACC64 else tl.float32
        oldeps = tl.load(oldeps_ptr).to(acc_t)
        delta = tl.load(delta_ptr).to(acc_t)
        denom = tl.load(denom_ptr).to(acc_t)
        phi = tl.load(phi_ptr).to(acc_t)
        vscale = tl.load(vscale_ptr).to(acc_t)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(acc_t)
        w1 = tl.load(w1_ptr + offs, mask=mask, other=0.0).to(acc_t)
        w2 = tl.load(w2_ptr + offs, mask=mask, other=0.0).to(acc_t)
        w = ((v - oldeps * w1 - delta * w2) * denom).to(w1_ptr.dtype.element_ty)
        tl.store(w1_ptr + offs, w, mask=mask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        x = x + phi * w.to(acc_t)  # the direction as stored, like the torch version
        tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(v_ptr + offs, (vscale * y).to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _good_inverse(nv, BIG: tl.constexpr):
        # (usable, 1/nv or 0) for a norm nv: finite and > 0 (NaN fails both tests)
        good = (nv > 0) & (nv <= BIG)
        return good, tl.where(good, 1.0 / tl.where(good, nv, 1.0), 0.0)

    @triton.jit
    def _normalize_kernel(v_ptr, nv_ptr, n, BLOCK: tl.constexpr, ACC64: tl.constexpr,
                          BIG: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if ACC64 else tl.float32
        good, inv = _good_inverse(tl.load(nv_ptr).to(acc_t), BIG)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(v_ptr + offs, (tl.where(good, v, 0.0) * inv).to(v_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _lsmr_update_kernel(x_ptr, h_ptr, hbar_ptr, v_ptr, nv_ptr, c1_ptr, c2_ptr, c3_ptr, n,
                            BLOCK: tl.constexpr, ACC64: tl.constexpr, BIG: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if ACC64 else tl.float32
        good, inv = _good_inverse(tl.load(nv_ptr).to(acc_t), BIG)
        c1 = tl.load(c1_ptr).to(acc_t)
        c2 = tl.load(c2_ptr).to(acc_t)
        c3 = tl.load(c3_ptr).to(acc_t)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(acc_t)
        v = (tl.where(good, v, 0.0) * inv).to(v_ptr.dtype.element_ty)  # NaN/Inf dropped too
        tl.store(v_ptr + offs, v, mask=mask)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(acc_t)
        hbar = tl.load(hbar_ptr + offs, mask=mask, other=0.0).to(acc_t)
        hbar = (h - c1 * hbar).to(hbar_ptr.dtype.element_ty)
        tl.store(hbar_ptr + offs, hbar, mask=mask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(x_ptr + offs, (x + c2 * hbar.to(acc_t)).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + offs, (v.to(acc_t) - c3 * h).to(h_ptr.dtype.element_ty), mask=mask)


def _vec_ok(*ts: Tensor) -> bool:
    if not _HAS_TRITON:
        return False
    n = ts[0].numel()
    for t in ts:
        if t.numel() != n or not t.is_contiguous():
            return False
    if not offsets_fit(ts[0], slack=_BLOCK):  # 32-bit offsets, the last block included
        return False
    return can_launch(*ts, dtypes=(*kernel_dtypes(), torch.float64))


def _scalar_ok(s: Tensor, like: Tensor) -> bool:
    if INTERPRET and s.dtype == torch.bfloat16:
        return False
    return s.numel() == 1 and s.device == like.device and s.dtype.is_floating_point


def _flag_ok(k: Tensor, like: Tensor) -> bool:
    return k.numel() == 1 and k.device == like.device and k.dtype == torch.bool


def _scalars_ok(like: Tensor, *ss: Tensor) -> bool:
    return all(_scalar_ok(s, like) for s in ss)


@launch_on_device
def cg_update(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor | float) -> Tensor:
    """``x += α p``, ``r −= α Ap`` in place, returning ``‖r‖²`` (0-d) from the same pass."""
    a = _scalar(alpha, x)
    if not (_vec_ok(x, r, p, Ap) and _scalar_ok(a, x)):
        return cg_update_reference(x, r, p, Ap, a)
    n = x.numel()
    if n == 0:
        return torch.zeros((), dtype=_acc_dtype(x.dtype), device=x.device)
    nb = cdiv(n, _BLOCK)
    part = torch.empty(nb, dtype=_acc_dtype(x.dtype), device=x.device)
    _cg_update_kernel[(nb,)](x, r, p, Ap, a, part, n, BLOCK=_BLOCK, num_warps=_WARPS)
    return part.sum()


@launch_on_device
def update_direction(p: Tensor, r: Tensor, beta: Tensor | float) -> Tensor:
    """``p = r + β p`` in place; returns ``p``."""
    b = _scalar(beta, p)
    if not (_vec_ok(p, r) and _scalar_ok(b, p)):
        return update_direction_reference(p, r, b)
    n = p.numel()
    if n:
        _update_direction_kernel[(cdiv(n, _BLOCK),)](p, r, b, n, BLOCK=_BLOCK,
                                                     ACC64=p.dtype == torch.float64,
                                                     num_warps=_WARPS)
    return p


@launch_on_device
def dot(a: Tensor, b: Tensor) -> Tensor:
    """``a·b`` as a 0-d tensor (fp32, or fp64 for fp64 inputs), no host synchronisation."""
    if not _vec_ok(a, b):
        return dot_reference(a, b)
    n = a.numel()
    if n == 0:
        return torch.zeros((), dtype=_acc_dtype(a.dtype), device=a.device)
    nb = cdiv(n, _BLOCK)
    part = torch.empty(nb, dtype=_acc_dtype(a.dtype), device=a.device)
    _dot_kernel[(nb,)](a, b, part, n, BLOCK=_BLOCK, num_warps=_WARPS)
    return part.sum()


@launch_on_device
def sub_scaled_dot(y: Tensor, a: Tensor, b: Tensor, s: Tensor | float, d: Tensor | None = None,
                   keep: Tensor | bool | None = None) -> Tensor:
    """``y = a − s b`` in place (all zeros, NaN/Inf dropped, when ``keep`` is False), returning
    ``d·y`` (``‖y‖²`` when ``d`` is None, 0-d) from the same pass. ``y`` may be ``a`` or ``b``;
    ``d`` must not be ``y``."""
    sc = _scalar(s, y)
    k = None if keep is None else _flag(keep, y)
    vecs = (y, a, b) if d is None else (y, a, b, d)
    if not (_vec_ok(*vecs) and _scalar_ok(sc, y) and (k is None or _flag_ok(k, y))):
        return sub_scaled_dot_reference(y, a, b, sc, d, k)
    n = y.numel()
    if n == 0:
        return torch.zeros((), dtype=_acc_dtype(y.dtype), device=y.device)
    nb = cdiv(n, _BLOCK)
    part = torch.empty(nb, dtype=_acc_dtype(y.dtype), device=y.device)
    _sub_scaled_dot_kernel[(nb,)](y, a, b, y if d is None else d, sc, sc if k is None else k,
                                  part, n, BLOCK=_BLOCK, HAS_D=d is not None,
                                  HAS_KEEP=k is not None, num_warps=_WARPS)
    return part.sum()


@launch_on_device
def minres_update(x: Tensor, v: Tensor, w1: Tensor, w2: Tensor, y: Tensor,
                  oldeps: Tensor | float, delta: Tensor | float, denom: Tensor | float,
                  phi: Tensor | float, vscale: Tensor | float) -> Tensor:
    """``w1 = (v − ε w1 − δ w2)·denom``, ``x += φ w1`` and ``v = vscale·y`` in one pass, in
    place; returns ``w1`` (the newest direction: the caller rotates its buffers)."""
    ss = tuple(_scalar(t, x) for t in (oldeps, delta, denom, phi, vscale))
    if not (_vec_ok(x, v, w1, w2, y) and _scalars_ok(x, *ss)):
        return minres_update_reference(x, v, w1, w2, y, *ss)
    n = x.numel()
    if n:
        _minres_update_kernel[(cdiv(n, _BLOCK),)](x, v, w1, w2, y, *ss, n, BLOCK=_BLOCK,
                                                  ACC64=x.dtype == torch.float64,
                                                  num_warps=_WARPS)
    return w1


@launch_on_device
def normalize(v: Tensor, nv: Tensor | float) -> Tensor:
    """``v = v/nv`` in place, all zeros when ``nv`` is 0 or not finite; returns ``v``."""
    sn = _scalar(nv, v)
    if not (_vec_ok(v) and _scalar_ok(sn, v)):
        return normalize_reference(v, sn)
    n = v.numel()
    if n:
        _normalize_kernel[(cdiv(n, _BLOCK),)](v, sn, n, BLOCK=_BLOCK,
                                              ACC64=v.dtype == torch.float64,
                                              BIG=_finite_max(v.dtype), num_warps=_WARPS)
    return v


@launch_on_device
def lsmr_update(x: Tensor, h: Tensor, hbar: Tensor, v: Tensor, nv: Tensor | float,
                c1: Tensor | float, c2: Tensor | float, c3: Tensor | float) -> Tensor:
    """LSMR's ``v = v/nv`` (as :func:`normalize`), ``h̄ = h − c₁ h̄``, ``x += c₂ h̄`` and
    ``h = v − c₃ h`` in one pass, in place; returns ``x``."""
    ss = tuple(_scalar(t, x) for t in (nv, c1, c2, c3))
    if not (_vec_ok(x, h, hbar, v) and _scalars_ok(x, *ss)):
        return lsmr_update_reference(x, h, hbar, v, *ss)
    n = x.numel()
    if n:
        _lsmr_update_kernel[(cdiv(n, _BLOCK),)](x, h, hbar, v, *ss, n, BLOCK=_BLOCK,
                                                ACC64=x.dtype == torch.float64,
                                                BIG=_finite_max(x.dtype), num_warps=_WARPS)
    return x
