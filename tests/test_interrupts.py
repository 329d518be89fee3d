"""An interrupt at any line of a step leaves NGD and its model exactly as before the call or
exactly as after it (issue 15).

``sys.settrace`` raises ``KeyboardInterrupt`` at the k-th 'line' event in ``ngtriton/optim/``
(and, in the slow sweeps, in the solvers, the Fisher operator and the forward record) during one
``opt.step(closure)``, for every k until a step runs to its end (see ``interrupt_sweep.py``).
After each one: the parameters bit for bit, ``requires_grad``, the model's hooks, the BatchNorm
statistics, the grad mode, the optimizer's ``state_dict`` (per-parameter tensors, damping,
counters, generator, history, last statistics) are those of before the call or those of an
uninterrupted step; one more step continues exactly like an uninterrupted run; and a plain
``torch.optim.Adam`` step still moves every parameter.

CI sweeps one configuration at every line and the others at every third or tenth line (~30 s on
2 cores); the ``slow`` marks sweep all of them at every line (~2.5 min), and four of them also
through the solver and Fisher files (~2.5 min).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interrupt_sweep import DEEP_FILES, OPTIM_FILES, Case, sweep
from torch import nn

from ngtriton.optim import NonFiniteError
from ngtriton.optim.closure import ClosureRunner


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(6)] if batchnorm else []
    return nn.Sequential(nn.Linear(4, 6), *norm, nn.Tanh(), nn.Linear(6, 3)).double()


def data(n: int = 10):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


def closure(opt, model, batch):
    x, y = batch

    def user_closure():  # the sweep knows the user's closure by this name
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return user_closure


LOSS = nn.CrossEntropyLoss()  # NGD(loss=LOSS): the closure calls this very module


def loss_closure(opt, model, batch):
    x, y = batch

    def user_closure():
        opt.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        return loss
    return user_closure


def nan_closure(opt, model, batch):
    x, y = batch

    def user_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss * float("nan")
    return user_closure


def reason_is(reason: str):
    def check(opt) -> None:
        assert opt.last_stats.reason == reason, opt.last_stats
    return check


def _uses_the_loss_module(opt) -> None:
    assert opt.loss is LOSS and opt.last_stats.reason == "accepted", opt.last_stats


def _uses_warm_start(opt) -> None:
    assert opt.last_stats.method == "cg" and all("warm_start" in s for s in opt.state.values())


def _uses_pcg_and_momentum(opt) -> None:
    assert opt.last_stats.method == "pcg" and opt.last_stats.momentum != 0.0, opt.last_stats


CASES = {
    "defaults": Case("defaults", lambda: (mlp(), {}, data()), closure,
                     check=reason_is("accepted")),
    "warm_start": Case("warm_start", lambda: (mlp(), {"warm_start": True}, data()), closure,
                       check=_uses_warm_start),
    "curvature_fraction": Case("curvature_fraction",
                               lambda: (mlp(), {"curvature_fraction": 0.5}, data()), closure),
    "batchnorm": Case("batchnorm", lambda: (mlp(batchnorm=True), {}, data()), closure),
    "momentum_adam": Case("momentum_adam", lambda: (
        mlp(), {"momentum": "auto", "preconditioner": "adam"}, data()), closure,
        check=_uses_pcg_and_momentum),
    "nonfinite_raise": Case("nonfinite_raise", lambda: (mlp(), {"nonfinite": "raise"}, data()),
                            nan_closure, expect=NonFiniteError,
                            check=reason_is("nonfinite_loss")),
    "rejected": Case("rejected", lambda: (mlp(), {"lr": 50.0}, data()), closure,
                     check=reason_is("rejected")),
    "loss_module": Case("loss_module", lambda: (mlp(), {"loss": LOSS}, data()), loss_closure,
                        check=_uses_the_loss_module),
}

# CI: (stride, first k) per configuration; the three that run the same lines take every third
# or fourth line event each, from different starts, so that together they interrupt nearly
# every line.
CI_SWEEPS = {"nonfinite_raise": (1, 0), "defaults": (3, 0), "rejected": (3, 1),
             "batchnorm": (4, 2), "warm_start": (10, 0), "curvature_fraction": (10, 3),
             "momentum_adam": (10, 6), "loss_module": (10, 9)}


def _assert_clean(report, stride: int) -> None:
    assert report.points > 0
    if stride == 1:  # every line: both outcomes happen (the commit is a few lines from the end)
        assert report.before and report.after, report
    shown = "\n".join(report.failures[:25])
    assert not report.failures, f"{len(report.failures)} of {report.points} interrupts broke " \
        f"the step:\n{shown}"


@pytest.mark.parametrize("name", list(CI_SWEEPS))
def test_interrupt_sweep(name):
    stride, start = CI_SWEEPS[name]
    _assert_clean(sweep(CASES[name], OPTIM_FILES, stride=stride, start=start), stride)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_interrupt_sweep_every_line(name):
    _assert_clean(sweep(CASES[name], OPTIM_FILES), 1)


# Through the solvers, the Fisher operator and the forward record too: (stride, first k). The
# configurations left out run the same lines there (momentum_adam: PCG, every third line).
DEEP_SWEEPS = {"defaults": (1, 0), "nonfinite_raise": (1, 0), "rejected": (1, 0),
               "momentum_adam": (3, 0)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEEP_SWEEPS))
def test_interrupt_sweep_every_line_with_solvers_and_fisher(name):
    stride, start = DEEP_SWEEPS[name]
    _assert_clean(sweep(CASES[name], DEEP_FILES, stride=stride, start=start), stride)


def test_the_sweep_sees_a_step_that_is_not_atomic(monkeypatch):
    """The sweep is no tautology: with the rollback's model side switched off (hooks,
    requires_grad, grad mode and BatchNorm statistics left as the interrupt found them), it
    reports broken steps."""
    monkeypatch.setattr(ClosureRunner, "abort", lambda self, start: None)
    report = sweep(CASES["defaults"], OPTIM_FILES, stride=5, limit=140)
    assert any("['grad_enabled']" in f for f in report.failures), report.failures[:5]
