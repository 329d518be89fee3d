"""Compile the kernels for Hopper (sm_90) ahead of time, without a GPU, and check their form.

The interpreter runs the kernels' Python, not Triton's compiler: this catches what only the
compiler rejects (unsupported constructs, layouts, shared memory), and what only the compiled
code shows: register spills, whether the K-loop is software-pipelined (``cp.async`` copies into a
ring of ``num_stages`` shared-memory buffers) and whether the dots run on wgmma. It runs Triton's
NVIDIA backend (bundled ptxas) in a subprocess with ``TRITON_INTERPRET`` unset, on CUDA machines
too (it compiles for sm_90 whatever the card, and checks what a launch does not: spills and
pipelining of every selectable tile).

The Linear kernels are compiled as a launch compiles them: integer arguments equal to 1 (unit
strides of contiguous tensors) become constants and those divisible by 16 carry that hint, for a
representative shape (M, N, K) = (4096, 1024, 1024), N = 256 and 16 for the categorical row
kernel, and for a misaligned one, (M, N, K) = (4096, 100, 300) (the second layer of a
784-300-100-10 MLP; tangents at arbitrary offsets of the flat parameter vector): as the kernels
receive it after ``linear.REALIGN``'s copies (reduction operands 16-byte aligned with rows
padded to 304 / 112 elements; K = 300 ragged; outputs, σ′ and state with unhinted row strides),
held to the same checks, and raw (pointers and strides without hints: ``-raw`` rows, recorded
for the table, required only to compile). Every entry of every autotune table is compiled in
fp16, bf16, fp32 with tf32 and fp32
"ieee"; the entries the kernel's own pruner keeps for that launch must be spill-free and
pipelined. Print the table::

    PYTHONPATH=src python tests/kernels/test_compile_sm90.py            # all of it
    PYTHONPATH=src python tests/kernels/test_compile_sm90.py jvp bf16   # rows matching all words
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

# ----------------------------------------------------------------------------------------------
# Compile side: runs in the subprocess (no TRITON_INTERPRET); imports triton and ngtriton lazily.
# ----------------------------------------------------------------------------------------------

SHAPE = (4096, 1024, 1024)  # (M, N, K)
MODES = {  # label: (pointer dtype, input_precision of the dots)
    "fp16": ("fp16", "tf32"),
    "bf16": ("bf16", "tf32"),
    "fp32-tf32": ("fp32", "tf32"),
    "fp32-ieee": ("fp32", "ieee"),
}
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Case:
    """One compile: ``kernel`` (attribute of ``module``) with launch-like ``args`` (pointer dtypes
    as strings, None for absent tensors, ints, floats) and constexprs ``consts``."""

    name: str
    mode: str
    module: str
    kernel: str
    args: dict
    consts: dict
    num_warps: int
    num_stages: int
    tile: str = ""
    selectable: bool = True  # kept by the kernel's pruner for this launch
    stage_bytes: int = 0  # operand bytes per pipeline stage (0: no K-loop to pipeline)
    loop_loads: int = 0  # loads per K-loop step that must become async copies
    words: list = field(default_factory=list)
    raw: bool = False  # misaligned operands as given (REALIGN off): compiled, not held to checks


def _jit_fn(kernel):
    import triton

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def compile_case(case: Case) -> dict:
    """Compile ``case`` for sm_90 and measure it (see :func:`measure`); errors are recorded."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(getattr(importlib.import_module(f"ngtriton.kernels.{case.module}"), case.kernel))
    sig, consts, attrs = {}, dict(case.consts), {}
    for i, name in enumerate(fn.arg_names):  # as the launcher specializes its arguments
        if name in consts:
            sig[name] = "constexpr"
            continue
        v = case.args[name]
        if v is None:
            sig[name], consts[name] = "constexpr", None
        elif isinstance(v, str) and v.endswith("!"):  # a pointer not 16-byte aligned
            sig[name] = "*" + v[:-1]
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = "*" + v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output: registers and spills
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas
    log = io.StringIO()
    rec = {**asdict(case)}
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=case.num_warps,
                                            num_stages=case.num_stages))
    except Exception as e:  # recorded and asserted on
        rec["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return rec
    rec.update(measure(k.asm["ttgir"], k.asm["ptx"], log.getvalue(), k.metadata.shared))
    return rec


def measure(ttgir: str, ptx: str, ptxas_log: str, shared: int) -> dict:
    """What the compiled kernel looks like: registers and spill bytes (ptxas), shared memory,
    depth of the multi-buffered shared-memory rings (= effective num_stages), async copies
    (TTGIR ``ttg.async_copy_global_to_local``, PTX ``cp.async``), wgmma (TTGIR
    ``ttng.warp_group_dot``, PTX ``wgmma.mma_async``) and its waits, ``mma.sync``."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    rings = [int(m.group(1)) for m in re.finditer(
        r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    waits = [int(p) for p in re.findall(r"ttng\.warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)]
    return dict(
        regs=int(regs.group(1)) if regs else -1,
        spill=int(spill.group(1)) + int(spill.group(2)) if spill else -1,
        smem=shared,
        rings=len(rings),
        ring_depth=max(rings, default=0),
        async_copy=ttgir.count("ttg.async_copy_global_to_local"),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
        wgmma=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        ptx_wgmma=ptx.count("wgmma.mma_async"),
        wgmma_waits0=sum(p == 0 for p in waits),
        wgmma_waits1=sum(p > 0 for p in waits),
        mma_sync=ptx.count("mma.sync"),
    )


def _selectable(kernel, configs, named_args: dict, kwargs: dict) -> list[bool]:
    """Which of ``configs`` the autotuner's ``early_config_prune`` keeps for this launch (meta
    tensors stand in for the arguments; the pruner assumes an H100's SM count)."""
    prune = kernel.early_config_prune
    if prune is None:
        return [True] * len(configs)
    kept = prune(configs, named_args, **kwargs)
    return [any(c is k for k in kept) for c in configs]


def _meta(dt: str | None):
    return None if dt is None else torch.empty(0, dtype=_TORCH[dt.rstrip("!")], device="meta")


def _tile_cases(kernel_name: str, name: str, args: dict, consts: dict, names: tuple,
                stage_elems, loop_loads: int, words: list, fixed: dict | None = None,
                raw: bool = False, modes: tuple[str, ...] = tuple(MODES)) -> list[Case]:
    """One case per config of the autotuned ``kernel_name`` per mode."""
    from ngtriton.kernels import linear

    kernel = getattr(linear, kernel_name)
    fixed = fixed or {}
    cases = []
    for mode in modes:
        dt, prec = MODES[mode]
        a = {k: (dt if v == "T" else dt + "!" if v == "T!" else v) for k, v in args.items()}
        named = {k: (_meta(v) if isinstance(v, str) else (None if v is None else v))
                 for k, v in a.items()}
        kw = {**consts, **fixed, "PRECISION": prec}
        sel = _selectable(kernel, kernel.configs, named, kw)
        for cfg, ok in zip(kernel.configs, sel):
            if cfg.tensor_cores != (prec != "ieee"):
                continue  # the other dot kind's table: never selected in this mode
            c = {**kw, **cfg.kwargs}
            tile = tuple(c[n] for n in names)
            c.update(_heuristics(kernel, {**a, **c}))
            cases.append(Case(
                name=name, mode=mode, module="linear", kernel=kernel_name, args=a, consts=c,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                tile="x".join(map(str, tile)), selectable=ok,
                stage_bytes=stage_elems((*tile, cfg.num_warps, cfg.num_stages), c)
                * _ITEMSIZE[dt],
                loop_loads=loop_loads, words=[name, mode, *words], raw=raw))
    return cases


def _heuristics(kernel, args: dict) -> dict:
    """The constexprs the kernel's ``triton.heuristics`` derive from these arguments."""
    import triton

    fn, out = kernel, {}
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if isinstance(fn, triton.runtime.autotuner.Heuristics):
            out.update({name: rule(args) for name, rule in fn.values.items()})
        fn = fn.fn
    return out


def _jvp_args(M: int, N: int, K: int, state: bool) -> dict:
    return dict(
        x_ptr="T", xd_ptr="T", w_ptr="T", wd_ptr="T", bd_ptr="T", da_ptr="T",
        st_ptr="T" if state else None, out_ptr="T", M=M, N=N, K=K, M_BUCKET=M,
        s_xm=K, s_xk=1, s_xdm=K, s_xdk=1, s_wn=K, s_wk=1, s_wdn=K, s_wdk=1, s_bd=1,
        s_dam=N, s_dan=1, s_stm=N if state else 0, s_stn=1 if state else 0, s_om=N, s_on=1,
        scale=1.0)


MISALIGNED = (4096, 100, 300)  # (M, N, K): rows of 100 and 300 elements


def _pad(n: int) -> int:
    return -(-n // 16) * 16


def misaligned_cases() -> list[Case]:
    """The Linear kernels at ``MISALIGNED``: realigned (as launched) and raw (``-raw``)."""
    from ngtriton.kernels import linear

    M, N, K = MISALIGNED
    full = dict(HAS_XDOT=True, HAS_WDOT=True, HAS_BDOT=True, HAS_DACT=True, EPILOGUE=0, GROUP=8)
    jvp_names = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    cases = []
    for raw in (False, True):
        ptr, kp, np_ = ("T!", K, N) if raw else ("T", _pad(K), _pad(N))
        tag = "-raw" if raw else ""
        jvp = dict(
            x_ptr=ptr, xd_ptr=ptr, w_ptr=ptr, wd_ptr=ptr, bd_ptr="T!" if raw else "T",
            da_ptr="T", st_ptr=None, out_ptr="T", M=M, N=N, K=K, M_BUCKET=M,
            s_xm=kp, s_xk=1, s_xdm=kp, s_xdk=1, s_wn=kp, s_wk=1, s_wdn=kp, s_wdk=1, s_bd=1,
            s_dam=N, s_dan=1, s_stm=0, s_stn=0, s_om=N, s_on=1, scale=1.0)
        cases += _tile_cases("_linear_jvp_kernel", f"jvp-K{K}{tag}", jvp, full, jvp_names,
                             linear._pair_stage, 2, ["misaligned"], raw=raw)
        dx = dict(go_ptr=ptr, da_ptr=ptr, w_ptr=ptr, gx_ptr="T", M=M, N=N, K=K, M_BUCKET=M,
                  s_gom=np_, s_gon=1, s_dam=np_, s_dan=1, s_wn=kp, s_wk=1, s_gxm=K, s_gxk=1)
        cases += _tile_cases("_linear_vjp_dx_kernel", f"vjp-dx-K{K}{tag}", dx,
                             dict(HAS_DACT=True, GROUP=8), ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                             linear._vjp_stage, 3, ["misaligned"], raw=raw)
        _, rows = linear.choose_split(M, N, K, torch.device("meta"), sms=132)
        dw = dict(go_ptr=ptr, da_ptr=ptr, x_ptr=ptr, gw_ptr="fp32", gb_ptr="fp32", M=M, N=N,
                  K=K, rows_per_split=rows, M_BUCKET=rows, s_gom=np_, s_gon=1, s_dam=np_,
                  s_dan=1, s_xm=kp, s_xk=1, s_gws=N * K, s_gwn=K, s_gwk=1, s_gbs=N, s_gbn=1)
        cases += _tile_cases("_linear_vjp_dw_kernel", f"vjp-dw-K{K}{tag}", dw,
                             dict(HAS_DACT=True, NEED_W=True, NEED_B=True, GROUP=8),
                             ("BLOCK_N", "BLOCK_K", "BLOCK_M"), linear._vjp_stage, 3,
                             ["misaligned"], raw=raw)
    # raw tiles the pruner would not pick are not worth a compile
    return [c for c in cases if c.selectable]


def audit_cases() -> list[Case]:
    """The Linear tiles (every table entry, every mode) and the LayerNorm row blocks."""
    from ngtriton.kernels import layernorm, linear

    M, N, K = SHAPE
    full = dict(HAS_XDOT=True, HAS_WDOT=True, HAS_BDOT=True, HAS_DACT=True)
    jvp_names = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    cases = _tile_cases("_linear_jvp_kernel", "jvp", _jvp_args(M, N, K, False),
                        dict(full, EPILOGUE=0, GROUP=8), jvp_names, linear._pair_stage, 2, [])
    cases += _tile_cases("_linear_jvp_kernel", "jvp-nodact", _jvp_args(M, N, K, False),
                         dict(full, HAS_DACT=False, EPILOGUE=0, GROUP=8, da_ptr=None),
                         jvp_names, linear._pair_stage, 2, [])
    cases += _tile_cases("_linear_jvp_kernel", "jvp-bernoulli", _jvp_args(M, N, K, True),
                         dict(full, EPILOGUE=2, GROUP=8), jvp_names, linear._pair_stage, 2, [])
    for width in (256, 16):
        cases += _tile_cases("_linear_jvp_row_kernel", f"jvp-categorical{width}",
                             _jvp_args(M, width, K, True), dict(full, EPILOGUE=1, GROUP=8),
                             jvp_names, linear._pair_stage, 2, [], fixed=dict(BLOCK_N=width))
    dx_args = dict(go_ptr="T", da_ptr="T", w_ptr="T", gx_ptr="T", M=M, N=N, K=K, M_BUCKET=M,
                   s_gom=N, s_gon=1, s_dam=N, s_dan=1, s_wn=K, s_wk=1, s_gxm=K, s_gxk=1)
    cases += _tile_cases("_linear_vjp_dx_kernel", "vjp-dx", dx_args,
                         dict(HAS_DACT=True, GROUP=8), ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                         linear._vjp_stage, 3, [])
    # the batch split an H100 gets for this shape (fp32 partials: gw/gb pointers are fp32)
    split, rows = linear.choose_split(M, N, K, torch.device("meta"), sms=132)
    dw_args = dict(go_ptr="T", da_ptr="T", x_ptr="T", gw_ptr="fp32", gb_ptr="fp32", M=M, N=N,
                   K=K, rows_per_split=rows, M_BUCKET=rows, s_gom=N, s_gon=1, s_dam=N, s_dan=1,
                   s_xm=K, s_xk=1, s_gws=N * K, s_gwn=K, s_gwk=1, s_gbs=N, s_gbn=1)
    assert split > 1
    cases += _tile_cases("_linear_vjp_dw_kernel", "vjp-dw", dw_args,
                         dict(HAS_DACT=True, NEED_W=True, NEED_B=True, GROUP=8),
                         ("BLOCK_N", "BLOCK_K", "BLOCK_M"), linear._vjp_stage, 3, [])
    for dt in ("fp16", "bf16", "fp32"):
        for D in (1024, 4096, 8192, 16384):
            block_r, block_d, warps = layernorm._row_blocks(D)
            rows = dict(s_xh=D, s_rstd=1, M=M, D=D)
            cases.append(Case(
                name=f"ln-jvp-D{D}", mode=dt, module="layernorm", kernel="_layernorm_jvp_kernel",
                args=dict(rows, xh_ptr=dt, rstd_ptr="fp32", xd_ptr=dt, w_ptr=dt, wd_ptr=dt,
                          bd_ptr=dt, out_ptr=dt, s_xd=D, s_w=1, s_wd=1, s_bd=1, s_out=D),
                consts=dict(HAS_XDOT=True, HAS_W=True, HAS_WDOT=True, HAS_BDOT=True,
                            BLOCK_R=block_r, BLOCK_D=block_d),
                num_warps=warps, num_stages=3, tile=f"{block_r}x{block_d}",
                words=[f"ln-jvp-D{D}", dt, "ln"]))
            cases.append(Case(
                name=f"ln-vjp-D{D}", mode=dt, module="layernorm", kernel="_layernorm_vjp_kernel",
                args=dict(rows, xh_ptr=dt, rstd_ptr="fp32", go_ptr=dt, w_ptr=dt, gx_ptr=dt,
                          gw_ptr="fp32", gb_ptr="fp32", rows_per_prog=64, s_go=D, s_w=1,
                          s_gx=D, s_gwp=D, s_gbp=D),
                consts=dict(HAS_W=True, NEED_X=True, NEED_W=True, NEED_B=True,
                            BLOCK_R=block_r, BLOCK_D=block_d),
                num_warps=warps, num_stages=3, tile=f"{block_r}x{block_d}",
                words=[f"ln-vjp-D{D}", dt, "ln"]))
    return cases


def other_kernel_cases() -> list[Case]:
    """The remaining kernels (no tuning tables): compiled once each, generic strides."""
    cases = []

    def add(module, kernel, dt, consts, ptrs=None, warps=4, stages=3):
        from importlib import import_module

        fn = _jit_fn(getattr(import_module(f"ngtriton.kernels.{module}"), kernel))
        ptrs = ptrs or {}
        args = {}
        for n in fn.arg_names:
            if n in consts:
                continue
            args[n] = ptrs.get(n, dt) if n.endswith("_ptr") else 7  # i32, no hints
        cases.append(Case(name=kernel, mode=dt, module=module, kernel=kernel, args=args,
                          consts=consts, num_warps=warps, num_stages=stages,
                          words=[kernel, dt, "other"]))

    add("_common", "_sum_partials_kernel", "bf16", dict(BLOCK=1024), dict(part_ptr="fp32"))
    for single, block in ((True, 128), (False, 4096)):
        for mode in (0, 1, 2):
            add("output", "_categorical_kernel", "bf16",
                dict(MODE=mode, BLOCK=block, SINGLE=single), stages=1)
    add("output", "_bernoulli_kernel", "fp16", dict(SQRT=True, BLOCK=2048), stages=1)
    for dt, acc in (("bf16", "fp32"), ("fp64", "fp64")):
        add("krylov", "_cg_update_kernel", dt, dict(BLOCK=4096),
            dict(alpha_ptr="fp32", part_ptr=acc), warps=8, stages=1)
        add("krylov", "_update_direction_kernel", dt, dict(BLOCK=4096, ACC64=dt == "fp64"),
            dict(beta_ptr="fp64"), warps=8, stages=1)
        add("krylov", "_dot_kernel", dt, dict(BLOCK=4096), dict(part_ptr=acc), warps=8,
            stages=1)
    return cases


def run_cases(cases: list[Case]) -> list[dict]:
    """Compile the cases on all cores (ptxas runs per compile)."""
    jobs = max(1, min(len(cases), os.cpu_count() or 1))
    if jobs == 1:
        return [compile_case(c) for c in cases]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_case, cases, chunksize=1))


def format_table(recs: list[dict]) -> str:
    head = (f"{'kernel':20s} {'mode':9s} {'tile':12s} {'w':>2s} {'s':>2s} {'sel':3s} "
            f"{'regs':>4s} {'spill':>5s} {'smem':>6s} {'ring':>4s} {'acp':>3s} {'cp.async':>8s} "
            f"{'wgmma':>5s} {'wait0':>5s} {'wait1':>5s} {'mma.sync':>8s}")
    lines = [head]
    for r in recs:
        pre = (f"{r['name']:20s} {r['mode']:9s} {r['tile']:12s} {r['num_warps']:2d} "
               f"{r['num_stages']:2d} {'yes' if r['selectable'] else 'no':3s} ")
        if "error" in r:
            lines.append(pre + "ERROR " + r["error"].strip().splitlines()[-1][:80])
            continue
        lines.append(pre + f"{r['regs']:4d} {r['spill']:5d} {r['smem'] / 1024:5.0f}K "
                     f"{r['ring_depth']:4d} {r['async_copy']:3d} {r['cp_async']:8d} "
                     f"{r['ptx_wgmma']:5d} {r['wgmma_waits0']:5d} {r['wgmma_waits1']:5d} "
                     f"{r['mma_sync']:8d}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    as_json = "--json" in argv
    words = [w for w in argv if not w.startswith("--")]
    cases = audit_cases() + misaligned_cases() + other_kernel_cases()
    cases = [c for c in cases if all(any(w in x for x in c.words) for w in words)]
    recs = run_cases(cases)
    if as_json:
        print("\n" + json.dumps(recs))
    else:
        print(format_table(recs))


# ----------------------------------------------------------------------------------------------
# Test side
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm90() -> list[dict]:
    """Every case compiled for sm_90 in one subprocess (a few minutes on two cores)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True,
                         text=True, timeout=1800)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas for the NVIDIA backend")
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _where(recs: list[dict], **match) -> list[dict]:
    out = [r for r in recs if all(r.get(k) == v for k, v in match.items())]
    assert out, f"no compiled case matches {match}"
    return out


def _aligned(recs: list[dict]) -> list[dict]:
    """The selectable Linear tiles at the aligned shape (the strict checks below)."""
    return [r for r in _where(recs, module="linear", selectable=True, raw=False)
            if "misaligned" not in r["words"]]


def _tensor_core(r: dict) -> bool:
    return r["mode"] != "fp32-ieee"


def _fail(recs: list[dict], what: str) -> str:
    return f"{what}:\n" + format_table(recs)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(sm90):
    bad = [r for r in sm90 if "error" in r and r.get("selectable", True)]  # raw ones included
    assert not bad, _fail(bad, "failed to compile")
    # a table entry the pruner never selects may exceed the hardware, but only on shared memory
    odd = [r for r in sm90 if "error" in r and "OutOfResources" not in r["error"]]
    assert not odd, _fail(odd, "failed to compile")


@pytest.mark.slow
def test_selectable_linear_tiles_do_not_spill(sm90):
    """Every tile the pruner can select (each mode, JVP with and without the output-Fisher
    epilogue, both VJP kernels) keeps its accumulator and epilogue in registers."""
    recs = _aligned(sm90)
    spills = [r for r in recs if r["spill"] != 0]
    assert not spills, _fail(spills, "spilling tiles the autotuner can pick")
    # each mode keeps at least one tile per kernel (the pruner must not empty the table)
    for name in {r["name"] for r in recs}:
        for mode in MODES:
            assert any(r["name"] == name and r["mode"] == mode for r in recs), (name, mode)


@pytest.mark.slow
def test_linear_k_loops_are_pipelined(sm90):
    """The K-loop's loads are cp.async copies into multi-buffered rings: num_stages deep for
    operands wgmma reads from shared memory, num_stages - 1 for those loaded to registers (the
    VJP's g = σ′ ⊙ ḡ, mma.sync and FMA dots). The shared memory holds the rings and fits the SM
    (228 KiB); the JVP's single operand pair per step holds exactly num_stages of them."""
    recs = _aligned(sm90)
    bad = []
    for r in recs:
        s = r["num_stages"]
        ok = (r["ring_depth"] in (s - 1, s) and r["ring_depth"] >= 2
              and r["async_copy"] >= r["loop_loads"] * (s - 1)
              and r["cp_async"] > 0
              and (s - 1) * r["stage_bytes"] <= r["smem"] <= 228 * 1024)
        if r["name"].startswith("jvp") and r["wgmma"]:
            ok = ok and r["ring_depth"] == s and r["smem"] >= s * r["stage_bytes"]
        if not ok:
            bad.append(r)
    assert not bad, _fail(bad, "K-loop not pipelined")


@pytest.mark.slow
def test_linear_dots_use_wgmma(sm90):
    """fp16/bf16/tf32 dots of tiles with ≥ 64 rows per warp group run on async wgmma, with the
    JVP waiting for no more than the previous step's wgmma inside its loop (one wait with
    pendings = 0, after the loop). fp32 "ieee" uses FMA: no tensor-core instruction at all."""
    recs = _aligned(sm90)
    bad = []
    for r in recs:
        rows = int(r["tile"].split("x")[0])
        if not _tensor_core(r):
            ok = r["wgmma"] == 0 and r["mma_sync"] == 0
        elif rows >= 64:
            ok = r["wgmma"] >= 1 and r["ptx_wgmma"] > 0 and r["wgmma_waits1"] >= 1
            if r["name"].startswith("jvp"):
                ok = ok and r["wgmma"] == 1 and r["wgmma_waits0"] == 1
        else:  # 32-row tiles (narrow outputs over short batches): mma.sync
            ok = r["wgmma"] > 0 or r["mma_sync"] > 0
        if not ok:
            bad.append(r)
    assert not bad, _fail(bad, "dots not on the expected instructions")


@pytest.mark.slow
def test_layernorm_rows_stay_in_registers(sm90):
    """Whole rows in registers up to 8192 features. (16384-wide rows compile, but the VJP's
    five row-length fp32 vectors exceed what 16 warps hold, and spill.)"""
    recs = _where(sm90, module="layernorm")
    bad = [r for r in recs if "error" in r
           or (r["spill"] != 0 and int(r["tile"].split("x")[1]) <= 8192)]
    assert not bad, _fail(bad, "LayerNorm row blocks spill")


@pytest.mark.slow
def test_misaligned_linear_tiles(sm90):
    """At MISALIGNED (K = 300: rows of 600 bytes in fp16) every selectable tile compiles, raw
    and realigned; realigned, the fp16/bf16 JVP and input-cotangent VJP tiles keep their
    accumulators in registers (raw, the JVP spills up to ~4 KB per thread).

    Known gaps (sm_90 compile, Triton 3.9), recorded by the xfail below: with K ragged the loads
    are masked per element, so 2-byte operands are not ``cp.async`` copies (4 bytes at least)
    and their K-loop is not pipelined even realigned; the fp32 tensor-core (tf32) JVP tiles
    with BLOCK_K = 64 spill 1–5 KB either way; the weight-cotangent kernel wraps K
    (``offs_k % K``) along the contiguous dimension of x and spills in fp16/bf16/tf32. Padding
    K to a multiple of 16 with zeros (all the reduction operands of a layer together) would
    remove the ragged masks."""
    recs = _where(sm90, module="linear", selectable=True)
    mis = [r for r in recs if "misaligned" in r["words"]]
    assert mis, "no misaligned case compiled"
    bad = [r for r in mis if "error" in r]
    assert not bad, _fail(bad, "misaligned tiles failed to compile")
    half = [r for r in mis if not r["raw"] and r["mode"] in ("fp16", "bf16")]
    spills = [r for r in half if r["name"].startswith(("jvp", "vjp-dx")) and r["spill"] != 0]
    assert not spills, _fail(spills, "realigned fp16/bf16 JVP / VJP-dx tiles spill")
    raw_jvp = sum(r["spill"] for r in mis if r["raw"] and r["name"].startswith("jvp"))
    fixed_jvp = sum(r["spill"] for r in mis if not r["raw"] and r["name"].startswith("jvp"))
    assert fixed_jvp < raw_jvp, (fixed_jvp, raw_jvp)


@pytest.mark.slow
@pytest.mark.xfail(reason="ragged K: element-masked loads are not pipelined (see above)",
                   strict=False)
def test_misaligned_k_loops_are_pipelined(sm90):
    recs = [r for r in _where(sm90, module="linear", selectable=True, raw=False)
            if "misaligned" in r["words"]]
    bad = [r for r in recs if r["cp_async"] == 0 or r["spill"] != 0]
    assert not bad, _fail(bad, "misaligned K-loops not pipelined")


if __name__ == "__main__":
    main(sys.argv[1:])
