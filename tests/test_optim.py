"""NGD against oracles: the dense float64 step, the LM rule, rejection, schedulers, state_dict
round trips, non-finite guards, argument errors and the digits target."""

from __future__ import annotations

import copy
import io
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from oracles import dense_fisher
from torch import nn

from ngtriton.optim import NGD


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def batch(n: int = 10, dtype: torch.dtype = torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def _drawing_closure(opt, forward, draw):
    """A closure that takes its batch ``(x, y) = draw()`` at every call and runs
    ``forward(x)`` (a closure that fetches its own batch, when ``draw`` does)."""
    def closure():
        x, y = draw()
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        return loss
    return closure


def make_closure(opt, model, x, y, loss_fn=F.cross_entropy):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_identical(a, b):
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("method", ["auto", "cg", "minres", "lsmr"])
def test_one_step_matches_dense_oracle(method):
    model, (x, y) = tiny_mlp(), batch()
    lam = 0.05
    Fd, g = dense_fisher(model, x, y, "categorical")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = theta - torch.linalg.solve(Fd + lam * torch.eye(len(theta), dtype=Fd.dtype), g)
    opt = NGD(model, lr=1.0, damping=lam, method=method, adaptive_damping=False,
              reject_steps=False, tol=1e-12, maxiter=500)
    loss = opt.step(make_closure(opt, model, x, y))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)
    assert float(loss.detach()) == opt.last_stats.loss
    assert opt.last_stats.accepted and opt.damping == lam
    # The gradient the closure left in .grad is still there after the step.
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), g)


def test_weight_decay_enters_the_gradient():
    model, (x, y) = tiny_mlp(), batch()
    lam, wd = 0.1, 0.01
    Fd, g = dense_fisher(model, x, y, "categorical")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rhs = g + wd * theta
    expected = theta - torch.linalg.solve(Fd + lam * torch.eye(len(theta), dtype=Fd.dtype), rhs)
    opt = NGD(model, damping=lam, weight_decay=wd, adaptive_damping=False, reject_steps=False,
              tol=1e-12, maxiter=500, method="cg")
    opt.step(make_closure(opt, model, x, y))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("case", ["uniform", "uniform+decay", "groups+decay", "minres"])
def test_predicted_reduction_matches_the_dense_quadratic(case):
    """ρ's denominator gᵀδ + ½δᵀ(F + λI + W)δ against dense F, for the Galerkin shortcut
    (one lr, CG) and the general path (groups with their own lr and weight decay, MINRES)."""
    model, (x, y) = tiny_mlp(3), batch(seed=4)
    lam = 0.2
    wd = 0.0 if case in ("uniform", "minres") else 0.03
    Fd, g = dense_fisher(model, x, y, "categorical")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    groups = None
    if case == "groups+decay":
        groups = [{"params": model[0].parameters(), "lr": 0.7},
                  {"params": model[2].parameters(), "lr": 0.3, "weight_decay": 0.05}]
    opt = NGD(model, damping=lam, weight_decay=wd, reject_steps=False, tol=1e-12, maxiter=500,
              method="minres" if case == "minres" else "cg", params=groups, lr=0.9)
    opt.step(make_closure(opt, model, x, y))
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta
    decay = torch.cat([torch.full((p.numel(),), grp["weight_decay"], dtype=torch.float64)
                       for grp in opt.param_groups for p in grp["params"]])
    rhs = g + decay * theta
    want = rhs @ delta + 0.5 * (delta @ Fd @ delta + lam * delta @ delta
                                + (decay * delta) @ delta)
    assert opt.last_stats.predicted_reduction == pytest.approx(float(want), rel=1e-7)
    assert opt.last_stats.step_norm == pytest.approx(float(delta.norm()), rel=1e-9)


def test_lm_rule_and_bounds():
    opt = NGD(tiny_mlp(), damping=1.0, damping_floor=0.5, damping_ceiling=2.0)
    opt._update_damping(0.1)
    assert opt.damping == 1.5
    opt._update_damping(0.5)          # 1/4 ≤ ρ ≤ 3/4: unchanged
    assert opt.damping == 1.5
    opt._update_damping(0.9)
    assert opt.damping == pytest.approx(1.0)
    opt._update_damping(float("nan"))  # NaN counts as bad
    assert opt.damping == pytest.approx(1.5)
    opt._update_damping(-1.0)
    assert opt.damping == 2.0          # ceiling
    for _ in range(5):
        opt._update_damping(1.0)
    assert opt.damping == 0.5          # floor


def linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)

    def nll(z, t):
        return 0.5 * (z - t).pow(2).sum(-1).mean()
    return model, x, y, nll


def test_quadratic_good_step_lowers_damping():
    # Linear model + Gaussian likelihood: the loss IS the quadratic model (λ small): ρ ≈ 1.
    model, x, y, nll = linear_regression()
    opt = NGD(model, damping=1e-3, likelihood="gaussian", tol=1e-12, maxiter=100)
    opt.step(make_closure(opt, model, x, y, nll))
    s = opt.last_stats
    assert s.accepted and s.rho > 0.75
    assert opt.damping == pytest.approx(1e-3 * 2 / 3)
    assert s.trial_loss < s.loss


def test_rejected_step_leaves_parameters_bit_identical():
    # lr = 2.5 on a quadratic overshoots: the loss rises, the step must be undone.
    model, x, y, nll = linear_regression()
    before = params_of(model)
    opt = NGD(model, lr=2.5, damping=1e-3, likelihood="gaussian", tol=1e-12, maxiter=100)
    opt.step(make_closure(opt, model, x, y, nll))
    s = opt.last_stats
    assert not s.accepted and s.reason == "rejected" and s.rho < 0.25
    assert s.trial_loss > s.loss
    assert_identical(before, params_of(model))
    assert opt.damping == pytest.approx(1.5e-3) and opt.rejected_total == 1



@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_batchnorm_running_statistics_are_updated_once_per_step(fraction):
    # The build and the trial forward run the model again on the batch; the running statistics
    # must still be those of the closure's forward alone, as with any other optimizer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = batch(32, dtype=torch.float32)
    opt = NGD(model, curvature_fraction=fraction)
    reasons = set()
    for _ in range(4):
        ref = copy.deepcopy(model)
        ref(x)  # one train-mode forward at the parameters the closure sees
        opt.step(make_closure(opt, model, x, y))
        reasons.add(opt.last_stats.reason)
        for name, buf in ref[1].named_buffers():
            assert torch.equal(model[1].get_buffer(name), buf), name
    assert int(model[1].num_batches_tracked) == 4 and "accepted" in reasons


@pytest.mark.parametrize("backend", ["auto", "autograd"])  # autograd: the build draws too
@pytest.mark.parametrize("trial", [True, False])
def test_trial_replays_the_closures_random_draws(backend, trial):
    # A closure that draws its own batch through a model with dropout: the trial loss must be
    # the loss of the same batch under the same masks at the new parameters, and the global
    # generator must end where one call of the closure leaves it, with or without a trial.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    data_x, data_y = batch(64)
    # reject_steps=False keeps the step, so the new parameters can be checked
    opt = NGD(model, reject_steps=False, adaptive_damping=trial, backend=backend)

    def closure():
        opt.zero_grad()
        idx = torch.randint(0, 64, (16,))
        loss = F.cross_entropy(model(data_x[idx]), data_y[idx])
        loss.backward()
        return loss

    for seed in range(3):
        torch.manual_seed(seed)
        opt.step(closure)
        after_step = torch.rand(4)
        torch.manual_seed(seed)
        with torch.no_grad():
            idx = torch.randint(0, 64, (16,))
            expected = F.cross_entropy(model(data_x[idx]), data_y[idx]).item()
        assert torch.equal(torch.rand(4), after_step)  # one closure call's worth of draws
        assert opt.last_stats.accepted
        if trial:
            assert opt.last_stats.trial_loss == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_step_leaves_no_operator_behind(monkeypatch):
    # The step's Fisher operator (and the forward it caches) must be freed when the step returns,
    # by reference counting alone: no cycle through the guard around its products.
    import gc

    import ngtriton.optim.step as optim_module

    built = []

    class Tracked(optim_module.FisherOperator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr(optim_module, "FisherOperator", Tracked)
    model = tiny_mlp()
    x, y = batch()
    opt = NGD(model)
    gc.disable()
    try:
        for _ in range(3):
            opt.step(make_closure(opt, model, x, y))
        assert len(built) == 3 and all(ref() is None for ref in built)
    finally:
        gc.enable()


def test_huge_finite_parameters_are_not_mistaken_for_an_overflow():
    # float32 weights of 1.5e38 that the inputs never reach (their column of x is 0): a float32
    # sum over them overflows, yet every value is finite, so the step must not be skipped.
    model = tiny_mlp(dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    x[:, 0] = 0.0
    with torch.no_grad():
        model[0].weight[:, 0] = 1.5e38
    huge = model[0].weight[:, 0].clone()
    opt = NGD(model)
    opt.step(make_closure(opt, model, x, y))
    s = opt.last_stats
    assert s.reason in ("accepted", "rejected") and s.step_norm >= 0.0 and opt.skipped_total == 0
    assert torch.equal(model[0].weight[:, 0], huge)  # no gradient there: left as they were
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["cg", "auto"])  # auto: dual-direct on this small batch
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_workspace_is_reused_and_changes_nothing(dtype, method):
    # Two identical runs; one drops its workspace before every step (fresh buffers, as without
    # one). The parameters agree bit for bit, and the kept buffers keep their storage.
    x, y = batch(dtype=dtype)
    runs = []
    for fresh in (False, True):
        model = tiny_mlp(dtype=dtype)
        opt = NGD(model, method=method)
        ptrs = []
        for _ in range(4):
            if fresh:
                opt.workspace.clear()
            opt.step(make_closure(opt, model, x, y))
            ptrs.append({name: buf.data_ptr() for name, buf in opt.workspace.items()})
        runs.append((params_of(model), [h["damping"] for h in opt.history], ptrs))
    assert_identical(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    kept = runs[0][2]
    assert set(kept[0]) == {"g", "restore"} | ({"cg.x", "cg.r", "cg.p"} if method == "cg"
                                                else set())
    assert all(k == kept[0] for k in kept)


@pytest.mark.filterwarnings("ignore:ngtriton. the per-module engine")
def test_trial_evaluation_keeps_grad_mode_for_models_that_differentiate():
    # A model whose forward itself uses autograd (a force field: the gradient of an energy)
    # must still get a trial loss: evaluation turns off the parameters' requires_grad, not
    # grad mode. Its first steps are accepted and lower the loss.
    class Forces(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.energy = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()

        def forward(self, x):
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.energy(x).sum(), x, create_graph=True)[0]

    torch.manual_seed(0)
    model = Forces()
    x = torch.randn(12, 4, dtype=torch.float64)
    target = torch.randn(12, 4, dtype=torch.float64)
    opt = NGD(model, likelihood="gaussian", method="cg")
    seen = []
    model.energy[0].register_forward_hook(lambda m, a, out: seen.append(
        (torch.is_grad_enabled(), m.weight.requires_grad)))
    nll = lambda z, t: 0.5 * (z - t).pow(2).sum(-1).mean()  # noqa: E731
    for _ in range(3):
        opt.step(make_closure(opt, model, x, target, nll))
    assert all(math.isfinite(h["trial_loss"]) for h in opt.history)  # never "cannot evaluate"
    assert opt.history[0]["accepted"] and opt.history[1]["accepted"]
    assert opt.history[1]["trial_loss"] < opt.history[0]["loss"]
    assert all(grad_mode for grad_mode, _ in seen)  # every forward: closure, build, trial
    assert (True, False) in seen  # the trial's: parameters frozen, grad mode on
    assert all(p.requires_grad for p in model.parameters())


def test_grad_after_step_is_the_first_calls_even_with_a_term_outside_the_model():
    # The closure adds a penalty on the parameters outside the model and accumulates into .grad
    # (no zero_grad inside): the trial call must not add into the saved gradient.
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model)

    def objective():
        return F.cross_entropy(model(x), y) + 1e-2 * sum(p.pow(2).sum()
                                                         for p in model.parameters())

    def closure():
        loss = objective()
        loss.backward()
        return loss
    expected = torch.autograd.grad(objective(), list(model.parameters()))
    opt.zero_grad()
    opt.step(closure)
    assert opt.last_stats.accepted
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


def test_a_trial_forward_that_raises_restores_parameters_and_grad_mode():
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model)
    before = params_of(model)
    calls = []

    def closure():
        opt.zero_grad()
        calls.append(1)
        if len(calls) == 2:  # the trial evaluation
            model[0].register_forward_pre_hook(lambda m, a: 1 / 0)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    with pytest.raises(ZeroDivisionError):
        opt.step(closure)
    assert torch.is_grad_enabled()
    assert_identical(before, params_of(model))
    assert opt.steps == 0 and opt.history == []

def test_lr_scheduler_changes_the_step():
    x, y = batch()
    norms = []
    for gamma in (1.0, 0.25):
        model = tiny_mlp()
        opt = NGD(model, damping=0.1, adaptive_damping=False, reject_steps=False, tol=1e-10,
                  maxiter=200, method="cg")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch, g=gamma: g ** epoch)
        opt.step(make_closure(opt, model, x, y))
        sched.step()
        assert opt.param_groups[0]["lr"] == gamma
        start = params_of(model)
        opt.step(make_closure(opt, model, x, y))
        norms.append(math.sqrt(sum(float((a - b).pow(2).sum())
                                   for a, b in zip(params_of(model), start))))
    assert norms[1] == pytest.approx(0.25 * norms[0], rel=1e-6)


def test_param_groups_have_their_own_lr():
    x, y = batch()
    model = tiny_mlp()
    ref = copy.deepcopy(model)
    opt = NGD(model, damping=0.1, adaptive_damping=False, reject_steps=False, tol=1e-10,
              maxiter=200, method="cg",
              params=[{"params": model[0].parameters()},
                      {"params": model[2].parameters(), "lr": 0.0 + 1e-300}])
    opt.step(make_closure(opt, model, x, y))
    assert not torch.equal(model[0].weight, ref[0].weight)
    torch.testing.assert_close(model[2].weight, ref[2].weight)


def run_steps(model, opt, batches):
    for x, y in batches:
        opt.step(make_closure(opt, model, x, y))


def test_state_dict_round_trip_resumes_bit_identically():
    batches = [batch(12, seed=s) for s in range(6)]
    kwargs = {"warm_start": True, "curvature_fraction": 0.5, "fisher": "mc", "weight_decay": 1e-3}
    model = tiny_mlp()
    opt = NGD(model, **kwargs)
    run_steps(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run_steps(model, opt, batches[3:])  # the uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = NGD(resumed, **kwargs, seed=99)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 3 and len(opt2.history) == 3
    run_steps(resumed, opt2, batches[3:])
    assert_identical(params_of(model), params_of(resumed))
    assert opt.damping == opt2.damping

    def untimed(history):
        return [{k: v for k, v in h.items() if k != "time"} for h in history]
    assert untimed(opt.history) == untimed(opt2.history)


def test_nan_loss_is_skipped_and_counted():
    model, (x, y) = tiny_mlp(), batch()
    before = params_of(model)
    opt = NGD(model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss
    opt.step(closure)
    assert_identical(before, params_of(model))
    assert opt.last_stats.reason == "nonfinite_loss" and opt.skipped_total == 1
    assert opt.damping == pytest.approx(0.15)


def test_nan_in_inputs_is_skipped_and_counted():
    model, (x, y) = tiny_mlp(), batch()
    x[3, 1] = float("nan")
    before = params_of(model)
    opt = NGD(model)
    opt.step(make_closure(opt, model, x, y))
    assert_identical(before, params_of(model))
    assert opt.last_stats.reason == "nonfinite_loss" and opt.skipped_total == 1


def test_nan_gradient_is_skipped_and_counted():
    model, (x, y) = tiny_mlp(), batch()
    before = params_of(model)
    opt = NGD(model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model[0].weight.grad[0, 0] = float("inf")
        return loss
    opt.step(closure)
    assert_identical(before, params_of(model))
    assert opt.last_stats.reason == "nonfinite_grad" and opt.skipped_total == 1
    # A good step afterwards still works.
    opt.step(make_closure(opt, model, *batch()))
    assert opt.last_stats.accepted and opt.skipped_total == 1


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"lr": "1"}, TypeError, "lr"),
    ({"damping": -0.1}, ValueError, "damping"),
    ({"likelihood": "poisson"}, ValueError, "likelihood"),
    ({"fisher": "kfac"}, ValueError, "fisher"),
    ({"method": "gmres"}, ValueError, "method"),
    ({"backend": "jax"}, ValueError, "backend"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ({"damping_floor": 1.0, "damping_ceiling": 0.5}, ValueError, "damping_ceiling"),
    ({"damping": 0.0}, ValueError, "damping"),
    ({"maxiter": 0}, ValueError, "maxiter"),
    ({"tol": 0.0}, ValueError, "tol"),
    ({"curvature_fraction": 1.5}, ValueError, "curvature_fraction"),
    ({"damping_increase": 0.9}, ValueError, "damping_increase"),
])
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}:"):
        NGD(tiny_mlp(), **kwargs)


def test_bad_model_and_closure():
    with pytest.raises(TypeError, match=r"^model:"):
        NGD(torch.zeros(3))
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"^model:"):
        NGD(frozen)
    with pytest.raises(ValueError, match=r"^params:"):
        NGD(tiny_mlp(), params=[nn.Parameter(torch.zeros(2))])
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model)
    with pytest.raises(TypeError, match=r"^closure:"):
        opt.step()

    def no_loss():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"^closure:"):
        opt.step(no_loss)

    def no_model():
        return torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"^closure:"):
        opt.step(no_model)
    # damping 0 is fine when it is fixed (the minimum-norm natural gradient)
    NGD(tiny_mlp(), damping=0.0, adaptive_damping=False)


@pytest.mark.filterwarnings("ignore:ngtriton. the per-module engine")
def test_keyword_inputs_and_subsample_run():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_mlp()

        def forward(self, x, scale=1.0):
            return self.net(x) * scale

    model, (x, y) = KW(), batch(16)
    opt = NGD(model, curvature_fraction=0.5)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x, scale=2.0), y)
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    assert opt.steps == 3 and all(h["reason"] in ("accepted", "rejected") for h in opt.history)
    assert opt.history[-1]["loss"] < opt.history[0]["loss"]


def _digits_runs(ngd_epochs):
    pytest.importorskip("sklearn")
    from ngtriton.demo import load_digits_data, train

    data = load_digits_data()
    _, adam = train("adam", data, epochs=3)
    _, ngd = train("ngd", data, epochs=ngd_epochs)
    return adam, ngd


def test_digits_target():
    """Defaults only: 3 epochs of NGD reach ≤ 1/3 of Adam's (lr 3e-3) training loss at test
    accuracy ≥ 93 %."""
    adam, ngd = _digits_runs(3)
    assert ngd.losses[3] <= adam.losses[3] / 3
    assert ngd.accuracies[3] >= 0.93


@pytest.mark.slow
def test_digits_stability_20_epochs():
    """Over 20 epochs, once at the target (0.05), the loss never exceeds twice its best."""
    _, ngd = _digits_runs(20)
    target = 0.05
    reached = next(i for i, loss in enumerate(ngd.losses) if loss <= target)
    for i in range(reached + 1, len(ngd.losses)):
        assert ngd.losses[i] <= 2 * min(ngd.losses[:i])
    assert ngd.accuracies[-1] >= 0.93


# --- what users do around the step --------------------------------------------------------

def test_zero_grad_also_clears_parameters_in_no_group():
    """Parameters left out of ``params=`` stay fixed but their .grad is part of g: the closure's
    opt.zero_grad() must clear it, or it accumulates across steps and skews every later step."""
    batches = [batch(10, seed=s) for s in range(4)]
    runs = []
    for zero in ("opt", "model"):
        model = tiny_mlp()
        opt = NGD(model, params=model[2].parameters())
        for x, y in batches:
            opt.step(make_closure(opt if zero == "opt" else model, model, x, y))  # who zeroes
        runs.append((params_of(model), [h["grad_norm"] for h in opt.history]))
    assert_identical(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    model = tiny_mlp()
    opt = NGD(model, params=model[2].parameters())
    opt.step(make_closure(opt, model, *batches[0]))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_freezing_and_unfreezing_layers_between_steps():
    """requires_grad changes after NGD was built: a frozen layer leaves F and stays put; an
    unfrozen one joins F, and moves once its parameters are in a group."""
    batches = [batch(10, seed=s) for s in range(6)]
    model = tiny_mlp()
    model[0].requires_grad_(False)  # frozen from the start: in no group
    opt = NGD(model, damping=0.1, adaptive_damping=False, reject_steps=False, tol=1e-12,
              maxiter=200, method="cg")
    opt.step(make_closure(opt, model, *batches[0]))
    first = params_of(model[0])
    model[0].requires_grad_(True)  # joins F, but is in no group: fixed
    x, y = batches[1]
    Fd, g = dense_fisher(model, x, y, "categorical")
    n = torch.linalg.solve(Fd + 0.1 * torch.eye(len(g), dtype=Fd.dtype), g)
    theta = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()])
    opt.step(make_closure(opt, model, x, y))
    assert_identical(first, params_of(model[0]))
    got = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()])
    torch.testing.assert_close(got, theta - n[-theta.numel():], rtol=1e-8, atol=1e-10)
    opt.add_param_group({"params": model[0].parameters()})  # progressive unfreezing
    opt.step(make_closure(opt, model, *batches[2]))
    assert not torch.equal(first[0], model[0].weight)
    model[2].requires_grad_(False)  # freeze the head: it stays put, the rest still trains
    head = params_of(model[2])
    for xb, yb in batches[3:]:
        opt.step(make_closure(opt, model, xb, yb))
    assert_identical(head, params_of(model[2]))
    assert all(h["accepted"] for h in opt.history)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="model: has no trainable parameters"):
        opt.step(make_closure(opt, model, *batches[0]))


def _closure_differentiating(kind, opt, model, x, y):
    params = list(model.parameters())

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if kind == "plain":
            loss.backward()
        elif kind == "autograd.grad":
            for p, gr in zip(params, torch.autograd.grad(loss, params)):
                p.grad = gr
        elif kind == "filtered":  # "the trainable ones", as read at call time: none in a trial
            trainable = [p for p in model.parameters() if p.requires_grad]
            for p, gr in zip(trainable, torch.autograd.grad(loss, trainable)):
                p.grad = gr
        else:
            loss.backward(inputs=params)
        return loss
    return closure


@pytest.mark.parametrize("style", ["autograd.grad", "backward(inputs=)", "filtered"])
def test_closures_that_differentiate_the_parameters_themselves(style):
    """A closure that sets .grad by autograd.grad(loss, params) (or backward(inputs=params))
    cannot run in the trial's evaluation mode: its trial runs as it is, and the trajectory is
    the one of an ordinary closure, bit for bit."""
    batches = [batch(10, seed=s) for s in range(4)]
    runs = []
    for kind in ("plain", style):
        model = tiny_mlp()
        opt = NGD(model)
        for x, y in batches:
            opt.step(_closure_differentiating(kind, opt, model, x, y))
        runs.append((params_of(model), [h["trial_loss"] for h in opt.history],
                     [h["reason"] for h in opt.history]))
    assert runs[1][2] == runs[0][2] and "accepted" in runs[0][2]
    assert runs[1][1] == runs[0][1]
    assert_identical(runs[0][0], runs[1][0])


def test_grad_after_step_survives_a_closure_that_zeroes_in_place():
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert opt.last_stats.accepted
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


def test_dual_method_runs_on_batches_beyond_the_direct_size():
    """method='dual' in NGD is the exact sample-space solve at any size (its gradient comes from
    the closure, so there is no factor b for the Krylov variant)."""
    model, (x, y) = tiny_mlp(), batch(200)  # R = 200 × 3 rows > 512
    lam = 0.05
    Fd, g = dense_fisher(model, x, y, "categorical")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = theta - torch.linalg.solve(Fd + lam * torch.eye(len(theta), dtype=Fd.dtype), g)
    opt = NGD(model, damping=lam, method="dual", adaptive_damping=False, reject_steps=False)
    opt.step(make_closure(opt, model, x, y))
    assert opt.last_stats.method == "dual-direct"
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", ["cg", "minres", "lsmr", "dual"])
def test_a_gradient_whose_norm_overflows_is_skipped_by_every_method(method):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(16, 4) * 1e18
    with torch.no_grad():
        y = model(x) * (1 + 1e-3)
    before = params_of(model)
    opt = NGD(model, likelihood="gaussian", method=method)
    opt.step(make_closure(opt, model, x, y, lambda z, t: 0.5 * (z - t).pow(2).sum(-1).mean()))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert opt.last_stats.reason == "nonfinite_grad" and opt.skipped_total == 1
    assert_identical(before, params_of(model))


def test_negative_weight_decay_set_in_param_groups_is_refused():
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model)
    opt.param_groups[0]["weight_decay"] = -1e-3
    with pytest.raises(ValueError, match=r"weight_decay: param_groups\[0\]\['weight_decay'\]"):
        opt.step(make_closure(opt, model, x, y))
    assert opt.steps == 0


def _saved(**kwargs):
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model, **kwargs)
    for _ in range(2):
        opt.step(make_closure(opt, model, x, y))
    return model, opt, opt.state_dict()


@pytest.mark.parametrize(("spoil", "words"), [
    (lambda sd: sd["ngd"].pop("generator"), "lacks ['generator']"),
    (lambda sd: sd["ngd"].update(damping=float("nan")), "['damping'] must be finite"),
    (lambda sd: sd["ngd"].update(damping=-1.0), "['damping'] must be finite"),
    (lambda sd: sd["ngd"].update(steps="many"), "['steps'] must be an integer"),
    (lambda sd: sd["ngd"].update(history=[{"step": 1}]), "['history'][0] is malformed"),
    (lambda sd: sd["state"][0].update(warm_start=torch.zeros(5)), "has shape (5,)"),
])
def test_a_malformed_state_dict_is_refused_and_changes_nothing(spoil, words):
    _, _, sd = _saved(warm_start=True)
    spoil(sd)
    model = tiny_mlp(seed=3)
    opt = NGD(model, lr=0.5, damping=0.7)
    fresh = opt.state_dict()
    with pytest.raises(ValueError, match="state_dict: ") as info:
        opt.load_state_dict(sd)
    assert words in str(info.value)
    assert opt.damping == 0.7 and opt.steps == 0 and opt.param_groups[0]["lr"] == 0.5
    assert opt.state_dict()["state"] == fresh["state"] == {}


def test_loaded_damping_is_kept_within_the_new_bounds_and_last_stats_survive():
    _, old, sd = _saved(keep_history=False)
    assert old.history == [] and old.last_stats is not None
    model = tiny_mlp()
    opt = NGD(model, damping=1.0, damping_floor=0.5, keep_history=False)
    opt.load_state_dict(sd)
    assert old.damping < 0.5 and opt.damping == 0.5
    assert opt.last_stats == old.last_stats


class _Masked(nn.Module):
    """A model given a tensor by keyword (an attention mask, a scale): common, and traceable."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x, scale=None, shift=0.0):
        return self.net(x) * scale + shift


def _assert_exact_step(model, call, x, y, lam=0.05):
    """One NGD step at fixed λ with CG to 1e-12, whose closure runs ``call(x)``, equals the
    dense oracle's θ − (F + λI)⁻¹g of ``x ↦ call(x)``."""
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return call(x)
    Fd, g = dense_fisher(Fixed(), x, y, "categorical")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = theta - torch.linalg.solve(Fd + lam * torch.eye(len(theta), dtype=Fd.dtype), g)
    opt = NGD(model, damping=lam, adaptive_damping=False, reject_steps=False, tol=1e-12,
              maxiter=500, method="cg")
    opt.step(_drawing_closure(opt, call, lambda: (x, y)))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["keyword", "keyword-only"])
def test_keyword_tensor_inputs_use_the_engine_and_match_the_oracle(kind, recwarn):
    """Keyword arguments are folded into positional ones where forward's signature allows, so
    the per-module engine (not the whole-model fallback) builds the Fisher; a keyword-only
    parameter keeps the binding wrapper, which fx cannot trace and the ATen capture can. Either
    way the engine builds, and the step is the dense oracle's."""
    model, (x, y) = _Masked(), batch(12)
    if kind == "keyword-only":
        model.forward = lambda x, *, scale: _Masked.forward(model, x, scale)
    scale = torch.rand(12, 1, dtype=torch.float64) + 0.5
    _assert_exact_step(model, lambda x: model(x, scale=scale), x, y)
    fallbacks = [w for w in recwarn if "falling back" in str(w.message)]
    assert fallbacks == []


class _DictBatch(nn.Module):
    """A model fed a dict batch with a list inside, as data loaders of records produce."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, batch):
        scale, shift = batch["affine"]
        return self.net(batch["x"]) * scale + shift


def test_a_trial_on_another_batch_warns_once(recwarn):
    """A closure that fetches its own batch (a loader's iterator) makes the trial measure ρ on
    the next batch: NGD says so, once. Equal tensors rebuilt by the closure, or a batch drawn
    from torch's generator (replayed for the trial), are the same batch: no warning."""
    model = tiny_mlp()
    batches = iter([batch(8, seed=s) for s in range(8)])
    opt = NGD(model)
    for _ in range(3):
        opt.step(_drawing_closure(opt, model, lambda: next(batches)))
    other = [w for w in recwarn if "other inputs than the first call" in str(w.message)]
    assert len(other) == 1 and other[0].filename == __file__
    recwarn.clear()
    x, y = batch(8)
    nan_x = x.clone()
    nan_x[0, 0] = math.nan  # NaN ≠ NaN, yet a copy of it is the same batch
    model = _NanToNum()
    for draws in (lambda: (x.clone(), y), lambda: (torch.randn(8, 4, dtype=x.dtype), y),
                  lambda: (nan_x.clone(), y)):
        opt = NGD(model)
        for _ in range(2):
            opt.step(_drawing_closure(opt, model, draws))
        assert opt.last_stats.trial_loss == opt.last_stats.trial_loss  # a trial ran
    assert not [w for w in recwarn if "other inputs" in str(w.message)]


class _NanToNum(nn.Module):
    """Inputs with missing values (NaN), which the model replaces."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x):
        return self.net(torch.nan_to_num(x))


class _Graph(nn.Module):
    """Node features through a sparse adjacency the closure builds: torch cannot compare
    sparse tensors, so the trial's batch check must not try."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, adj):
        return self.out(torch.tanh(torch.sparse.mm(adj, self.lin(x))))


@pytest.mark.filterwarnings("ignore:ngtriton. the per-module engine")
def test_sparse_inputs_rebuilt_by_the_closure_step_and_a_scheduler_keeps_warnings_in_user_code(
        recwarn):
    torch.manual_seed(3)
    model, (x, y) = _Graph().double(), batch(8)
    edges = torch.randint(0, 8, (2, 20))
    opt = NGD(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    def with_new_adjacency(xb):
        return model(xb, torch.sparse_coo_tensor(edges, torch.ones(20, dtype=xb.dtype), (8, 8)))
    for _ in range(2):
        opt.step(_drawing_closure(opt, with_new_adjacency, lambda: (x, y)))
        scheduler.step()
    assert opt.steps == 2 and opt.history[-1]["loss"] < opt.history[0]["loss"]
    assert not [w for w in recwarn if "other inputs" in str(w.message)]
    fetched = iter([batch(8, seed=s) for s in range(4)])
    opt.step(_drawing_closure(opt, with_new_adjacency, lambda: next(fetched)))
    other = [w for w in recwarn if "other inputs" in str(w.message)]
    assert len(other) == 1 and other[0].filename == __file__


def test_container_inputs_use_the_engine_and_match_the_oracle(recwarn):
    model, (x, y) = _DictBatch(), batch(12)
    affine = [torch.rand(12, 1, dtype=torch.float64) + 0.5, 0.25]
    _assert_exact_step(model, lambda x: model({"x": x, "affine": affine}), x, y)
    assert not [w for w in recwarn if "falling back" in str(w.message)]


def test_curvature_subsample_takes_the_same_rows_inside_containers():
    model, (x, y) = _DictBatch(), batch(20)
    rows = torch.arange(20, dtype=torch.float64)
    x[:, 0] = rows
    per_feature = torch.rand(4, dtype=torch.float64)  # not batched, and first in the dict
    inputs = ({"w": per_feature, "x": x, "affine": [rows[:, None], 1.0]},)
    opt = NGD(model, curvature_fraction=0.25)
    (got,), kwargs, targets = opt._curvature_inputs(inputs, {"mask": [rows]}, rows)
    taken = targets
    assert taken.shape == (5,) and len(set(taken.tolist())) == 5
    assert torch.equal(got["x"][:, 0], taken) and torch.equal(got["affine"][0][:, 0], taken)
    assert got["affine"][1] == 1.0 and torch.equal(kwargs["mask"][0], taken)
    assert got["w"] is per_feature
    # Through a step, the batch size is the model output's: the per-feature tensor stays whole.
    opt.step(make_closure(opt, model, {"w": per_feature, "x": x, "affine": [1.5, 0.0]}, y))
    assert opt.last_stats.reason in ("accepted", "rejected")
    # Tensors inside containers are the model's business: another dtype there is no error.
    opt.step(make_closure(opt, model, {"x": x, "affine": [rows[:, None].float(), 0.0]}, y))
    assert opt.steps == 2
    # Flattened (B·T, V) logits: no input has B·T rows, the batch is the inputs' B ...
    tokens = torch.randn(20, 3, 4, dtype=torch.float64)
    opt._batch_rows = 60
    (got,), _, _ = opt._curvature_inputs((tokens,), {}, None)
    assert got.shape == (5, 3, 4)
    # ... and targets with one row per position (B·T of them) follow their sequences ...
    per_position = torch.arange(60.0)
    (got,), _, kept = opt._curvature_inputs((tokens,), {}, per_position)
    assert got.shape == (5, 3, 4) and kept.shape == (15,)
    seqs = (kept.reshape(5, 3)[:, 0] / 3).long()
    torch.testing.assert_close(got, tokens[seqs])
    torch.testing.assert_close(kept, per_position.reshape(20, 3)[seqs].reshape(-1))
    # ... unless the inputs disagree on B: then nothing is subsampled, and NGD says so once.
    memory = torch.randn(7, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="curvature_fraction: the batch dimension is unclear"):
        (_, got), _, kept = opt._curvature_inputs((memory, tokens), {}, per_position)
    assert got is tokens and kept is per_position
    (got_memory, got_tokens), _, _ = opt._curvature_inputs((memory, tokens), {}, None)
    assert got_memory is memory and got_tokens is tokens
    opt._batch_rows = 20  # (B, T, V) logits, (B·T,) targets: the targets cannot follow
    (got,), _, kept = opt._curvature_inputs((tokens,), {}, torch.zeros(60))
    assert got is tokens and kept.shape == (60,)


_SCALE = torch.tensor(2.0)


class _DefaultScale(nn.Module):
    """A tensor default (float32 on a float64 model) that keyword calls leave alone."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x, scale=_SCALE, **kwargs):
        return self.net(x) * scale


def test_tensor_defaults_are_not_folded_into_inputs():
    model, (x, y) = _DefaultScale(), batch(12)
    opt = NGD(model)
    opt.step(_drawing_closure(opt, lambda xb: model(x=xb), lambda: (x, y)))
    assert opt.last_stats.reason in ("accepted", "rejected")


class _HFStyle(nn.Module):
    """``forward(input, attention_mask=None, **kwargs)`` called as ``model(**batch)``."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x, attention_mask=None, **kwargs):
        out = self.net(x)
        return out if attention_mask is None else out * attention_mask


def test_a_batch_dict_unpacked_into_keywords_uses_the_engine(recwarn):
    model, (x, y) = _HFStyle(), batch(12)
    mask = torch.rand(12, 1, dtype=torch.float64) + 0.5
    _assert_exact_step(model, lambda x: model(**{"x": x, "attention_mask": mask}), x, y)
    assert not [w for w in recwarn if "falling back" in str(w.message)]


def test_unfrozen_layers_with_warm_start_checkpoint_and_new_modules_join_groups():
    """A layer unfrozen without a group joins F with a zero warm start (its state is not kept:
    torch's state_dict maps grouped parameters only); a head swapped in after construction can
    be given a group."""
    batches = [batch(10, seed=s) for s in range(4)]
    model = tiny_mlp()
    model[0].requires_grad_(False)
    opt = NGD(model, warm_start=True)
    opt.step(make_closure(opt, model, *batches[0]))
    model[0].requires_grad_(True)
    opt.step(make_closure(opt, model, *batches[1]))
    assert "warm_start" not in opt.state.get(model[0].weight, {})
    state = opt.state_dict()
    opt.load_state_dict(state)
    torch.manual_seed(9)
    model[2] = nn.Linear(6, 3).double()  # a new head: in F at once, moved once in a group
    head = params_of(model[2])
    opt.step(make_closure(opt, model, *batches[2]))
    assert_identical(head, params_of(model[2]))
    opt.add_param_group({"params": model[2].parameters()})
    opt.step(make_closure(opt, model, *batches[3]))
    assert not torch.equal(head[0], model[2].weight)
