"""Reliability of NGD: hard but valid problems, checkpoints and reproducibility, clear errors
for bad arguments, and hypothesis properties of the whole step (fault injection itself is in
test_faults.py)."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import dense_fisher
from test_optim import make_closure
from torch import nn

from ngtriton import FisherOperator, natural_gradient, solve
from ngtriton.demo import make_mlp
from ngtriton.fisher import FISHER_TYPES
from ngtriton.likelihoods import LIKELIHOODS
from ngtriton.linearize import BACKENDS
from ngtriton.optim import (
    NGD,
    NGD_METHODS,
    NONFINITE_MODES,
    WARM_START_METHODS,
    NonFiniteError,
)
from ngtriton.solvers import METHODS

SOLVE_METHODS = ["auto", "cg", "minres", "lsmr", "dual"]
_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32}


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bit_identical(a, b) -> bool:
    return all(torch.equal(u.view(_INT_VIEW[u.dtype]), v.view(_INT_VIEW[v.dtype]))
               for u, v in zip(a, b))


def mlp(widths, act=nn.Tanh, seed=0, dtype=torch.float64) -> nn.Sequential:
    return make_mlp(widths, seed=seed, activation=act).to(dtype)


def data(n, d, classes, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=dtype),
            torch.randint(0, classes, (n,), generator=gen))


def loss_of(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# --- hard but valid problems, at the level of NGD -------------------------------------------

def duplicated_units():
    model = mlp([3, 4, 3], seed=0)
    with torch.no_grad():  # units 0 and 1 identical, in and out: F exactly singular
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[:, 1] = model[2].weight[:, 0]
    return model, *data(30, 3, 3)


def dead_relus_batch_of_one():
    model = mlp([3, 6, 2], act=nn.ReLU, seed=1)
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # three dead units
    return model, *data(1, 3, 2, seed=2)


@pytest.mark.parametrize("method", SOLVE_METHODS)
@pytest.mark.parametrize("case", [duplicated_units, dead_relus_batch_of_one])
def test_singular_fisher_at_damping_zero_takes_the_min_norm_step(case, method):
    """λ = 0 (fixed) on an exactly singular F: NGD moves by exactly −F⁺g (the dense pinv)."""
    model, x, y = case()
    F_ref, g = dense_fisher(model, x, y, "categorical")
    want = flat(model.parameters()) - torch.linalg.pinv(F_ref, hermitian=True, rtol=1e-10) @ g
    opt = NGD(model, damping=0.0, adaptive_damping=False, reject_steps=False, method=method,
              tol=1e-12, maxiter=500)
    before = snapshot(model)
    opt.step(make_closure(opt, model, x, y))
    got = flat(model.parameters())
    assert torch.isfinite(got).all() and opt.last_stats.accepted
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.norm()))
    if case is duplicated_units:  # twins stay twins
        torch.testing.assert_close(model[0].weight[0], model[0].weight[1])
    else:  # no update flows into the dead units' incoming weights: bit for bit unchanged
        assert bit_identical([model[0].weight[:3]], [before[0][:3]])


@pytest.mark.parametrize("method", SOLVE_METHODS)
@pytest.mark.parametrize("case", [duplicated_units, dead_relus_batch_of_one])
def test_singular_fisher_with_zero_damping_floor_trains(case, method):
    """Adaptive damping that may reach 0 on a singular F: every step finite, the loss falls."""
    model, x, y = case()
    opt = NGD(model, damping=0.0, damping_floor=0.0, method=method, tol=1e-10, maxiter=200)
    start = loss_of(model, x, y)
    for _ in range(16):  # from λ = 0 a rejection restarts λ at 1e-4, then ×3/2 per rejection
        opt.step(make_closure(opt, model, x, y))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert opt.last_stats.reason in ("accepted", "rejected")
    assert opt.skipped_total == 0 and loss_of(model, x, y) < start


def test_bad_step_raises_the_damping_from_zero():
    """With damping_floor = 0 a rejected step must still raise λ (0·3/2 would stay 0)."""
    model, x, y = duplicated_units()
    opt = NGD(model, lr=50.0, damping=0.0, damping_floor=0.0)  # lr 50 overshoots
    opt.step(make_closure(opt, model, x, y))
    assert opt.last_stats.reason == "rejected" and opt.damping > 0


@pytest.mark.parametrize("method", SOLVE_METHODS)
def test_zero_gradient_is_a_zero_step(method):
    torch.manual_seed(2)
    model = mlp([3, 4, 2], seed=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)  # a perfect fit: g = 0 exactly
    opt = NGD(model, damping=0.0, damping_floor=0.0, likelihood="gaussian", method=method)
    before = snapshot(model)
    opt.step(make_closure(opt, model, x, y, lambda z, t: 0.5 * (z - t).pow(2).sum(-1).mean()))
    s = opt.last_stats
    assert bit_identical(before, snapshot(model))
    assert s.accepted and s.grad_norm == 0 and s.step_norm == 0 and opt.damping == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", SOLVE_METHODS)
def test_confidently_wrong_softmax(method, dtype):
    model = mlp([3, 5, 4], seed=4, dtype=dtype)
    with torch.no_grad():
        model[2].weight.mul_(30.0)
    x = torch.randn(16, 3, dtype=dtype, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmin(-1)  # the least likely class: p_y is tiny, the loss is huge
    start = loss_of(model, x, y)
    assert start > 10
    opt = NGD(model, method=method)
    for _ in range(5):
        opt.step(make_closure(opt, model, x, y))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        s = opt.last_stats
        assert s.reason in ("accepted", "rejected") and math.isfinite(s.step_norm)
    assert opt.skipped_total == 0 and loss_of(model, x, y) < 0.5 * start


# --- checkpoints and reproducibility --------------------------------------------------------

OPTIONS = {"fisher": "mc", "curvature_fraction": 0.5, "warm_start": True, "weight_decay": 1e-3}


def untimed(history):
    """Histories without wall-clock times, with NaN made comparable."""
    return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
             for k, v in h.items() if k != "time"} for h in history]


def test_same_seed_same_trajectory():
    batches = [data(16, 4, 3, seed=s) for s in range(5)]
    runs = []
    for _ in range(2):
        model = mlp([4, 6, 3], seed=7)
        opt = NGD(model, seed=11, **OPTIONS)
        for x, y in batches:
            opt.step(make_closure(opt, model, x, y))
        runs.append((snapshot(model), untimed(opt.history), opt.damping))
    assert bit_identical(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]
    # A different seed draws other Monte-Carlo labels and subsamples: another trajectory.
    model = mlp([4, 6, 3], seed=7)
    opt = NGD(model, seed=12, **OPTIONS)
    for x, y in batches:
        opt.step(make_closure(opt, model, x, y))
    assert not bit_identical(runs[0][0], snapshot(model))


def save_load(model, opt) -> dict:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def poisoned(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("mode", NONFINITE_MODES)
def test_resume_after_a_skipped_step(mode):
    """Checkpoint right after a skipped (or raised) step: the resumed run is bit-identical."""
    batches = [data(12, 4, 3, seed=s) for s in range(6)]
    model = mlp([4, 6, 3], seed=3)
    opt = NGD(model, nonfinite=mode, **OPTIONS)
    for x, y in batches[:2]:
        opt.step(make_closure(opt, model, x, y))
    try:
        opt.step(poisoned(opt, model, *batches[2]))
    except NonFiniteError:
        assert mode == "raise"
    assert opt.last_stats.reason == "nonfinite_loss" and opt.skipped_total == 1
    ckpt = save_load(model, opt)
    for x, y in batches[3:]:
        opt.step(make_closure(opt, model, x, y))

    resumed = mlp([4, 6, 3], seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = NGD(resumed, nonfinite=mode, seed=5, **OPTIONS)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.last_stats.reason == "nonfinite_loss" and opt2.skipped_total == 1
    for x, y in batches[3:]:
        opt2.step(make_closure(opt2, resumed, x, y))
    assert bit_identical(snapshot(model), snapshot(resumed))
    assert untimed(opt.history) == untimed(opt2.history) and opt.damping == opt2.damping


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_carries_on_like_the_original(how):
    """copy.deepcopy / pickle of an NGD gives a working optimizer over the copied model, whose
    trajectory from there is the original's, bit for bit (warm start and MC labels included)."""
    batches = [data(12, 4, 3, seed=s) for s in range(5)]
    model = mlp([4, 6, 3], seed=3)
    opt = NGD(model, **OPTIONS)
    opt.register_step_post_hook(lambda *_: None)  # hooks are not carried (as torch's)
    for x, y in batches[:2]:
        opt.step(make_closure(opt, model, x, y))
    copy_ = (copy.deepcopy(opt) if how == "deepcopy"
             else pickle.loads(pickle.dumps(opt)))
    twin = copy_.model
    assert twin is not model
    assert all(a is b for a, b in zip(copy_.param_groups[0]["params"], twin.parameters()))
    assert copy_.damping == opt.damping and copy_.steps == opt.steps == 2
    assert not copy_._optimizer_step_post_hooks
    for x, y in batches[2:]:
        opt.step(make_closure(opt, model, x, y))
        copy_.step(make_closure(copy_, twin, x, y))
    assert bit_identical(snapshot(model), snapshot(twin))
    assert untimed(opt.history) == untimed(copy_.history) and opt.damping == copy_.damping
    assert copy_.state_dict()["ngd"]["steps"] == 5


def test_resume_after_a_rejected_step():
    # Linear regression with lr 2.5 overshoots until the damping has grown: rejections first.
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def nll(z, t):
        return 0.5 * (z - t).pow(2).sum(-1).mean()

    def fresh():
        torch.manual_seed(1)
        return nn.Linear(3, 2).double()
    model = fresh()
    opt = NGD(model, lr=2.5, damping=0.05, likelihood="gaussian", method="cg", tol=1e-12,
              maxiter=50)
    opt.step(make_closure(opt, model, x, y, nll))
    assert opt.last_stats.reason == "rejected"
    ckpt = save_load(model, opt)
    for _ in range(12):
        opt.step(make_closure(opt, model, x, y, nll))
    reasons = {h["reason"] for h in opt.history}
    assert reasons == {"accepted", "rejected"}

    resumed = fresh()
    resumed.load_state_dict(ckpt["model"])
    opt2 = NGD(resumed, lr=2.5, damping=1.0, likelihood="gaussian", method="cg", tol=1e-12,
               maxiter=50)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.rejected_total == 1 and opt2.damping == opt.history[0]["next_damping"]
    for _ in range(12):
        opt2.step(make_closure(opt2, resumed, x, y, nll))
    assert bit_identical(snapshot(model), snapshot(resumed))
    assert untimed(opt.history) == untimed(opt2.history)


# --- bad arguments: the message names the argument and the accepted values -------------------

def tiny():
    return mlp([4, 6, 3])


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"lr": 0.0}, ValueError, ["lr:", "> 0", "0.0"]),
    ({"lr": -1e-3}, ValueError, ["lr:", "> 0"]),
    ({"damping": -1.0}, ValueError, ["damping:", "≥ 0"]),
    ({"likelihood": "poisson"}, ValueError, ["likelihood:", "'poisson'", *LIKELIHOODS]),
    ({"likelihood": 3}, ValueError, ["likelihood:", *LIKELIHOODS]),
    ({"fisher": "kfac"}, ValueError, ["fisher:", "'kfac'", *FISHER_TYPES]),
    ({"method": "gmres"}, ValueError, ["method:", "'gmres'", *NGD_METHODS]),
    ({"method": "dual-krylov"}, ValueError, ["method:", "gradient factor b", "'dual'"]),
    ({"method": "lsmr", "warm_start": True}, ValueError,
     ["warm_start:", "'lsmr'", *WARM_START_METHODS]),
    ({"method": "dual", "warm_start": True}, ValueError, ["warm_start:", "'dual'"]),
    ({"backend": "jax"}, ValueError, ["backend:", "'jax'", *BACKENDS]),
    ({"nonfinite": "ignore"}, ValueError, ["nonfinite:", "'ignore'", *NONFINITE_MODES]),
])
def test_ngd_argument_errors_name_argument_and_choices(kwargs, error, words):
    with pytest.raises(error) as info:
        NGD(tiny(), **kwargs)
    msg = str(info.value)
    assert msg.startswith(words[0]), msg
    for w in words[1:]:
        assert w in msg, (w, msg)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"likelihood": "poisson"}, ["likelihood:", *LIKELIHOODS]),
    ({"fisher": "kfac"}, ["fisher:", *FISHER_TYPES]),
    ({"backend": "jax"}, ["backend:", *BACKENDS]),
    ({"method": "gmres"}, ["method:", *METHODS]),
    ({"damping": -0.5}, ["damping:", "≥ 0"]),
])
def test_natural_gradient_argument_errors(kwargs, words):
    x, y = data(5, 4, 3)
    with pytest.raises(ValueError) as info:
        natural_gradient(tiny(), x, y, **kwargs)
    msg = str(info.value)
    assert msg.startswith(words[0]) and all(w in msg for w in words[1:]), msg


def test_solve_method_error_lists_methods():
    x, y = data(5, 4, 3)
    op = FisherOperator(tiny(), x, targets=y)
    with pytest.raises(ValueError) as info:
        solve(op, method="bicgstab")
    assert str(info.value).startswith("method:") and all(m in str(info.value) for m in METHODS)


@pytest.mark.parametrize(("likelihood", "targets", "words"), [
    ("categorical", torch.tensor([0, 1, 3, 2, 0]), ["targets:", "[0, 2]", "3"]),
    ("categorical", torch.tensor([0, -1, 1, 2, 0]), ["targets:", "[0, 2]"]),
    ("categorical", torch.zeros(5, 3, dtype=torch.long), ["targets:", "5", "(5, 3)"]),
    ("categorical", torch.zeros(5), ["targets:", "integer"]),
    ("gaussian", torch.zeros(5, 2, dtype=torch.float64), ["targets:", "(5, 3)"]),
    ("gaussian", torch.zeros(5, 3, dtype=torch.long), ["targets:", "floating"]),
    ("bernoulli", torch.full((5, 3), 2.0, dtype=torch.float64), ["targets:", "[0, 1]"]),
    ("categorical", [0, 1, 2, 0, 1], ["targets:", "Tensor"]),
    # as many values as the outputs, laid out otherwise: no silent reshape
    ("gaussian", torch.zeros(3, 5, dtype=torch.float64), ["targets:", "(5, 3)", "(3, 5)"]),
    ("bernoulli", torch.zeros(15, dtype=torch.float64), ["targets:", "(5, 3)", "(15,)"]),
    ("categorical", torch.zeros(5, 1, dtype=torch.long), ["targets:", "5", "(5, 1)"]),
])
def test_targets_that_do_not_fit_the_likelihood(likelihood, targets, words):
    x, _ = data(5, 4, 3)
    with pytest.raises((ValueError, TypeError)) as info:
        natural_gradient(tiny(), x, targets, likelihood=likelihood)
    msg = str(info.value)
    assert msg.startswith(words[0]) and all(w in msg for w in words[1:]), msg


def test_targets_shaped_like_sequence_outputs_or_single_outputs_are_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)  # outputs (3, 5, 2): 15 examples
    y = torch.rand(3, 5, 2, dtype=torch.float64)
    flat = FisherOperator(model, x.reshape(15, 4), "gaussian", targets=y.reshape(15, 2))
    op = FisherOperator(model, x, "gaussian", targets=y)
    torch.testing.assert_close(op.gradient(), flat.gradient())
    with pytest.raises(ValueError, match=r"targets: expected the shape of the outputs"):
        FisherOperator(model, x, "gaussian", targets=y.transpose(0, 1))
    one = nn.Linear(4, 1).double()  # one output per example: (N,) targets as torch's losses take
    z = torch.rand(5, dtype=torch.float64)
    op = FisherOperator(one, x[0], "bernoulli", targets=z)
    torch.testing.assert_close(op.targets, z.reshape(5, 1))


def test_categorical_over_a_single_logit_is_refused():
    with pytest.raises(ValueError, match="likelihood: 'categorical' needs at least 2 outputs"):
        FisherOperator(nn.Linear(4, 1).double(), torch.randn(5, 4, dtype=torch.float64))


def assert_untouched(opt, model, before, state):
    assert bit_identical(before, snapshot(model))
    assert (opt.steps, opt.damping, len(opt.history), opt.skipped_total) == state


def ngd_and_state(**kwargs):
    model = tiny()
    opt = NGD(model, **kwargs)
    x, y = data(8, 4, 3)
    opt.step(make_closure(opt, model, x, y), targets=y if opt.fisher == "empirical" else None)
    return model, opt, x, y, snapshot(model), (opt.steps, opt.damping, len(opt.history),
                                               opt.skipped_total)


def test_empirical_fisher_targets_out_of_range_leave_state_intact():
    model, opt, x, _, before, state = ngd_and_state(fisher="empirical")
    bad = torch.tensor([0, 1, 2, 5, 0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"^targets: class indices must lie in \[0, 2\]"):
        opt.step(make_closure(opt, model, x, bad.clamp(max=2)), targets=bad)
    assert_untouched(opt, model, before, state)
    with pytest.raises(TypeError, match=r"^targets: expected a torch.Tensor"):
        opt.step(make_closure(opt, model, x, bad.clamp(max=2)), targets=[0, 1])


def test_empirical_fisher_with_curvature_subsample():
    """The subsample must take the same rows of the targets as of the inputs."""
    model = tiny()
    opt = NGD(model, fisher="empirical", curvature_fraction=0.5)
    x, y = data(16, 4, 3)
    start = loss_of(model, x, y)
    for _ in range(3):
        opt.step(make_closure(opt, model, x, y), targets=y)
    assert opt.skipped_total == 0 and loss_of(model, x, y) < start


def test_model_without_parameters():
    with pytest.raises(ValueError, match=r"^model: has no trainable parameters"):
        NGD(nn.Tanh())
    with pytest.raises(ValueError, match=r"^model: has no trainable parameters"):
        natural_gradient(nn.Sequential(nn.ReLU()), torch.randn(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module"):
        NGD(lambda x: x)


def test_inputs_on_another_dtype_or_device():
    model, opt, x, y, before, state = ngd_and_state()
    with pytest.raises(ValueError, match=r"^inputs\[0\]: .*torch.float32.*torch.float64"):
        opt.step(make_closure(opt, model, x.float(), y))
    assert_untouched(opt, model, before, state)
    with pytest.raises(ValueError, match=r"^inputs\[0\]: .*device meta.*cpu"):
        opt.step(make_closure(opt, model, x.to("meta"), y))
    assert_untouched(opt, model, before, state)
    with pytest.raises(ValueError, match=r"^inputs\[0\]: dtype torch.float32"):
        FisherOperator(model, x.float(), targets=y)
    with pytest.raises(ValueError, match=r"^inputs\[0\]: on device meta"):
        natural_gradient(model, x.to("meta"), y)


@pytest.mark.parametrize(("returns", "error", "pattern"), [
    ("none", ValueError, r"^closure: returned None"),
    ("vector", ValueError, r"^closure: must return a scalar loss, got shape \(8,\)"),
    ("string", TypeError, r"^closure: must return the loss as a Tensor or a number, got str"),
    ("no_backward", ValueError, r"^closure: no parameter has a \.grad"),
])
def test_bad_closures_leave_everything_intact(returns, error, pattern):
    model, opt, x, y, before, state = ngd_and_state()

    def closure():
        opt.zero_grad()
        per_example = F.cross_entropy(model(x), y, reduction="none")
        if returns != "no_backward":
            per_example.sum().backward()
        return {"none": None, "vector": per_example, "string": "0.5",
                "no_backward": per_example.mean()}[returns]
    with pytest.raises(error, match=pattern):
        opt.step(closure)
    assert_untouched(opt, model, before, state)
    opt.step(make_closure(opt, model, x, y))  # and the optimizer still works
    assert opt.steps == state[0] + 1


def test_closure_that_raises_leaves_everything_intact():
    model, opt, _, _, before, state = ngd_and_state(fisher="mc", curvature_fraction=0.5)
    gen_state = opt._generator.get_state()

    def closure():
        raise KeyError("batch")
    with pytest.raises(KeyError):
        opt.step(closure)
    assert_untouched(opt, model, before, state)
    assert torch.equal(gen_state, opt._generator.get_state())


def test_out_of_range_class_in_the_closure_leaves_everything_intact():
    """NGD never sees the labels of an exact-Fisher closure: torch's own error in the user's
    loss reaches the caller, and nothing of the step has happened."""
    model, opt, x, y, before, state = ngd_and_state()
    bad = y.clone()
    bad[2] = 7
    with pytest.raises(IndexError, match="out of bounds"):
        opt.step(make_closure(opt, model, x, bad))
    assert_untouched(opt, model, before, state)


def test_bad_lr_in_param_groups():
    model = tiny()
    opt = NGD(model, params=[{"params": model[0].parameters()}])
    with pytest.raises(ValueError, match=r"^lr:"):
        opt.add_param_group({"params": model[2].parameters(), "lr": -1.0})
    with pytest.raises(ValueError, match=r"^params:"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5})
    x, y = data(8, 4, 3)
    before = snapshot(model)
    opt.param_groups[1]["lr"] = float("nan")  # e.g. a broken scheduler
    with pytest.raises(ValueError, match=r"^lr: param_groups\[1\]\['lr'\]"):
        opt.step(make_closure(opt, model, x, y))
    assert bit_identical(before, snapshot(model)) and opt.steps == 0


def test_nonfinite_error_is_a_floating_point_error_naming_the_quantity():
    model, opt, x, y, before, _ = ngd_and_state(nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"^loss: the closure returned nan.*inputs\[0\]"):
        xb = x.clone()
        xb[0, 0] = float("nan")
        opt.step(make_closure(opt, model, xb, y))
    assert bit_identical(before, snapshot(model))
    assert opt.skipped_total == 1 and opt.history[-1]["reason"] == "nonfinite_loss"


# --- hypothesis: the whole step -------------------------------------------------------------

STEP_CASES = st.fixed_dictionaries({
    "likelihood": st.sampled_from(["categorical", "gaussian", "bernoulli"]),
    "method": st.sampled_from(SOLVE_METHODS),
    "n": st.integers(1, 10),
    "width": st.integers(1, 5),
    "damping": st.sampled_from([0.0, 1e-3, 1.0]),
    "lr": st.sampled_from([0.5, 1.0, 3.0]),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "fault": st.sampled_from([None, None, "input_nan", "grad_inf", "loss_inf"]),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=40, deadline=None)
@given(STEP_CASES)
def test_step_invariants(case):
    """Any small problem, any solver, with or without a fault: after one step the parameters are
    either bit for bit the old ones (skipped, rejected, zero step) or finite new ones whose loss
    is not higher; a fault is always skipped; the loss returned is the closure's."""
    torch.manual_seed(case["seed"])
    dtype, n, lik = case["dtype"], case["n"], case["likelihood"]
    m = 3
    model = mlp([2, case["width"], m], seed=case["seed"], dtype=dtype)
    x = torch.randn(n, 2, dtype=dtype)
    if lik == "categorical":
        y, loss_fn = torch.randint(0, m, (n,)), F.cross_entropy
    elif lik == "gaussian":
        y = torch.randn(n, m, dtype=dtype)

        def loss_fn(z, t):
            return 0.5 * (z - t).pow(2).sum(-1).mean()
    else:
        y = torch.randint(0, 2, (n, m)).to(dtype)

        def loss_fn(z, t):
            return F.binary_cross_entropy_with_logits(z, t, reduction="none").sum(-1).mean()
    fault = case["fault"]
    if fault == "input_nan":
        x[n - 1, 0] = float("nan")
    opt = NGD(model, lr=case["lr"], damping=case["damping"], damping_floor=0.0,
              likelihood=lik, method=case["method"])
    before = snapshot(model)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if fault == "loss_inf":
            loss = loss + float("inf")
        loss.backward()
        if fault == "grad_inf":
            model[0].weight.grad[0, 0] = float("inf")
        return loss
    loss = opt.step(closure)
    s = opt.last_stats
    value = float(loss.detach())
    assert s.loss == value or (math.isnan(s.loss) and math.isnan(value))
    if fault is not None:
        assert s.reason.startswith("nonfinite_") and opt.skipped_total == 1
        assert bit_identical(before, snapshot(model))
        return
    assert s.reason in ("accepted", "rejected"), s.reason
    if s.reason == "rejected" or s.step_norm == 0:
        assert bit_identical(before, snapshot(model))
    else:
        assert all(torch.isfinite(p).all() for p in model.parameters())
        with torch.no_grad():
            after = float(loss_fn(model(x), y))
        assert after <= s.loss


def test_copies_of_an_optimizer_with_a_scheduler_step_themselves():
    """A scheduler wraps ``opt.step`` on the instance; a deep copy (and a pickle) must not carry
    that wrapper, which would drive the original optimizer."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = NGD(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)

    def closure_of(o, m):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return closure

    opt.step(closure_of(opt, model))
    sched.step()
    twin = copy.deepcopy(opt)
    before = [p.detach().clone() for p in model.parameters()]
    twin.step(closure_of(twin, twin.model))
    assert (opt.steps, twin.steps) == (1, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    revived = pickle.loads(pickle.dumps(opt))
    revived.step(closure_of(revived, revived.model))
    assert (opt.steps, revived.steps) == (1, 2)
