"""The GPU check: one short run that tests and measures what matters, and writes it down.

``bash benchmarks/gpu_check.sh`` (or ``python benchmarks/gpu_check.py``) runs, in order, each step
timed and kept to its share of the budget (8 minutes in all on an H100):

1. the GPU tests (``tests/kernels`` with bf16, the Triton backend's end-to-end tests);
2. the kernels against torch/cuBLAS on the same operands: a GEMM roofline (TFLOP/s), the fused
   Linear JVP and VJP (aligned, and with a misaligned weight tangent as the flat parameter
   vector gives it), LayerNorm JVP/VJP, the output-Fisher row product and the fused CG update;
3. one Fisher-vector product as a multiple of a training step, and its first-call latency
   (build + first product, autotuning included), on an MLP, a GPT-2-small-sized block stack
   and resnet18 (skipped without torchvision), per backend, against torch.func jvp+vjp (and
   ``torch.compile`` of it on CUDA);
4. launch counts (``bench_launches.py``): aten ops, Triton launches, host reads and (CUDA) the
   profiler's kernels of one Fisher product and one CG iteration, MLP and small GPT;
5. an NGD step against an AdamW step on the MLP.

Every contender of a group is timed round-robin with its baseline (medians over rounds), so a
ratio (median / the baseline's median, measured in the same run) is what carries over between
runs; absolute times are reported beside the device only. Results go to
``benchmarks/results/<device>-<date>.{json,md}`` (``<device>`` from
``torch.cuda.get_device_name()``, e.g. ``h100``); ``python benchmarks/compare.py OLD NEW``
compares two runs of the same device.

``--dry-run``: the same script on the CPU with tiny shapes (the Triton kernels in the
interpreter, ``TRITON_INTERPRET=1``), a few rounds, one short test file, written to a temporary
directory unless ``--out`` is given; ``tests/test_gpu_check.py`` runs it in CI so the script
cannot rot.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, interpreter, tiny shapes: checks the script itself")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temporary one for "
                        "--dry-run)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run (default 420 s, 30 s dry)")
    p.add_argument("--skip-tests", action="store_true", help="skip step 1")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per group")
    p.add_argument("--steps", default="tests,kernels,models,launches,optim",
                   help="comma-separated subset of tests,kernels,models,launches,optim")
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.dry_run:  # before torch and triton are imported: Triton reads it at import
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from run import device_tag, machine, render, results_stem  # noqa: E402
from torch import nn  # noqa: E402
from zoo import GPT  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class Check:
    """The run's state: device, sizes, budget, and the results gathered so far."""

    def __init__(self, args: argparse.Namespace):
        self.dry = args.dry_run
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.budget = args.budget_s or (30.0 if self.dry else 420.0)
        self.rounds = args.rounds or (2 if self.dry else 25)
        self.start = time.perf_counter()
        self.benchmarks: list[dict] = []
        self.steps: list[dict] = []
        self.tests: dict = {}
        self.failed = False
        self.launches: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def group(self, group: str, contenders: dict[str, Callable[[], object]], baseline: str,
              share_s: float, info: dict | None = None) -> dict[str, float]:
        """Time ``contenders`` round-robin (one warm-up call each), at most ``self.rounds``
        rounds and ``share_s`` seconds; record each one's median and its ratio to
        ``baseline``'s (per-round ratios give the spread). Returns the ratios."""
        for k in list(contenders):  # warm-up; a contender that fails is recorded and dropped
            try:
                self.timed(contenders[k])
            except Exception as e:
                if k == baseline:
                    raise
                del contenders[k]
                self.benchmarks.append(dict(name=k, group=group, stats=dict(median=math.nan,
                                                                            rounds=0),
                                            extra_info=dict(error=f"{type(e).__name__}: {e}"
                                                            [:300])))
                print(f"  [{group}] {k}: {type(e).__name__}: {e}"[:300], flush=True)
        names = list(contenders)
        times: dict[str, list[float]] = {k: [] for k in names}
        t_end = time.perf_counter() + max(share_s, 0.0)
        for r in range(self.rounds):
            for k in names:
                times[k].append(self.timed(contenders[k]))
            if r >= 1 and time.perf_counter() > t_end:
                break
        base = times[baseline]
        ratios = {}
        for k in names:
            per_round = [a / b for a, b in zip(times[k], base)]
            med = statistics.median(times[k])
            ratio = med / statistics.median(base)
            q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [ratio] * 3
            ratios[k] = ratio
            extra = dict(info or {}, ratio_to_baseline=round(ratio, 4),
                         ratio_iqr=round(q[2] - q[0], 4))
            if k == baseline:
                extra["baseline"] = True
            self.benchmarks.append(dict(
                name=k, group=group, extra_info=extra,
                stats=dict(median=med, min=min(times[k]), max=max(times[k]),
                           iqr=_iqr(times[k]), rounds=len(times[k]))))
        print(f"  [{group}] " + ", ".join(f"{k} {r:.2f}" for k, r in ratios.items()), flush=True)
        return ratios

    def single(self, group: str, name: str, seconds: float, info: dict | None = None) -> None:
        """A one-off measurement (first-call latency): no baseline, no ratio."""
        self.benchmarks.append(dict(name=name, group=group, extra_info=dict(info or {}),
                                    stats=dict(median=seconds, min=seconds, max=seconds,
                                               iqr=0.0, rounds=1)))
        print(f"  [{group}] {name} {1e3 * seconds:.1f} ms", flush=True)

    def step(self, name: str, fn: Callable[[], object], share: float) -> None:
        """Run one step with ``share`` of the time left; an exception is recorded (the run
        goes on, and fails at the end)."""
        t0 = time.perf_counter()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        rec: dict = dict(name=name)
        try:
            fn(share * self.left())
            rec["status"] = "ok"
        except Exception as e:  # recorded; the other steps still run
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()[-4000:]
            self.failed = True
            print(rec["traceback"], file=sys.stderr, flush=True)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.steps.append(rec)


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


# ----------------------------------------------------------------------------------------------
# 1. Tests
# ----------------------------------------------------------------------------------------------


def run_tests(c: Check, share_s: float) -> None:
    if c.dry:
        targets = ["tests/kernels/test_launch.py::test_span_counts_strides_not_elements"]
    else:
        targets = ["tests/kernels", "tests/test_triton_backend.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "-x", *targets]
    env = dict(os.environ)
    if not c.dry:
        env.pop("TRITON_INTERPRET", None)
        # correctness, not speed: one config per autotuning key (one compile, no benchmarking)
        env.setdefault("NGTRITON_MAX_TRIALS", "1")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120.0 if c.dry else max(share_s, 60.0))
        out, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (
            e.stdout or ""), "timeout"
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    c.tests = dict(command=" ".join(cmd[2:]), returncode=code, summary=tail,
                   seconds=round(time.perf_counter() - t0, 1), output_tail=out[-3000:])
    print(f"  {tail}", flush=True)
    if code != 0:
        raise RuntimeError(f"tests failed ({code}): {tail}")


# ----------------------------------------------------------------------------------------------
# 2. Kernels against torch / cuBLAS
# ----------------------------------------------------------------------------------------------


def run_kernels(c: Check, share_s: float) -> None:
    from ngtriton.kernels import triton_available

    if not triton_available():
        raise RuntimeError("triton cannot run here (no CUDA, TRITON_INTERPRET unset)")
    dtypes = [torch.float32] if c.dry else [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        _kernel_groups(c, dtype, share_s / (7 * len(dtypes)))


def _kernel_groups(c: Check, dtype: torch.dtype, share: float) -> None:
    from ngtriton.kernels import krylov, layernorm, linear, output
    from ngtriton.linearize import ops_torch as R

    dev = c.device
    M, N, K = (16, 16, 16) if c.dry else (8192, 4096, 4096)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    dn = str(dtype).removeprefix("torch.")
    x, xd, w, wd = rnd(M, K), rnd(M, K), rnd(N, K), rnd(N, K)
    bd, da, go = rnd(N), rnd(M, N), rnd(M, N)
    flops = 2 * M * N * K
    # a weight tangent at an odd offset of a flat vector, as the parameter layout gives it
    flat = rnd(N * K + 8)
    wd_mis = flat[3:3 + N * K].view(N, K)
    wd_mis.copy_(wd)
    _agree(linear.linear_jvp(x, xd, w, wd_mis, bd, da), R.linear_jvp(x, xd, w, wd, bd, da))
    c.group(f"gemm-{M}x{N}x{K}-{dn}", {
        "cublas_matmul": lambda: x @ w.t(),
        "cublas_2matmuls_jvp": lambda: R.linear_jvp(x, xd, w, wd, bd, da),
    }, "cublas_matmul", share, dict(flops=flops))
    c.group(f"linear-jvp-{M}x{N}x{K}-{dn}", {
        "torch_reference": lambda: R.linear_jvp(x, xd, w, wd, bd, da),
        "triton_fused": lambda: linear.linear_jvp(x, xd, w, wd, bd, da),
        "triton_fused_misaligned_wdot": lambda: linear.linear_jvp(x, xd, w, wd_mis, bd, da),
    }, "torch_reference", share, dict(flops=2 * flops))
    c.group(f"linear-vjp-{M}x{N}x{K}-{dn}", {
        "torch_reference": lambda: R.linear_vjp(x, w, go, da, True, True, True),
        "triton_fused": lambda: linear.linear_vjp(x, w, go, da, True, True, True),
    }, "torch_reference", share, dict(flops=2 * flops))
    D = 16 if c.dry else 4096
    xh = torch.nn.functional.layer_norm(rnd(M, D, dtype=torch.float32), (D,)).to(dtype)
    rstd = torch.ones(M, 1, device=dev, dtype=torch.float32)
    xdl, gol, lw, lwd, lbd = rnd(M, D), rnd(M, D), rnd(D), rnd(D), rnd(D)
    c.group(f"layernorm-{M}x{D}-{dn}", {
        "torch_jvp": lambda: R.layernorm_jvp(xh, rstd, xdl, lw, lwd, lbd),
        "triton_jvp": lambda: layernorm.layernorm_jvp(xh, rstd, xdl, lw, lwd, lbd),
        "torch_vjp": lambda: R.layernorm_vjp(xh, rstd, gol, lw, True, True, True),
        "triton_vjp": lambda: layernorm.layernorm_vjp(xh, rstd, gol, lw, True, True, True),
    }, "torch_jvp", share)
    _attention_group(c, rnd, dn, share)
    rows, C = (M, 10) if c.dry else (2048, 50304)
    p = torch.softmax(rnd(rows, C, dtype=torch.float32), -1).to(dtype)
    v = rnd(rows, C)
    c.group(f"output-fisher-{rows}x{C}-{dn}", {
        "torch_reference": lambda: output.categorical_fvp_reference(p, v),
        "triton_rows": lambda: output.categorical_fvp(p, v),
    }, "torch_reference", share)
    if dtype != torch.float32:
        return
    n = 1024 if c.dry else 124_000_000  # GPT-2 small's parameters
    vx, vr, vp, vap = (rnd(n) for _ in range(4))
    alpha = torch.tensor(1e-3, device=dev)
    c.group(f"krylov-cg-update-{n}-fp32", {
        "torch_reference": lambda: krylov.cg_update_reference(vx, vr, vp, vap, alpha),
        "triton_fused": lambda: krylov.cg_update(vx, vr, vp, vap, alpha),
    }, "torch_reference", share, dict(bytes=5 * 4 * n))


def _attention_group(c: Check, rnd: Callable[..., torch.Tensor], dn: str, share: float) -> None:
    """Causal attention at GPT-2-small's head shape: torch's fused SDPA forward and backward
    against the flash-attention kernels (forward, JVP, and the VJP where it exists)."""
    from ngtriton.kernels import attention, attention_reference

    B, H, T, D = (1, 2, 32, 16) if c.dry else (8, 12, 1024, 64)
    q, k, v, dq, dk, dv, go = (rnd(B, H, T, D) for _ in range(7))
    o, lse = attention.attention_forward(q, k, v, causal=True)
    want = attention_reference.attention_jvp_reference(q, k, v, o, lse, dq, dk, dv, causal=True)
    _agree(attention.attention_jvp(q, k, v, o, lse, dq, dk, dv, causal=True), want)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
    contenders = {
        "torch_sdpa_forward": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True),
        "torch_sdpa_backward": lambda: torch.autograd.grad(out, leaves, go, retain_graph=True),
        "triton_forward": lambda: attention.attention_forward(q, k, v, causal=True),
        "triton_jvp": lambda: attention.attention_jvp(q, k, v, o, lse, dq, dk, dv, causal=True),
    }
    try:
        from ngtriton.kernels import attention_backward
    except ImportError:
        pass
    else:
        contenders["triton_vjp"] = lambda: attention_backward.attention_vjp(
            q, k, v, o, lse, go, causal=True)
    flops = 4 * B * H * T * T * D // 2  # the forward's two products over the causal half
    c.group(f"attention-causal-{B}x{H}x{T}x{D}-{dn}", contenders, "torch_sdpa_forward", share,
             dict(flops=flops))


def _agree(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item() + 1e-6
    if not err <= 5e-2 * scale:
        raise AssertionError(f"kernel and reference disagree: max error {err:.3g} of {scale:.3g}")


# ----------------------------------------------------------------------------------------------
# 3. Products on models
# ----------------------------------------------------------------------------------------------


def _models(c: Check, mlp_only: bool = False
            ) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, torch.dtype]]:
    """(name, model, inputs, class targets per output row, dtype)."""
    dev = c.device
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    if c.dry:
        widths, batch, dtype = [16, 24, 24, 10], 32, torch.float32
    else:
        widths, batch, dtype = [1024] * 5 + [10], 4096, torch.bfloat16
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    mlp = nn.Sequential(*layers).to(dev, dtype)
    x = torch.randn(batch, widths[0], generator=g).to(dev, dtype)
    y = torch.randint(0, widths[-1], (batch,), generator=g).to(dev)
    out.append((f"mlp-{'x'.join(map(str, widths))}-b{batch}", mlp, x, y, dtype))
    if mlp_only:
        return out

    if c.dry:
        vocab, d, heads, nl, seq, bsz = 32, 16, 2, 2, 8, 2
    else:
        vocab, d, heads, nl, seq, bsz = 50304, 768, 12, 12, 256, 8
    gpt = GPT(vocab, d, heads, nl, seq).to(dev, dtype)  # benchmarks/zoo.py
    idx = torch.randint(0, vocab, (bsz, seq), generator=g).to(dev)
    yt = torch.randint(0, vocab, (bsz * seq,), generator=g).to(dev)
    out.append((f"gpt-{nl}x{d}-T{seq}-b{bsz}", gpt, idx, yt, dtype))

    classes = 10 if c.dry else 1000
    try:
        import torchvision

        res = torchvision.models.resnet18(num_classes=classes)
    except Exception:  # not installed, or a wheel built for another torch (operator missing)
        from zoo import ResNet18  # the same layers, written here

        print("  resnet18: torchvision unavailable, benchmarks/zoo.py's ResNet18", flush=True)
        res = ResNet18(classes=classes)
    res = res.to(dev, memory_format=torch.channels_last if c.cuda else torch.contiguous_format)
    res = res.to(dtype).eval()  # batch norm with its running statistics: a fixed function
    side, bs = (32, 2) if c.dry else (224, 64)
    img = torch.randn(bs, 3, side, side, generator=g).to(dev, dtype)
    yi = torch.randint(0, 10 if c.dry else 1000, (bs,), generator=g).to(dev)
    out.append((f"resnet18-{side}px-b{bs}", res, img, yi, dtype))
    return out


def _backends(c: Check, first: bool) -> list[str]:
    """Every backend on CUDA; in a dry run the interpreter's Triton and the torch engine on the
    first model, the torch engine on the others."""
    if c.cuda:
        return ["triton", "torch", "autograd"]
    return ["triton", "torch"] if first else ["torch"]


def _uncached_product(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """torch.func jvp + vjp with nothing cached (two forwards per product): the baseline."""
    from torch.func import functional_call, jvp, vjp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    def product():
        # forward-mode AD needs the math attention (the fused ones have no JVP rule)
        with sdpa_kernel([SDPBackend.MATH]):
            z, jv = jvp(f, params, v)
            p = torch.softmax(z.float(), dim=-1).to(z.dtype)
            u = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / z.shape[0]
            _, pullback = vjp(f, *params)
            return pullback(u)

    return product


def run_models(c: Check, share_s: float) -> None:
    from ngtriton import FisherOperator

    models = _models(c)
    for i, (name, model, x, y, dtype) in enumerate(models):
        share = share_s / (len(models) - i) if c.left() > 0 else 0.0
        t_model = time.perf_counter()
        dn = str(dtype).removeprefix("torch.")
        group = f"{name}-{dn}"

        def train_step(model=model, x=x, y=y):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).float(), y).backward()

        contenders: dict[str, Callable[[], object]] = {"train_step": train_step}
        for backend in _backends(c, i == 0):
            try:
                t0 = time.perf_counter()
                op = FisherOperator(model, x, targets=y, backend=backend)
                c.sync()
                t1 = time.perf_counter()
                v = torch.randn(op.num_params, device=c.device, dtype=op.dtype)
                op.fisher_matvec(v)
                c.sync()
                t2 = time.perf_counter()
            except Exception as e:  # a backend that cannot take this model: recorded, skipped
                c.benchmarks.append(dict(name=f"product_{backend}", group=group,
                                         extra_info=dict(error=f"{type(e).__name__}: {e}"[:300]),
                                         stats=dict(median=math.nan, rounds=0)))
                print(f"  [{group}] {backend}: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            c.single(f"{group}-first-call", f"build_{backend}", t1 - t0)
            c.single(f"{group}-first-call", f"first_product_{backend}", t2 - t1,
                     dict(linearization=type(op.linearization).__name__))
            contenders[f"product_{backend}"] = lambda op=op, v=v: op.fisher_matvec(v)
            contenders[f"build_{backend}"] = (
                lambda backend=backend, model=model, x=x, y=y: FisherOperator(
                    model, x, targets=y, backend=backend))
        contenders["torch_func_jvp_vjp"] = _uncached_product(model, x)
        if c.cuda and c.left() > 240:  # compiling a 12-block stack can take minutes
            try:
                compiled = torch.compile(_uncached_product(model, x))
                t0 = time.perf_counter()
                compiled()
                c.sync()
                c.single(f"{group}-first-call", "torch_compile_jvp_vjp",
                         time.perf_counter() - t0)
                contenders["torch_compile_jvp_vjp"] = compiled
            except Exception as e:  # recorded, the eager contenders still run
                print(f"  [{group}] torch.compile: {type(e).__name__}: {e}"[:300], flush=True)
        spent = time.perf_counter() - t_model
        c.group(group, contenders, "train_step", share - spent)
        share_s -= time.perf_counter() - t_model


# ----------------------------------------------------------------------------------------------
# 4. NGD step against an AdamW step
# ----------------------------------------------------------------------------------------------


def run_optim(c: Check, share_s: float) -> None:
    from ngtriton import NGD

    name, model, x, y, dtype = _models(c, mlp_only=True)[0]
    adam_model = copy.deepcopy(model)
    ngd = NGD(model)
    adamw = torch.optim.AdamW(adam_model.parameters(), lr=1e-3)

    def closure_for(m, opt):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m(x).float(), y)
            loss.backward()
            return loss
        return closure

    def ngd_step():
        ngd.step(closure_for(model, ngd))

    def adamw_step():
        closure_for(adam_model, adamw)()
        adamw.step()

    t0 = time.perf_counter()
    ngd_step()
    c.sync()
    c.single(f"optim-{name}-first-call", "ngd_first_step", time.perf_counter() - t0)
    c.group(f"optim-{name}-{str(dtype).removeprefix('torch.')}",
            {"adamw_step": adamw_step, "ngd_step": ngd_step}, "adamw_step", share_s)


# ----------------------------------------------------------------------------------------------


def run_launches(c: Check, share_s: float) -> None:
    """Counts, not times (see bench_launches.py); the MLP alone in a dry run."""
    import bench_launches

    c.launches = bench_launches.collect(dry=c.dry, mlp_only=c.dry)


STEPS = {"tests": (run_tests, 0.45), "kernels": (run_kernels, 0.3), "models": (run_models, 0.8),
         "launches": (run_launches, 0.3), "optim": (run_optim, 1.0)}


def main(args: argparse.Namespace) -> int:
    c = Check(args)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.skip_tests and "tests" in wanted:
        wanted.remove("tests")
    unknown = set(wanted) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps: {sorted(unknown)}")
    if not c.cuda and not c.dry:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for name in STEPS:
        if name in wanted:
            fn, share = STEPS[name]
            c.step(name, lambda s, fn=fn: fn(c, s), share)
    info = machine()
    info["check"] = "dry run (CPU, interpreter, tiny shapes)" if c.dry else "gpu_check"
    info["seconds"] = f"{time.perf_counter() - c.start:.0f}"
    from ngtriton.kernels import get_matmul_precision

    info["fp32_dot_precision"] = get_matmul_precision()
    report = dict(machine=info, device_tag=device_tag() if c.cuda else "cpu",
                  benchmarks=dict(benchmarks=c.benchmarks), tests=c.tests, steps=c.steps,
                  launches=c.launches)
    out = args.out
    tmp = None
    if out is None:
        if c.dry:
            tmp = tempfile.mkdtemp(prefix="gpu_check_")
            out = Path(tmp)
        else:
            out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(report["device_tag"], dt.date.today())
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    md = render(report)
    md += "\n## steps\n\n| step | status | seconds |\n|---|---|---:|\n" + "".join(
        f"| {s['name']} | {s['status']}{': ' + s['error'][:120] if 'error' in s else ''} | "
        f"{s['seconds']} |\n" for s in c.steps)
    if c.tests:
        md += f"\ntests: `{c.tests['command']}`: {c.tests['summary']}\n"
    if c.launches:
        from bench_launches import table

        md += "\n## launch counts\n\n" + table(c.launches)
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json and .md ({time.perf_counter() - c.start:.0f} s)")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
