"""NGD's cost: one step against its parts, and time to a target loss against Adam.

(1) Overhead, on one digits batch (MLP 64-128-128-10 tanh, batch 256): one NGD step (defaults)
    against its budget, "one gradient + its k Fisher products + one more training step": a
    gradient (zero_grad, forward, backward; the group's baseline), k Fisher products on a built
    operator (k = the iterations the step's solve used) and one Adam training step (zero_grad,
    forward, backward, ``Adam.step``), all four timed round-robin (medians over 40 rounds).
    ``extra_info`` has ``step_over_budget`` = step / (gradient + k·product + training step),
    ``step_over_grad_plus_k_products`` = step / (gradient + k·product) and
    ``step_over_two_gradients_plus_k_products`` (the stricter budget of earlier results, which
    counted the extra training step as one more gradient). The same on the MLP 256-512-512-10
    (batch 512), where a product is no longer dwarfed by per-call overheads.
(2) Time to target: optimizer wall time and epochs for NGD (defaults) to reach training loss
    0.05 on the digits MLP, against Adam at its best lr in {1e-3, 3e-3, 1e-2}; both recorded in
    ``extra_info`` and printed as a table.

Run: ``pytest benchmarks/bench_optim.py`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from ngtriton.demo import load_digits_data, make_mlp, train
from ngtriton.fisher import FisherOperator
from ngtriton.optim import NGD

pytest.importorskip("sklearn")
pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TARGET = 0.05
MAX_EPOCHS = 40


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup():
    data = load_digits_data(DEVICE)
    model = make_mlp().to(DEVICE)
    # A few Adam steps so the batch is not at the random initialisation.
    train("adam", data, epochs=1, model=model)
    x, y = data.x_train[:256], data.y_train[:256]
    return model, x, y


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.benchmark(group="ngd-step")
def test_gradient(benchmark, setup):
    model, x, y = setup

    def grad():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        _sync()
    benchmark.extra_info["baseline"] = True
    benchmark(grad)


@pytest.mark.benchmark(group="ngd-step")
def test_fisher_products(benchmark, setup):
    model, x, _ = setup
    op = FisherOperator(model, x, "categorical", damping=0.1)
    v = torch.randn(op.num_params, device=DEVICE)
    k = 20

    def products():
        for _ in range(k):
            op.damped_matvec(v)
        _sync()
    benchmark.extra_info["k"] = k
    benchmark(products)


def _overhead(benchmark, model, x, y, rounds: int = 40) -> None:
    """One NGD step (same point and damping every time) against its parts, timed round-robin.

    Each round times, in turn: a gradient; the k Fisher products of the step's solve, one after
    another on a freshly built operator (the build itself untimed), as CG runs them; one Adam
    training step; and one NGD step. Ratios are of the medians, so that drift of the machine
    hits all four alike.
    """
    state = [p.detach().clone() for p in model.parameters()]
    opt = NGD(model)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)

    def reset():
        with torch.no_grad():
            for p, s in zip(model.parameters(), state):
                p.copy_(s)

    def step():
        reset()
        opt.damping = 0.1
        opt.step(_closure(model, opt, x, y))
        _sync()

    def grad():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        _sync()

    def train_step():
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
        _sync()

    step()
    k = max(opt.last_stats.iterations, 1)
    method = opt.last_stats.method
    times: dict[str, list[float]] = {"gradient": [], "k_products": [], "train_step": [],
                                     "step": []}
    for r in range(rounds + 3):
        t0 = time.perf_counter()
        grad()
        t_grad = time.perf_counter() - t0
        reset()
        op = FisherOperator(model, x, "categorical", damping=0.1)
        v = torch.randn(op.num_params, device=DEVICE)
        t0 = time.perf_counter()
        for _ in range(k):
            op.damped_matvec(v)
        _sync()
        t_prods = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_step()  # Adam moves the parameters: reset() restores them before each NGD step
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()
        t_step = time.perf_counter() - t0
        if r >= 3:  # warm-up rounds
            for key, t in zip(times, (t_grad, t_prods, t_train, t_step)):
                times[key].append(t)
    reset()
    med = {key: statistics.median(ts) for key, ts in times.items()}
    core = med["gradient"] + med["k_products"]
    ratio = med["step"] / core
    budget = med["step"] / (core + med["train_step"])  # the budget
    strict = med["step"] / (core + med["gradient"])
    benchmark.extra_info.update(
        solver_iterations=k, method=method, gradient_s=med["gradient"],
        product_s=med["k_products"] / k, train_step_s=med["train_step"], step_s=med["step"],
        step_over_grad_plus_k_products=ratio, step_over_budget=budget,
        step_over_two_gradients_plus_k_products=strict)
    print(f"\nNGD step {1e3 * med['step']:.2f} ms = {budget:.2f} x the budget (gradient "
          f"{1e3 * med['gradient']:.2f} ms + {k} products {1e3 * med['k_products']:.2f} ms + "
          f"Adam training step {1e3 * med['train_step']:.2f} ms); {ratio:.2f} x gradient + "
          f"products; {strict:.2f} x with one more gradient instead of the training step; "
          f"method {method}, medians of {rounds} interleaved rounds")
    benchmark.pedantic(step, rounds=5, iterations=1)


@pytest.mark.benchmark(group="ngd-step")
def test_ngd_step(benchmark, setup):
    model, x, y = setup
    _overhead(benchmark, model, x, y)


@pytest.mark.benchmark(group="ngd-step-mlp256-512-512-10-b512")
def test_ngd_step_larger_mlp(benchmark):
    """The same on the MLP 256-512-512-10 (batch 512) of the core benchmarks."""
    torch.manual_seed(0)
    model = make_mlp((256, 512, 512, 10)).to(DEVICE)
    x = torch.randn(512, 256, device=DEVICE)
    y = torch.randint(0, 10, (512,), device=DEVICE)
    _overhead(benchmark, model, x, y)


def _time_to_target(name: str, data, **kwargs):
    _, run = train(name, data, epochs=MAX_EPOCHS, stop_at=TARGET, **kwargs)
    hit = next((i for i, loss in enumerate(run.losses) if loss <= TARGET), None)
    return (math.inf, None) if hit is None else (run.seconds[hit], hit)


@pytest.mark.benchmark(group="time-to-target")
def test_time_to_target(benchmark):
    data = load_digits_data(DEVICE)
    results = {}

    def ngd():
        results["NGD"] = _time_to_target("ngd", data)
    benchmark.pedantic(ngd, rounds=1, iterations=1)
    for lr in (1e-3, 3e-3, 1e-2):
        results[f"Adam lr={lr:g}"] = _time_to_target("adam", data, lr=lr)
    adam_key = min((k for k in results if k.startswith("Adam")), key=lambda k: results[k][0])
    ngd_s, ngd_ep = results["NGD"]
    adam_s, adam_ep = results[adam_key]
    benchmark.extra_info.update(
        target=TARGET, ngd_seconds=ngd_s, ngd_epochs=ngd_ep, adam_best=adam_key,
        adam_seconds=adam_s, adam_epochs=adam_ep,
        all={k: {"seconds": s, "epochs": e} for k, (s, e) in results.items()})
    print(f"\ntime to training loss {TARGET} (digits MLP 64-128-128-10 tanh, batch 256, "
          f"{DEVICE}):")
    print(f"{'optimizer':<16}{'epochs':>8}{'seconds':>10}")
    for key, (s, e) in results.items():
        mark = " *" if key in ("NGD", adam_key) else ""
        print(f"{key:<16}{e if e is not None else '-':>8}{s:>10.2f}{mark}")
    assert ngd_ep is not None
