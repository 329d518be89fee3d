"""The per-module engine on the CPU: one product and one build against a training step.

MLP 256-512-512-10 (tanh), batch 512, float32, CPU (DESIGN.md §3). In one group, in one run:

(a) a training step: forward + cross-entropy + backward (the baseline);
(b) one engine product ``vjp(jvp(v))`` on a built linearization (target ≤ 1.35× (a));
(c) torch.func ``jvp`` + ``vjp`` without caching (two forwards per product);
(d) building the engine's linearization (trace cached after the first build, one forward).

Each benchmark stores ``ratio_to_train_step`` (its median over (a)'s median) and
``ratio_interleaved`` (median of per-pair ratios, the two timed alternately, which is robust to
load drifting during the run) in ``benchmark.extra_info``, and prints both.
Run: ``pytest benchmarks/bench_engine_cpu.py`` (a few seconds on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp

from ngtriton.linearize import ops_torch
from ngtriton.linearize.engine import build_engine

GROUP = "engine-256x512x512x10-b512-float32-cpu"
ROUNDS = 25
_MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                          nn.Linear(512, 10))
    x = torch.randn(512, 256)
    y = torch.randint(0, 10, (512,))

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return model, x, y, step


def _interleaved_ratio(fn, ref, pairs: int = 10) -> float:
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        ref()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def _bench(benchmark, name, fn, ref, **info):
    benchmark.group = GROUP
    benchmark.extra_info.update(info)
    for _ in range(3):
        fn()
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    _MEDIANS[name] = median
    if "train_step" in _MEDIANS:
        ratio = median / _MEDIANS["train_step"]
        inter = _interleaved_ratio(fn, ref) if fn is not ref else 1.0
        benchmark.extra_info["ratio_to_train_step"] = ratio
        benchmark.extra_info["ratio_interleaved"] = inter
        print(f"\n[{GROUP}] {name}: {median * 1e3:.2f} ms = {ratio:.2f}x train step "
              f"(interleaved {inter:.2f}x)")


def test_a_train_step(benchmark, problem):
    _model, _x, _y, step = problem
    _bench(benchmark, "train_step", step, step, baseline=True)


def test_b_engine_product(benchmark, problem):
    model, x, _y, step = problem
    lin = build_engine(model, (x,), ops_torch)
    v = [torch.randn_like(p) for p in lin.params]
    _bench(benchmark, "engine_product", lambda: lin.vjp(lin.jvp(v)), step)


def test_c_torch_func_jvp_vjp_uncached(benchmark, problem):
    model, x, _y, step = problem
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    def product():
        _z, jv = jvp(f, params, v)
        _, pullback = vjp(f, *params)
        return pullback(jv)

    _bench(benchmark, "torch_func_jvp_vjp", product, step)


def test_d_engine_build(benchmark, problem):
    model, x, _y, step = problem
    _bench(benchmark, "engine_build", lambda: build_engine(model, (x,), ops_torch), step)
