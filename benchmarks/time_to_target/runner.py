"""One timed run: a contender trains a problem's model from one seed until its budget.

Only the optimizer is timed: the closure (zero_grad, forward, loss, backward) and ``step``,
with a CUDA synchronisation on each side on a GPU. Fetching the batch and evaluating the
training loss happen between timed steps, off the clock.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
import time
import warnings
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from .contenders import Contender, heavyball_module
from .problems import Problem

# The optimizer's clock: wall time (time.perf_counter), or with ``--clock cpu`` the process's
# CPU time (time.process_time) at one torch thread, which other processes on a shared machine
# do not inflate.
CLOCK = time.perf_counter


def use_clock(kind: str) -> None:
    """Time optimizer steps by ``"wall"`` or ``"cpu"`` (process) time."""
    global CLOCK
    CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}[kind]


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "machine": "cuda" if device.type == "cuda" else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clock": "cpu (process time)" if CLOCK is time.process_time else "wall",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["heavyball"] = None
    if heavyball_module() is not None:
        from importlib.metadata import version

        info["heavyball"] = version("heavyball")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class _Schedule:
    """When to evaluate: after each of the first ``dense`` steps, then whenever the step count
    grew by ``growth``, and before any step that would cross the next mark of an
    ``interval``-second grid (or a checkpoint time), so "loss at t" is measured just before t."""

    def __init__(self, problem: Problem) -> None:
        self.dense, self.growth = problem.eval_dense_steps, problem.eval_growth
        self.interval = problem.eval_interval_s
        self.checkpoints = sorted(problem.checkpoints_s)
        self.next_step = 0
        self.next_time = 0.0

    def due(self, steps: int, seconds: float, last_dt: float) -> bool:
        return steps >= self.next_step or seconds + last_dt > self.next_time

    def done(self, steps: int, seconds: float, last_dt: float) -> None:
        self.next_step = (steps + 1 if steps < self.dense
                          else max(steps + 1, math.ceil(steps * self.growth)))
        horizon = seconds + last_dt
        grid = (math.floor(horizon / self.interval) + 1) * self.interval
        later = [c for c in self.checkpoints if c > horizon]
        self.next_time = min([grid, *later[:1]])


def _ngd_stats(opt: Any) -> dict[str, Any]:
    """NGD's counters and mean solver iterations, as far as this version of NGD reports them."""
    out: dict[str, Any] = {}
    for key in ("rejected_total", "skipped_total", "damping", "steps"):
        value = getattr(opt, key, None)
        if isinstance(value, int | float):
            out[key] = value
    history = getattr(opt, "history", None)
    if history:
        iters = [h.get("iterations") for h in history if isinstance(h, dict)]
        iters = [i for i in iters if isinstance(i, int | float)]
        if iters:
            out["mean_iterations"] = statistics.fmean(iters)
    return out


def _step(opt: Any, contender: Contender, problem: Problem, model: torch.nn.Module,
          batch: Any) -> None:
    """One optimizer step on ``batch``: ``step(closure)`` for NGD, else closure then step."""

    def closure() -> Tensor:
        opt.zero_grad()
        out = problem.loss(model, batch)
        out.backward()
        return out

    if contender.closure_step:
        opt.step(closure)
    else:
        closure()
        opt.step()


def warm_up(problem: Problem, contender: Contender, device: torch.device, steps: int) -> float:
    """``steps`` untimed steps on a throwaway model, so one-time costs of the process (lazy
    initialisation, first calls into a library) do not land on whichever contender runs first;
    per-model costs (NGD's trace of the model) stay in the timed runs. Returns wall seconds."""
    t0 = time.perf_counter()
    model = problem.make_model(0)
    opt = contender.build(model, problem, 0)
    batches = problem.batches(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for _ in range(steps):
                _step(opt, contender, problem, model, next(batches))
        except Exception:  # the timed run meets (and records) the same error
            pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_one(problem: Problem, contender: Contender, seed: int,
            device: torch.device) -> dict[str, Any]:
    """Train ``problem``'s model from ``seed`` with ``contender`` until ``problem.budget_s``
    optimizer seconds or ``problem.max_steps``; returns the curve as ``[seconds, steps, loss]``
    points, how the run ended (``budget``, ``max_steps``, ``diverged`` or ``error: ...``) and
    the warnings it raised, counted by category (recorded, not printed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _run(problem, contender, seed, device)
    if caught:
        run["warnings"] = dict(Counter(w.category.__name__ for w in caught))
        run["first_warning"] = str(caught[0].message)[:300]
    return run


def _run(problem: Problem, contender: Contender, seed: int,
         device: torch.device) -> dict[str, Any]:
    model = problem.make_model(seed)
    opt = contender.build(model, problem, seed)
    batches = problem.batches(seed)
    sched = _Schedule(problem)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    curve: list[list[float]] = []
    seconds, steps, last_dt = 0.0, 0, 0.0
    status = "budget"
    while True:
        if sched.due(steps, seconds, last_dt) or seconds >= problem.budget_s:
            loss = problem.evaluate(model)
            curve.append([seconds, steps, loss])
            sched.done(steps, seconds, last_dt)
            if not math.isfinite(loss):
                status = "diverged"
                break
        if seconds >= problem.budget_s:
            break
        if steps >= problem.max_steps:
            status = "max_steps"
            break
        batch = next(batches)
        sync()
        t0 = CLOCK()
        try:
            _step(opt, contender, problem, model, batch)
        except Exception as err:  # one failing contender must not end the benchmark
            status = f"error: {type(err).__name__}: {err}"[:300]
            break
        sync()
        last_dt = CLOCK() - t0
        seconds += last_dt
        steps += 1
    if status.startswith("error") or (status == "max_steps" and curve[-1][1] != steps):
        curve.append([seconds, steps, problem.evaluate(model)])
    run: dict[str, Any] = {"seed": seed, "status": status, "steps": steps, "seconds": seconds,
                           "curve": curve}
    if contender.family == "ngd":
        run["ngd"] = _ngd_stats(opt)
    return run
