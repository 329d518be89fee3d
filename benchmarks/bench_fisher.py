"""One Fisher-vector product and one whole solve against their baselines, side by side.

Each group is one model / batch / dtype / device; its baseline is a training step (forward +
cross-entropy + backward) of the same model and batch. Compared in the same run:

* ngtriton's product on a built operator, per backend (torch engine, autograd, Triton on CUDA),
  the cost of building the operator, and (interleaved) a training step whose forward the build
  then reuses through a ForwardRecord, as NGD does;
* torch.func jvp + vjp without caching (two forwards per product);
* torch.func.linearize with its JVP and a VJP closure cached (and torch.compile'd on CUDA);
* curvlinops' GGN matvec, when curvlinops is installed;
* a whole solve: 20 CG iterations (20 products plus the vector work).

Run: ``pytest benchmarks/bench_fisher.py`` (``--benchmark-json`` to keep the numbers);
``python benchmarks/run.py`` runs every suite and writes ``benchmarks/results/``.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, linearize, vjp

from ngtriton import FisherOperator, ForwardRecord, solve

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if CUDA:
    CONFIGS = [(w, b, dt) for w in (1024, 4096) for b in (256, 4096)
               for dt in (torch.float32, torch.bfloat16)]
    BACKENDS = ["triton", "torch", "autograd"]
else:
    CONFIGS = [(512, 512, torch.float32)]
    BACKENDS = ["torch", "autograd"]


def make_mlp(width: int, dtype: torch.dtype) -> tuple[nn.Module, list[int]]:
    """CPU: the MLP 256-512-512-10 of the issues; CUDA: L = 4 layers of ``width``."""
    dims = [256, 512, 512, 10] if not CUDA else [width] * 4 + [10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DEVICE, dtype), dims


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _run(fn):
    def timed():
        out = fn()
        _sync()
        return out
    return timed


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"w{c[0]}-b{c[1]}-{str(c[2])[6:]}")
def problem(request):
    width, batch, dtype = request.param
    torch.manual_seed(0)
    model, dims = make_mlp(width, dtype)
    x = torch.randn(batch, dims[0], device=DEVICE, dtype=dtype)
    y = torch.randint(0, dims[-1], (batch,), device=DEVICE)
    group = f"{'x'.join(map(str, dims))}-b{batch}-{str(dtype)[6:]}-{DEVICE.type}"
    return model, x, y, group


def _bench(benchmark, group, fn, rounds=None, **info):
    benchmark.group = group
    benchmark.extra_info.update(info)
    fn = _run(fn)
    fn()  # warm up (allocator, kernels, autotuning)
    if rounds is None:
        return benchmark(fn)
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def _peak_bytes(fn) -> int | None:
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_train_step(benchmark, problem):
    model, x, y, group = problem

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()

    peak = _peak_bytes(step)
    _bench(benchmark, group, step, baseline=True, peak_bytes=peak)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ngtriton_product(benchmark, problem, backend):
    model, x, y, group = problem
    op = FisherOperator(model, x, targets=y, backend=backend)
    v = torch.randn(op.num_params, device=DEVICE, dtype=op.dtype)
    _bench(benchmark, group, lambda: op.fisher_matvec(v), backend=backend,
           linearization=type(op.linearization).__name__)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ngtriton_build(benchmark, problem, backend):
    model, x, y, group = problem
    _bench(benchmark, group, lambda: FisherOperator(model, x, targets=y, backend=backend),
           backend=backend)


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_ngtriton_solve_20_cg_iterations(benchmark, problem, backend):
    model, x, y, group = problem
    op = FisherOperator(model, x, targets=y, damping=1e-3, backend=backend)
    g = op.gradient()
    run = lambda: solve(op, g, method="cg", tol=0.0, maxiter=20, check_every=20,  # noqa: E731
                        on_unconverged="ignore")
    peak = _peak_bytes(lambda: (FisherOperator(model, x, targets=y, damping=1e-3,
                                               backend=backend), run()))
    _bench(benchmark, group, run, rounds=5, backend=backend, products=20, peak_bytes=peak)


def _functional(model, x):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    return f, params


def _output_fvp(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z.float(), dim=-1).to(z.dtype)
    return (p * u - p * (p * u).sum(-1, keepdim=True)) / z.shape[0]


def uncached_product(model, x):
    """torch.func jvp + vjp with nothing cached: two forwards per product."""
    f, params = _functional(model, x)
    v = tuple(torch.randn_like(p) for p in params)

    def product():
        z, jv = jvp(f, params, v)
        _, pullback = vjp(f, *params)
        return pullback(_output_fvp(z, jv))

    return product


def cached_linearize_product(model, x):
    """torch.func.linearize's JVP and a VJP closure, both built once; the product and its input."""
    f, params = _functional(model, x)
    v = tuple(torch.randn_like(p) for p in params)
    z, jvp_fn = linearize(f, *params)
    _, pullback = vjp(f, *params)
    return (lambda *vs: pullback(_output_fvp(z, jvp_fn(*vs)))), v


def curvlinops_ggn(model, x, y):
    """curvlinops' GGN of the mean cross-entropy (the exact Fisher), or None if not installed."""
    try:
        import curvlinops
    except ImportError:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                                        check_deterministic=False)


def test_torch_func_jvp_vjp_uncached(benchmark, problem):
    model, x, _, group = problem
    _bench(benchmark, group, uncached_product(model, x))


def test_torch_func_linearize_cached(benchmark, problem):
    model, x, _, group = problem
    product, v = cached_linearize_product(model, x)
    _bench(benchmark, group, lambda: product(*v))


@pytest.mark.skipif(not CUDA, reason="torch.compile baseline only on CUDA")
def test_torch_func_linearize_compiled(benchmark, problem):
    model, x, _, group = problem
    product, v = cached_linearize_product(model, x)
    compiled = torch.compile(product)
    _bench(benchmark, group, lambda: compiled(*v))


def test_curvlinops_ggn_matvec(benchmark, problem):
    model, x, y, group = problem
    if x.dtype != torch.float32:
        pytest.skip("curvlinops baseline in float32 only")
    ggn = curvlinops_ggn(model, x, y)
    if ggn is None:
        pytest.skip("curvlinops is not installed")
    op = FisherOperator(model, x, targets=y, backend=BACKENDS[0])
    v = torch.randn(op.num_params, device=DEVICE)
    torch.testing.assert_close(ggn @ v, op.fisher_matvec(v), rtol=1e-3, atol=1e-5)  # same F
    _bench(benchmark, group, lambda: ggn @ v)


def test_interleaved_ratios(benchmark, problem):
    """The same comparisons timed round-robin, so that drift of the machine hits all alike.

    Sequential pytest-benchmark groups can disagree by ±30 % on a shared 2-core CPU; here each
    round times every contender once, and the ratios are medians over rounds.
    """
    model, x, y, group = problem
    op = FisherOperator(model, x, targets=y, backend=BACKENDS[0])
    v = torch.randn(op.num_params, device=DEVICE, dtype=op.dtype)

    def train_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()

    def train_step_then_recorded_build():
        """What NGD does: the closure's step under a ForwardRecord, then the build reusing it
        (its ratio minus 1 is the build's real cost inside NGD)."""
        model.zero_grad(set_to_none=True)
        with ForwardRecord(model) as record:
            F.cross_entropy(model(x).float(), y).backward()
        FisherOperator(model, x, targets=y, backend=BACKENDS[0], record=record)

    contenders = {
        "train_step": train_step,
        "product": lambda: op.fisher_matvec(v),
        "build": lambda: FisherOperator(model, x, targets=y, backend=BACKENDS[0]),
        "train_step_then_recorded_build": train_step_then_recorded_build,
        "torch_func_jvp_vjp": uncached_product(model, x),
    }
    ggn = curvlinops_ggn(model, x, y) if x.dtype == torch.float32 else None
    if ggn is not None:
        contenders["curvlinops_ggn"] = lambda: ggn @ v

    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(3):
        for fn in contenders.values():
            _run(fn)()
    for _ in range(30):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            _run(fn)()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(ts)[len(ts) // 2] for k, ts in times.items()}
    ratios = {k: med[k] / med["train_step"] for k in med}
    benchmark.extra_info.update({f"ratio_{k}": round(r, 3) for k, r in ratios.items()})
    benchmark.extra_info["median_ms"] = {k: round(1e3 * t, 3) for k, t in med.items()}
    benchmark.group = group + "-interleaved"
    print(f"\n[{group}] interleaved medians, × a training step: "
          + ", ".join(f"{k} {r:.2f}" for k, r in ratios.items()))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
