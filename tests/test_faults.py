"""Fault injection: NaN/Inf at every stage of an NGD step, in both ``nonfinite`` modes.

Every fault is checked for real: the parameters are compared bit for bit before and after the
faulty step, the optimizer must book (or raise) the right reason, and a clean step afterwards
must still work. The outcome of each fault goes into ``FAULT_RECORD``; the
``pytest_terminal_summary`` hook in ``conftest.py`` prints the totals at the end of the run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngtriton.optim.step as optim_mod
from ngtriton.fisher import FisherOperator
from ngtriton.optim import NGD, NonFiniteError

# Filled by the tests, read by conftest.pytest_terminal_summary.
FAULT_RECORD: dict[str, list] = {"tried": [], "survived": [], "lost": []}


def record(name: str, survived: bool, lost: bool) -> None:
    FAULT_RECORD["tried"].append(name)
    if survived:
        FAULT_RECORD["survived"].append(name)
    if lost:
        FAULT_RECORD["lost"].append(name)


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32}


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit for bit (so -0.0 ≠ 0.0 and NaN payloads count), not merely ==."""
    return len(a) == len(b) and all(
        u.dtype == v.dtype and torch.equal(u.view(_INT_VIEW[u.dtype]), v.view(_INT_VIEW[v.dtype]))
        for u, v in zip(a, b))


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class Problem:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    calls: dict[str, int] = field(default_factory=lambda: {"closure": 0})


def make_problem(dtype: torch.dtype = torch.float64, seed: int = 0, n: int = 12) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return Problem(model, x, y)


def closure_for(opt: NGD, prob: Problem, *, x: torch.Tensor | None = None,
                loss_fault: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                grad_fault: Callable[[nn.Module], None] | None = None) -> Callable:
    """A standard closure; the hooks corrupt the loss (per call number) or the gradient."""
    xb = prob.x if x is None else x

    def closure():
        prob.calls["closure"] += 1
        opt.zero_grad()
        loss = F.cross_entropy(prob.model(xb), prob.y)
        if loss_fault is not None:
            loss = loss_fault(loss, prob.calls["closure"])
        loss.backward()
        if grad_fault is not None:
            grad_fault(prob.model)
        return loss
    return closure


def once(fn: Callable, corrupt: Callable, on_call: int = 1) -> Callable:
    """``fn`` with its ``on_call``-th result corrupted, unchanged otherwise."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        count["n"] += 1
        return corrupt(out) if count["n"] == on_call else out
    wrapper.count = count
    return wrapper


def poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def corrupt(t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        t.view(-1)[0] = value
        return t
    return corrupt


def poison_result(value: float) -> Callable:
    def corrupt(result):
        result.x = poison(value)(result.x)
        return result
    return corrupt


# --- the faults: (name, expected reason, word the error message must contain, injector) -----
# An injector gets (opt, prob, monkeypatch) and returns the closure of the faulty step; any
# patch it installs fires once, so the recovery step afterwards is clean.

def inj_inputs(value: float) -> Callable:
    def inject(opt, prob, mp):
        x = prob.x.clone()
        x[3, 1] = value
        return closure_for(opt, prob, x=x)
    return inject


def inj_loss(value: float) -> Callable:
    return lambda opt, prob, mp: closure_for(opt, prob, loss_fault=lambda loss, c: loss + value)


def inj_grad(value: float) -> Callable:
    def corrupt(model):
        model[2].weight.grad[1, 2] = value
    return lambda opt, prob, mp: closure_for(opt, prob, grad_fault=corrupt)


def inj_product(name: str, value: float, method: str, on_call: int = 1) -> Callable:
    def inject(opt, prob, mp):
        opt.method = method
        mp.setattr(FisherOperator, name, once(getattr(FisherOperator, name), poison(value),
                                              on_call))
        return closure_for(opt, prob)
    return inject


def inj_quadratic(value: float) -> Callable:
    """Poison only the product NGD itself takes for ρ's quadratic model (MINRES: no shortcut)."""
    def inject(opt, prob, mp):
        opt.method = "minres"
        original = FisherOperator.damped_matvec

        def product(self, v):
            out = original(self, v)
            caller = sys._getframe(2).f_code.co_name  # _direction → guard's product → this
            return poison(value)(out) if caller == "_direction" else out

        mp.setattr(FisherOperator, "damped_matvec", product)
        return closure_for(opt, prob)
    return inject


def inj_solver(value: float) -> Callable:
    def inject(opt, prob, mp):
        mp.setattr(optim_mod, "solve", once(optim_mod.solve, poison_result(value)))
        return closure_for(opt, prob)
    return inject


def inj_huge_lr(lr: float) -> Callable:
    def inject(opt, prob, mp):
        mp.setitem(opt.param_groups[0], "lr", lr)
        return closure_for(opt, prob)
    return inject


def inj_trial_loss(value: float) -> Callable:
    # Calls 1-2 are the warm-up step, 3 the faulty step's closure, 4 its trial evaluation.
    return lambda opt, prob, mp: closure_for(
        opt, prob, loss_fault=lambda loss, c: loss * value if c == 4 else loss)


FAULTS = [
    ("inputs NaN", "nonfinite_loss", "inputs[0]", inj_inputs(math.nan)),
    ("inputs Inf", "nonfinite_grad", "gradient", inj_inputs(math.inf)),
    ("loss NaN", "nonfinite_loss", "loss", inj_loss(math.nan)),
    ("loss Inf", "nonfinite_loss", "loss", inj_loss(math.inf)),
    ("gradient NaN", "nonfinite_grad", "2.weight", inj_grad(math.nan)),
    ("gradient -Inf", "nonfinite_grad", "2.weight", inj_grad(-math.inf)),
    ("Fisher product NaN (cg)", "nonfinite_curvature", "Fisher product",
     inj_product("fisher_matvec", math.nan, "cg")),
    ("Fisher product Inf at CG's 3rd product", "nonfinite_curvature", "Fisher product",
     inj_product("fisher_matvec", math.inf, "cg", on_call=3)),
    ("Fisher product Inf (minres)", "nonfinite_curvature", "Fisher product",
     inj_product("fisher_matvec", math.inf, "minres")),
    ("Fisher product NaN (lsmr)", "nonfinite_curvature", "Fisher product",
     inj_product("fisher_matvec", math.nan, "lsmr")),
    ("factor product NaN (dual-direct)", "nonfinite_curvature", "Fisher product",
     inj_product("factor_rmatmat", math.nan, "dual-direct")),
    ("Fisher product NaN in the quadratic model", "nonfinite_curvature", "Fisher product",
     inj_quadratic(math.nan)),
    ("Fisher product NaN in the dual residual check", "nonfinite_curvature", "Fisher product",
     inj_product("fisher_matvec", math.nan, "dual-direct")),
    ("solver result NaN", "nonfinite_solution", "solution", inj_solver(math.nan)),
    ("solver result Inf", "nonfinite_solution", "solution", inj_solver(math.inf)),
    ("step overflow (lr 1e308)", "nonfinite_step", "step", inj_huge_lr(1e308)),
    ("trial loss NaN", "nonfinite_trial_loss", "trial loss", inj_trial_loss(math.nan)),
    ("trial loss Inf", "nonfinite_trial_loss", "trial loss", inj_trial_loss(math.inf)),
]


def run_fault(name: str, mode: str, reason: str, word: str, inject: Callable,
              monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype = torch.float64) -> None:
    prob = make_problem(dtype)
    opt = NGD(prob.model, nonfinite=mode, method="cg")
    opt.step(closure_for(opt, prob))            # warm up: the fault hits a running optimizer
    assert prob.calls["closure"] == 2 and opt.last_stats.accepted
    before, damping, skipped = snapshot(prob.model), opt.damping, opt.skipped_total
    error: BaseException | None = None
    with monkeypatch.context() as mp:
        closure = inject(opt, prob, mp)
        try:
            opt.step(closure)
        except NonFiniteError as err:
            error = err
    intact = bit_identical(before, snapshot(prob.model))
    s = opt.last_stats
    handled = (s.reason == reason and not s.accepted and opt.skipped_total == skipped + 1
               and opt.damping > damping)
    if mode == "raise":
        handled = handled and error is not None and error.reason == reason \
            and isinstance(error, FloatingPointError) and word in str(error)
    else:
        handled = handled and error is None
    # The run goes on: a clean step afterwards moves the parameters to finite values.
    opt.method = "cg"
    opt.step(closure_for(opt, prob))
    recovered = all_finite(prob.model) and opt.last_stats.reason in ("accepted", "rejected")
    record(f"{name} [{mode}]", survived=handled and intact and recovered,
           lost=not intact or not all_finite(prob.model))
    assert intact, f"{name}: the parameters changed"
    assert error is None if mode == "skip" else error is not None, f"{name}: {error!r}"
    assert s.reason == reason, f"{name}: reason {s.reason!r}"
    if error is not None:
        assert word in str(error), str(error)
        assert error.reason == reason and isinstance(error, FloatingPointError)
    assert handled and recovered


@pytest.mark.parametrize("mode", ["skip", "raise"])
@pytest.mark.parametrize(("name", "reason", "word", "inject"), FAULTS,
                         ids=[f[0] for f in FAULTS])
def test_fault(name, reason, word, inject, mode, monkeypatch):
    run_fault(name, mode, reason, word, inject, monkeypatch)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_fault_step_overflow_float32(mode, monkeypatch):
    run_fault("step overflow float32 (lr 1e39)", mode, "nonfinite_step", "step",
              inj_huge_lr(1e39), monkeypatch, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_fault_closure_raises_at_trial_point(mode):
    """Not a non-finite value but an exception inside the trial evaluation: the trial step is
    undone, the exception reaches the caller and the optimizer's state is as before the call."""
    prob = make_problem()
    opt = NGD(prob.model, nonfinite=mode)
    opt.step(closure_for(opt, prob))
    before, state = snapshot(prob.model), (opt.steps, opt.damping, len(opt.history))

    def boom(loss, call):
        if call == 4:
            raise RuntimeError("data loader died")
        return loss
    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure_for(opt, prob, loss_fault=boom))
    intact = bit_identical(before, snapshot(prob.model))
    unchanged = (opt.steps, opt.damping, len(opt.history)) == state
    opt.step(closure_for(opt, prob))
    recovered = all_finite(prob.model) and opt.last_stats.reason in ("accepted", "rejected")
    record(f"closure raises at the trial point [{mode}]", intact and unchanged and recovered,
           not intact)
    assert intact and unchanged and recovered


def test_long_run_with_poisoned_batches_converges(monkeypatch):
    """40 steps, every 4th batch poisoned (a different stage each time): the run skips exactly
    the poisoned steps, never loses its parameters and still drives the loss down."""
    prob = make_problem(n=48, seed=3)
    opt = NGD(prob.model)
    clean = closure_for(opt, prob)
    with torch.no_grad():
        start = float(F.cross_entropy(prob.model(prob.x), prob.y))
    faults = [f for f in FAULTS if f[1] != "nonfinite_trial_loss"]  # those count closure calls
    injected = survived = 0
    for i in range(40):
        if i % 4 != 3:
            opt.step(clean)
            continue
        name, reason, _, inject = faults[(i // 4) % len(faults)]
        before, skipped = snapshot(prob.model), opt.skipped_total
        with monkeypatch.context() as mp:
            opt.step(inject(opt, prob, mp))
        opt.method = "auto"
        injected += 1
        ok = (bit_identical(before, snapshot(prob.model)) and opt.skipped_total == skipped + 1
              and opt.last_stats.reason == reason)
        survived += ok
        record(f"long run, step {i}: {name}", ok, not bit_identical(before, snapshot(prob.model)))
    with torch.no_grad():
        end = float(F.cross_entropy(prob.model(prob.x), prob.y))
    assert survived == injected == 10
    assert opt.skipped_total == injected and all_finite(prob.model)
    assert end < 0.2 * start, (start, end)
