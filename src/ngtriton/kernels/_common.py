"""Triton helpers shared by the kernels: tile swizzling, deterministic partial-sum reduction."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, cdiv


@triton.jit
def grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a linear program id to (tile_a, tile_b), GROUP rows of tiles at a time (L2 reuse)."""
    width = GROUP * num_b
    group_id = pid // width
    first_a = group_id * GROUP
    group_size = min(num_a - first_a, GROUP)
    tile_a = first_a + ((pid % width) % group_size)
    tile_b = (pid % width) // group_size
    return tile_a, tile_b


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, S, L, stride_s, BLOCK: tl.constexpr):
    # out[l] = sum_s part[s, l], summed in a fixed order (deterministic), fp32, cast on store.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * stride_s + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_SUM_BLOCK = 256 if INTERPRET else 1024


def sum_partials(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Reduce fp32 partials ``(S, *shape)`` over the first axis into the contiguous ``out``."""
    S = part.shape[0]
    L = out.numel()
    part2 = part.reshape(S, L)
    if L == 0:
        return out
    grid = (cdiv(L, _SUM_BLOCK),)
    _sum_partials_kernel[grid](part2, out, S, L, part2.stride(0), BLOCK=_SUM_BLOCK,
                               num_warps=4)
    return out
