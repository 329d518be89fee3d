"""Torch reference of the attention forward and its forward-mode tangent (JVP).

This is what :mod:`.attention`'s Triton kernels are tested against, and the CPU / float64 backend
of :func:`ngtriton.kernels.ops.attention_forward` / ``attention_jvp``. Pure torch (no triton), so
it imports everywhere.

Attention ``o = softmax(s) v`` with ``s = scale · q kᵀ + mask``; q: (B, H, T, D), k, v:
(B, H, S, D). ``mask`` is broadcastable to (B, H, T, S): an additive float bias, or boolean with
True = keep; ``causal=True`` keeps key j for query i only when ``j ≤ i`` (the top-left aligned
lower triangle, as ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, also
when T ≠ S). Both may be given; they combine.

Tangent with ``dq, dk, dv`` (each ``None`` = zero), ``ds = scale · (dq kᵀ + q dkᵀ)``,
``p = softmax(s)``::

    do_i = Σ_j p_ij (ds_ij v_j + dv_j) − (Σ_j p_ij ds_ij) o_i

Fully masked rows (every key masked for a query): ``o = 0``, ``lse = -inf`` and ``do = 0``. This
is what torch's math backend returns since its "safe softmax" (older torch gave NaN there).

The queries are processed in chunks so that the score matrix held at once is
(B, H, chunk, S), not (B, H, T, S). Arithmetic is in float32 at least (float64 inputs stay
float64, the precision of the oracle checks); results are returned in the input dtype, ``lse``
in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

# Score elements held per chunk of queries (over all batches and heads): 4M fp32 = 16 MiB.
_CHUNK_ELEMS = 1 << 22


def default_scale(q: Tensor, scale: float | None) -> float:
    """``scale``, or ``1/√D`` (torch's default) when it is ``None``."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(q: Tensor, S: int) -> int:
    B, H, T = q.shape[:3]
    return max(1, min(T, _CHUNK_ELEMS // max(B * H * S, 1)))


def _scores(q: Tensor, k: Tensor, rows: slice, T: int, scale: float, causal: bool,
            mask: Tensor | None) -> Tensor:
    """``scale · q[rows] kᵀ + mask[rows]`` (masked entries -inf) in the compute dtype."""
    ct = _compute_dtype(q.dtype)
    qc = q[:, :, rows].to(ct)
    s = torch.matmul(qc, k.to(ct).transpose(-1, -2)).mul_(scale)
    S = k.shape[2]
    if mask is not None:
        m = mask
        if m.dim() >= 2 and m.shape[-2] == T and T != 1:
            m = m[..., rows, :]
        if torch.broadcast_shapes(m.shape, s.shape) != s.shape:  # a mask wider than s
            s = s.expand(torch.broadcast_shapes(m.shape, s.shape)).clone()
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m.to(ct))
    if causal:
        i = torch.arange(rows.start, rows.stop, device=s.device)[:, None]
        j = torch.arange(S, device=s.device)[None, :]
        s.masked_fill_(j > i, float("-inf"))
    return s


def _safe(lse: Tensor) -> Tensor:
    """``lse`` with the -inf of fully masked rows replaced by 0 (then ``exp(s − lse) = 0``)."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: (B, H, T, D), (B, H, S, D), (B, H, S, D)")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


def shapes_ok(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, o: Tensor | None = None,
              lse: Tensor | None = None, dq: Tensor | None = None, dk: Tensor | None = None,
              dv: Tensor | None = None) -> bool:
    """Whether the operands have the shapes the kernels assume (used by the dispatcher, which
    sends anything else to the reference, whose errors are then the caller's): q (B, H, T, D),
    k and v (B, H, S, D), o and the tangents shaped like their primals, lse (B, H, T), and
    ``mask`` of at most 4 dimensions broadcastable to (B, H, T, S)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        return False
    B, H, T, _ = q.shape
    S = k.shape[2]
    pairs = ((o, q), (dq, q), (dk, k), (dv, k))
    if any(t is not None and t.shape != ref.shape for t, ref in pairs):
        return False
    if lse is not None and tuple(lse.shape) != (B, H, T):
        return False
    if mask is not None:
        if mask.dim() > 4:
            return False
        try:
            full = torch.broadcast_shapes(tuple(mask.shape), (B, H, T, S))
        except RuntimeError:
            return False
        if tuple(full) != (B, H, T, S):
            return False
    return True


def _probabilities(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float, causal: bool,
                   mask: Tensor | None) -> Iterator[tuple[slice, int, Tensor, Tensor, Tensor]]:
    """Per chunk of queries: ``(rows, keys, k, v, p)`` with ``p = exp(s − lse)`` (B, H, rows,
    keys) from the forward's ``lse``, in the compute dtype; under ``causal`` only the first
    ``keys`` keys, the others being masked for every row of the chunk."""
    T, S = q.shape[2], k.shape[2]
    ct = _compute_dtype(q.dtype)
    step = _chunk_rows(q, S)
    for r0 in range(0, T, step):
        rows = slice(r0, min(T, r0 + step))
        keys = min(S, rows.stop) if causal else S
        kc, vc = k[:, :, :keys].to(ct), v[:, :, :keys].to(ct)
        m = None if mask is None else (mask[..., :keys] if mask.shape[-1] == S and S > 1
                                       else mask)
        s = _scores(q, kc, rows, T, scale, causal, m)
        yield rows, keys, kc, vc, s.sub_(_safe(lse[:, :, rows].to(ct))[..., None]).exp_()


def attention_forward_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                                causal: bool = False, mask: Tensor | None = None
                                ) -> tuple[Tensor, Tensor]:
    """``(o, lse)``: attention output (q's dtype) and the log-sum-exp of each row of ``s``
    (B, H, T), float32 (float64 for float64 inputs); ``lse = -inf`` on fully masked rows."""
    _check(q, k, v)
    scale = default_scale(q, scale)
    B, H, T, _ = q.shape
    S = k.shape[2]
    ct = _compute_dtype(q.dtype)
    o = torch.empty((B, H, T, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=ct, device=q.device)
    if T == 0:
        return o, lse
    if S == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    vc = v.to(ct)
    step = _chunk_rows(q, S)
    for r0 in range(0, T, step):
        rows = slice(r0, min(T, r0 + step))
        s = _scores(q, k, rows, T, scale, causal, mask)
        ls = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _safe(ls)[..., None])
        o[:, :, rows] = torch.matmul(p, vc).to(q.dtype)
        lse[:, :, rows] = ls
    return o, lse


def attention_jvp_reference(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                            dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, *,
                            scale: float | None = None, causal: bool = False,
                            mask: Tensor | None = None) -> Tensor:
    """Tangent ``do`` (q's dtype) of attention at ``(q, k, v)`` along ``(dq, dk, dv)``, from the
    forward's ``o`` and ``lse`` (``p = exp(s − lse)``; see the module docstring)."""
    _check(q, k, v)
    scale = default_scale(q, scale)
    B, H, T, _ = q.shape
    S = k.shape[2]
    ct = _compute_dtype(q.dtype)
    out = torch.zeros((B, H, T, v.shape[-1]), dtype=q.dtype, device=q.device)
    if T == 0 or S == 0 or (dq is None and dk is None and dv is None):
        return out
    for rows, keys, kc, vc, p in _probabilities(q, k, v, lse, scale, causal, mask):
        acc = None
        if dq is not None or dk is not None:
            # ds = dq kᵀ + q dkᵀ as one product over the stacked features
            left = [t[:, :, rows].to(ct) for t in (dq, q if dk is not None else None)
                    if t is not None]
            right = [t for t in (kc if dq is not None else None,
                                 dk[:, :, :keys].to(ct) if dk is not None else None)
                     if t is not None]
            ds = torch.matmul(torch.cat(left, -1) if len(left) > 1 else left[0],
                              (torch.cat(right, -1) if len(right) > 1 else right[0])
                              .transpose(-1, -2))
            pds = ds.mul_(p).mul_(scale)
            acc = torch.matmul(pds, vc)
            acc.sub_(pds.sum(-1, keepdim=True) * o[:, :, rows].to(ct))
        if dv is not None:
            term = torch.matmul(p, dv[:, :, :keys].to(ct))
            acc = term if acc is None else acc.add_(term)
        out[:, :, rows] = acc.to(q.dtype)
    return out


def attention_vjp_reference(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, g: Tensor,
                            *, scale: float | None = None, causal: bool = False,
                            mask: Tensor | None = None,
                            need: tuple[bool, bool, bool] = (True, True, True)
                            ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Cotangents ``(dq, dk, dv)`` (q's dtype; ``None`` where ``need`` says no) of attention for
    the output cotangent ``g``, from the forward's ``o`` and ``lse`` (``p = exp(s − lse)``)::

        Δ = rowsum(g ⊙ o), dv = pᵀ g, ds = p ⊙ (g vᵀ − Δ), dq = scale · ds k, dk = scale · dsᵀ q.

    Fully masked rows (``lse = -inf``) contribute nothing (their dq is 0)."""
    _check(q, k, v)
    scale = default_scale(q, scale)
    need_q, need_k, need_v = (bool(x) for x in need)
    B, H, T, D = q.shape
    S = k.shape[2]
    ct = _compute_dtype(q.dtype)
    dq = torch.zeros((B, H, T, D), dtype=q.dtype, device=q.device) if need_q else None
    dk = torch.zeros((B, H, S, D), dtype=ct, device=q.device) if need_k else None
    dv = torch.zeros((B, H, S, D), dtype=ct, device=q.device) if need_v else None
    if T > 0 and S > 0 and (need_q or need_k or need_v):
        for rows, keys, kc, vc, p in _probabilities(q, k, v, lse, scale, causal, mask):
            gc = g[:, :, rows].to(ct)
            if need_v:
                dv[:, :, :keys].add_(torch.matmul(p.transpose(-1, -2), gc))
            if need_q or need_k:
                delta = (gc * o[:, :, rows].to(ct)).sum(-1, keepdim=True)
                ds = torch.matmul(gc, vc.transpose(-1, -2)).sub_(delta).mul_(p)
                if need_q:
                    dq[:, :, rows] = torch.matmul(ds, kc).mul_(scale).to(q.dtype)
                if need_k:
                    dk[:, :, :keys].add_(torch.matmul(ds.transpose(-1, -2),
                                                      q[:, :, rows].to(ct)), alpha=scale)
    return (dq, None if dk is None else dk.to(q.dtype), None if dv is None else dv.to(q.dtype))
