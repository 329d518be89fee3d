"""Launch configurations of the fused Linear kernels (:mod:`.linear`) for Hopper, and the
autotuning around them: tile tables, the pruner that keeps what fits shared memory and
registers, the bucketed batch key and the cap on trials per key."""

from __future__ import annotations

import os

import triton
from torch import Tensor

from ._config import INTERPRET, cdiv, num_sms

# ----------------------------------------------------------------------------------------------
# Launch configurations (Hopper, H100/H200: 228 KiB shared memory and 64K registers per SM).
#
# Each kernel has one K-loop with ONE operand pair per iteration, which Triton software-pipelines
# on sm_90 into cp.async copies into a ring of ``num_stages`` shared-memory buffers feeding async
# wgmma (tensor cores: fp16/bf16, and fp32 with "tf32") or, for fp32 "ieee", FMA dots.
# tests/kernels/test_compile_sm90.py compiles every table entry for sm_90 and checks that the
# entries the pruner below can select do not spill and are pipelined.
#
# Under the interpreter one small fixed configuration (autotuning there would run every config
# in Python).
# ----------------------------------------------------------------------------------------------

# (output rows, output cols, reduction, num_warps, num_stages) per tile. Rows × cols / (32 ·
# warps) output elements per thread: 64 (e.g. 128×128 on 8 warps) leaves room for the epilogue
# tiles (σ′, state) without spilling; 128 (128×256 on 8 warps) only for the plain JVP. See
# ``_TILE_REG_BYTES``.
Tile = tuple[int, int, int, int, int]

# Tensor cores (fp16/bf16; fp32 with "tf32"). One operand pair per stage: (rows + cols) ×
# reduction elements, e.g. 32 KiB for 128×128×64 in bf16, so 4 stages fit with room to spare.
_TC_TABLE: list[Tile] = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),  # fp32 (tf32): 32 KiB per stage
    (64, 128, 32, 4, 4),
]
# FMA dots (fp32 "ieee"): operands go from shared memory to registers each step, so the tiles are
# smaller and the reduction step short.
_FMA_TABLE: list[Tile] = [
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (32, 64, 32, 4, 3),
]

_INTERP_BLOCKS = (16, 16, 16)

# Shared memory per SM on Hopper is 228 KiB (227 usable by one block); the pipeline buffers must
# leave room for the epilogue's layout conversions.
_SMEM_BUDGET = 200 * 1024
# Register bytes per thread for the values shaped like the output tile: the fp32 accumulator
# (4 B per element) plus the epilogue's tiles (σ′, the output-Fisher state: itemsize each).
# 512 B = 128 registers, half the thread's 255, leaves the rest for addresses, the pipeline's
# bookkeeping and the layout conversions; the sm_90 compiles spill beyond it (e.g. 128×256 on 8
# warps with σ′ in bf16: 128 elements × 6 B).
_TILE_REG_BYTES = 512


_TENSOR_CORES: dict[int, bool] = {}  # id(TileConfig) -> its kind (configs live for the process)


class TileConfig(triton.Config):
    """A ``triton.Config`` that knows whether its tile is meant for tensor-core dots (fp16/bf16,
    fp32 with "tf32") or FMA dots (fp32 "ieee"); the pruner keeps the kind the launch needs.

    The kind is kept outside the instance's ``__dict__``: Triton's on-disk autotuning cache
    rebuilds each config as ``triton.Config(**config.__dict__)``."""

    def __init__(self, kwargs: dict, num_warps: int, num_stages: int, tensor_cores: bool):
        super().__init__(kwargs, num_warps=num_warps, num_stages=num_stages)
        _TENSOR_CORES[id(self)] = bool(tensor_cores)

    @property
    def tensor_cores(self) -> bool:
        return _TENSOR_CORES[id(self)]


def _configs(names: tuple[str, ...], tc: list[tuple[int, ...]], fma: list[tuple[int, ...]],
             interp: tuple[int, ...]) -> list[triton.Config]:
    """Configs from table rows ``(*blocks, num_warps, num_stages)``, blocks named ``names``."""
    if INTERPRET:
        return [triton.Config(dict(zip(names, interp), GROUP=4), num_warps=4, num_stages=1)]
    return [TileConfig(dict(zip(names, row[:-2]), GROUP=8), row[-2], row[-1], kind)
            for kind, table in ((True, tc), (False, fma)) for row in table]


def tile_fits(tile: Tile, itemsize: int, elem_bytes: int, stage_elems: int) -> bool:
    """Whether a tile ``(rows, cols, reduction, warps, stages)`` suits Hopper: the pipeline
    buffers (``stages × stage_elems × itemsize``) fit the shared-memory budget, and the values
    shaped like the output tile (``elem_bytes`` per element) fit ``_TILE_REG_BYTES`` per
    thread."""
    rows, cols, _, warps, stages = tile
    return (rows * cols * elem_bytes <= _TILE_REG_BYTES * 32 * warps
            and stages * stage_elems * itemsize <= _SMEM_BUDGET)


# At most this many configurations are benchmarked per autotuning key (the first ones the pruner
# keeps, in table order: largest tiles first). Each costs a compile and a benchmark inside the
# first product of a new key. ``NGTRITON_MAX_TRIALS=1`` (read at import) skips the benchmarking:
# one compile per key, e.g. for correctness tests on a GPU.
MAX_TRIALS = max(1, int(os.environ.get("NGTRITON_MAX_TRIALS", "4")))


def _prune_tiles(tiles: list[Tile], keep: list[bool], programs: list[int], sms: int,
                 max_trials: int = MAX_TRIALS) -> list[int]:
    """Indices of the kept tiles, less those that leave most of the machine idle when another
    kept tile fills it better (fewer than half of ``min(sms, best)`` programs), at most
    ``max_trials`` of them."""
    idx = [i for i, k in enumerate(keep) if k]
    if not idx:  # nothing fits: the smallest tile (fewest registers and buffers)
        return [min(range(len(tiles)), key=lambda i: (tiles[i][0] * tiles[i][1], tiles[i][2]))]
    floor = min(sms, max(programs[i] for i in idx)) // 2
    return [i for i in idx if programs[i] >= floor][:max_trials]


_H100_SMS = 132  # SM count assumed when the launch's device is not a GPU (compile-only checks)


def _pruner(names: tuple[str, str, str], stage_elems, elem_bytes, programs):
    """``early_config_prune`` over :class:`TileConfig` s whose tiles are named ``names`` (output
    rows, output cols, reduction; a name missing from a config is a call argument).
    ``stage_elems(tile, kw)``: operand elements per pipeline stage; ``elem_bytes(kw, itemsize)``:
    register bytes per output element (see ``tile_fits``); ``programs(tile, kw)``: programs
    launched. ``kw``: the launch's arguments by name."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        kw = {**named_args, **kwargs}
        first = next(v for v in named_args.values() if isinstance(v, Tensor))
        sms = num_sms(first.device) if first.device.type == "cuda" else _H100_SMS
        configs = [c for c in configs
                   if c.tensor_cores == (kw.get("PRECISION", "tf32") != "ieee")] or configs
        tiles = [(*(int(c.kwargs.get(n, kw.get(n))) for n in names), c.num_warps, c.num_stages)
                 for c in configs]
        size = first.element_size()
        per_elem = elem_bytes(kw, size)
        keep = [tile_fits(t, size, per_elem, stage_elems(t, kw)) for t in tiles]
        kept = _prune_tiles(tiles, keep, [programs(t, kw) for t in tiles], sms)
        return [configs[i] for i in kept]

    return prune


def _pair_stage(tile: Tile, kw: dict) -> int:
    """One operand pair per pipeline stage: (rows + cols) × reduction elements."""
    return (tile[0] + tile[1]) * tile[2]


def _vjp_stage(tile: Tile, kw: dict) -> int:
    """The VJP kernels per pipeline stage: grad_out (and σ′) rows × reduction, and the other
    operand (W for gx, x for gw) reduction × cols."""
    n_g = 2 if kw.get("HAS_DACT", True) else 1
    return tile[2] * (n_g * tile[0] + tile[1])


def _grid_tiles(rows: str, cols: str):
    def count(tile: Tile, kw: dict) -> int:
        return cdiv(int(kw[rows]), tile[0]) * cdiv(int(kw[cols]), tile[1])

    return count


def _bucket(m: int) -> int:
    """Autotuning key for the batch dimension: the next power of two, so that a model fed
    varying batch × sequence lengths tunes once per bucket, not once per length."""
    return triton.next_power_of_2(max(int(m), 1))


# Autotuning: keys bucket the batch (``_bucket``), the pruner leaves at most MAX_TRIALS configs,
# the choice is kept per key for the process (Triton's in-memory cache) and, on a GPU, on disk
# in Triton's cache directory (``cache_results``) so that the next process does not tune again.
_CACHE_RESULTS = not INTERPRET
