"""Launch counts (issue 17): the operations one Fisher-vector product issues, and one CG
iteration (its product plus the vector updates and the stopping bookkeeping).

For each model (an MLP and a small GPT-style stack of pre-LN blocks with causal attention) and
each backend, one ``FisherOperator.fisher_matvec`` and one CG iteration are counted, after a
warm-up (autotuning done):

* ``aten_ops``: aten operators dispatched (a ``TorchDispatchMode``), ``aten_compute`` the same
  without views, metadata and allocations (about the torch kernels launched);
* ``triton_launches``: Triton kernel launches (``kernel[grid](...)``, counted by wrapping
  Triton's launch), by kernel in ``top``;
* ``host_reads``: tensor values read on the host (``float(t)``, ``.item()``, ``.tolist()``,
  ...): each one a synchronisation on CUDA;
* ``cuda_events`` (CUDA only): the kernels (and memsets/copies) torch.profiler sees on the GPU.

A CG iteration (and one of PCG, NGD's preconditioned CG) is the difference of a 6- and a
2-iteration solve over 4, for the loop a GPU runs (scalars on the device, ``check_every`` 1
and 4) and, on the CPU, also the CPU's host loop.
Off CUDA the GPU loop runs on the CPU with the Krylov updates through the Triton kernels in the
interpreter, as CUDA would launch them (``_vecops`` patched as in tests/solvers).

Run: ``python benchmarks/bench_launches.py [--dry-run] [--out DIR]`` writes
``benchmarks/results/launches-<device>-<date>.{json,md}`` (``--dry-run``: tiny shapes, to a
temporary folder unless ``--out``); ``pytest benchmarks/bench_launches.py`` times the product
and stores the counts in the benchmark's ``extra_info``; benchmarks/gpu_check.py runs it as its
``launches`` step; tests/test_bench_launches.py runs the tiny configuration in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before Triton is imported: it reads this at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from zoo import GPT  # noqa: E402  (the GPT block stack of the GPU check)

from ngtriton import FisherOperator  # noqa: E402
from ngtriton.solvers import _vecops as vo  # noqa: E402
from ngtriton.solvers import cg  # noqa: E402
from ngtriton.solvers.pcg import pcg  # noqa: E402

# aten ops that launch no kernel: views, metadata, allocations
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "detach", "alias",
    "as_strided", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze",
    "unbind", "flatten", "unflatten", "view_as", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "narrow", "chunk",
    "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "diagonal"})
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__complex__,
          torch.Tensor.numpy, torch.is_nonzero}


_INSIDE_KERNEL = [0]  # > 0 while a Triton kernel runs: the interpreter's own aten ops are not
# the launch's (on a GPU they do not exist)


class AtenOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside the ``with`` block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _INSIDE_KERNEL[0]:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS and not _INSIDE_KERNEL[0]:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _kernel_name(k: Any) -> str:
    fn = getattr(k, "fn", k)
    fn = getattr(fn, "fn", fn)  # an autotuner or heuristics around a JITFunction
    return getattr(fn, "__name__", type(k).__name__)


@contextlib.contextmanager
def triton_launches() -> Iterator[Counter]:
    """Counts ``kernel[grid](...)`` launches (compiled or interpreted) by kernel name."""
    counts: Counter[str] = Counter()
    classes = []
    try:
        from triton.runtime import interpreter, jit
        classes = [c for c in (jit.KernelInterface, getattr(interpreter, "InterpretedFunction",
                                                              None)) if c is not None]
    except ImportError:  # no Triton: nothing to count
        pass
    saved = []
    for cls in classes:
        orig = cls.__dict__.get("__getitem__")
        if orig is None:
            continue

        def getitem(self, grid, orig=orig):
            launch = orig(self, grid)

            def counted(*args, **kwargs):
                if not _INSIDE_KERNEL[0]:  # an autotuner's inner launches are one
                    counts[_kernel_name(self)] += 1
                _INSIDE_KERNEL[0] += 1
                try:
                    return launch(*args, **kwargs)
                finally:
                    _INSIDE_KERNEL[0] -= 1
            return counted
        cls.__getitem__ = getitem
        saved.append((cls, orig))
    try:
        yield counts
    finally:
        for cls, orig in saved:
            cls.__getitem__ = orig


def count(fn: Callable[[], object]) -> dict[str, Any]:
    """The counts of one call of ``fn``."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    with triton_launches() as launches, HostReads() as reads, AtenOps() as aten:
        fn()
    out: dict[str, Any] = dict(
        aten_ops=sum(aten.ops.values()),
        aten_compute=sum(n for k, n in aten.ops.items() if k not in NO_KERNEL),
        triton_launches=sum(launches.values()), host_reads=reads.count,
        top=dict((aten.ops + launches).most_common(8)))
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out["cuda_events"] = sum(1 for e in prof.events()
                                 if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def _per_iteration(a: dict[str, Any], b: dict[str, Any], n: int) -> dict[str, Any]:
    keys = ("aten_ops", "aten_compute", "triton_launches", "host_reads", "cuda_events")
    out = {k: round((b[k] - a[k]) / n, 2) for k in keys if k in a}
    top = Counter(b["top"])
    top.subtract(a["top"])
    out["top"] = {k: round(v / n, 2) for k, v in top.most_common(8) if v > 0}
    return out


@contextlib.contextmanager
def gpu_loop() -> Iterator[None]:
    """Off CUDA: the solvers' GPU loop (no free host reads, Krylov updates through the Triton
    kernels in the interpreter), as tests/solvers patch ``_vecops``. On CUDA: nothing to do."""
    if torch.cuda.is_available():
        yield
        return
    saved = vo.host_reads_free, vo._fused
    vo.host_reads_free = lambda t: False
    try:
        from ngtriton.kernels import krylov, triton_available
        if triton_available():
            vo._fused = lambda x: krylov
    except ImportError:
        pass
    try:
        yield
    finally:
        vo.host_reads_free, vo._fused = saved


# --- models ------------------------------------------------------------------------------------

def models(dry: bool) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, model, inputs, targets): the counts depend on the structure, not the sizes, so
    off CUDA (Triton's interpreter is slow) the shapes are always the tiny ones."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dry = dry or dev.type != "cuda"
    g = torch.Generator().manual_seed(0)
    widths, batch = ([16, 32, 32, 10], 32) if dry else ([1024] * 4 + [10], 1024)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    torch.manual_seed(0)
    mlp = nn.Sequential(*layers[:-1]).to(dev)
    x = torch.randn(batch, widths[0], generator=g).to(dev)
    y = torch.randint(0, widths[-1], (batch,), generator=g).to(dev)
    vocab, d, heads, nl, seq, bsz = (32, 16, 2, 2, 8, 2) if dry else (256, 128, 4, 2, 64, 8)
    gpt = GPT(vocab, d, heads, nl, seq).to(dev)
    idx = torch.randint(0, vocab, (bsz, seq), generator=g).to(dev)
    yt = torch.randint(0, vocab, (bsz * seq,), generator=g).to(dev)
    return [(f"mlp-{'x'.join(map(str, widths))}-b{batch}", mlp, x, y),
            (f"gpt-{nl}x{d}-h{heads}-T{seq}-b{bsz}", gpt, idx, yt)]


def backends(first: bool, dry: bool) -> list[str]:
    """CUDA: every backend; off it the torch engine and the interpreter's Triton (in a dry run
    on the first model only: the interpreter is slow)."""
    if torch.cuda.is_available():
        return ["triton", "torch", "autograd"]
    return ["triton", "torch"] if first or not dry else ["torch"]


# --- the counts --------------------------------------------------------------------------------

def measure_operator(op: FisherOperator) -> list[dict[str, Any]]:
    """Rows for one operator: a product, and a CG iteration per loop."""
    v = torch.randn(op.num_params, device=op.device, dtype=op.dtype,
                    generator=torch.Generator(device=op.device).manual_seed(1))
    op.fisher_matvec(v)  # warm-up: autotuning, caches
    rows = [dict(what="product", **count(lambda: op.fisher_matvec(v)))]
    g = op.gradient()
    loops: list[tuple[str, int, Callable[[], contextlib.AbstractContextManager]]] = [
        ("gpu loop", 1, gpu_loop), ("gpu loop", 4, gpu_loop)]
    if not torch.cuda.is_available():
        loops.insert(0, ("cpu host loop", 1, contextlib.nullcontext))
    d = torch.ones_like(g)  # NGD's "adam" preconditioner is a vector like this one
    solvers = {"cg": lambda n, k: cg(op.damped_matvec, g, tol=0.0, maxiter=n, check_every=k),
               "pcg": lambda n, k: pcg(op.damped_matvec, g, precond=d, tol=0.0, maxiter=n,
                                       progress_tol=0.0, check_every=k)}
    for method, run in solvers.items():
        for loop, k, ctx in loops:
            if method == "pcg" and k == 1 and loop == "gpu loop":
                continue  # enough rows: k = 1 differs from k = 4 by the host reads only
            with ctx():
                run(2, k)  # warm-up of the Krylov kernels
                a = count(lambda run=run, k=k: run(2, k))
                b = count(lambda run=run, k=k: run(6, k))
            rows.append(dict(what=f"{method} iteration ({loop}, check_every={k})",
                             **_per_iteration(a, b, 4)))
    return rows


def collect(dry: bool, mlp_only: bool = False) -> list[dict[str, Any]]:
    """Every row, for the models of :func:`models` (the MLP alone with ``mlp_only``)."""
    records = []
    for i, (name, model, x, y) in enumerate(models(dry)[:1] if mlp_only else models(dry)):
        for backend in backends(i == 0, dry):
            try:
                op = FisherOperator(model, x, targets=y, damping=1e-3, backend=backend)
                rows = measure_operator(op)
            except Exception as e:  # a backend that cannot take this model: recorded
                records.append(dict(model=name, backend=backend, what="error",
                                    error=f"{type(e).__name__}: {e}"[:300]))
                print(f"  [{name}] {backend}: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            for row in rows:
                records.append(dict(model=name, backend=backend,
                                    linearization=type(op.linearization).__name__, **row))
                print(f"  [{name}] {backend} {row['what']}: aten {row['aten_ops']} "
                      f"(compute {row['aten_compute']}), triton {row['triton_launches']}, "
                      f"host reads {row['host_reads']}", flush=True)
    return records


COLUMNS = ("aten_ops", "aten_compute", "triton_launches", "host_reads", "cuda_events")


def render(report: dict[str, Any]) -> str:
    lines = ["# Launch counts per Fisher product and per CG iteration", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["machine"].items()]
    return "\n".join(lines) + "\n\n" + table(report["records"])


def table(records: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | backend | what | " + " | ".join(COLUMNS) + " | top ops |",
             "|---|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    for r in records:
        if r["what"] == "error":
            lines.append(f"| {r['model']} | {r['backend']} | error: {r['error'][:80]} |"
                         + " |" * (len(COLUMNS) + 1))
            continue
        top = ", ".join(f"{k} {v:g}" for k, v in r.get("top", {}).items())
        lines.append(f"| {r['model']} | {r['backend']} | {r['what']} | "
                     + " | ".join(f"{r[c]:g}" if c in r else "" for c in COLUMNS)
                     + f" | {top} |")
    return "\n".join(lines) + "\n"


def write(records: list[dict[str, Any]], out: Path) -> Path:
    from run import device_tag, machine, results_stem

    tag = device_tag() if torch.cuda.is_available() else "cpu"
    report = dict(machine=machine(), device_tag=tag, records=records)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"launches-{results_stem(tag, dt.date.today())}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(report))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temporary one for "
                        "--dry-run)")
    args = p.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="launches_")) if args.dry_run
                       else HERE / "results")
    path = write(collect(args.dry_run), out)
    print(f"wrote {path} and .md")
    return 0


def test_launch_counts(benchmark):
    """pytest-benchmark: one product on the MLP timed, every count in ``extra_info``."""
    name, model, x, y = models(dry=False)[0]
    op = FisherOperator(model, x, targets=y, damping=1e-3)
    rows = measure_operator(op)
    v = torch.randn(op.num_params, device=op.device, dtype=op.dtype)
    benchmark.group = f"launches-{name}"
    benchmark.extra_info.update(baseline=True, counts=rows)
    benchmark(lambda: op.fisher_matvec(v))


if __name__ == "__main__":
    sys.exit(main())
