"""NGD's time-to-target levers against dense float64 oracles: the quadratic model's step size
and momentum, the preconditioned truncated solve, the Adam-like diagonal, trial_every."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles import dense_fisher
from torch import nn

from ngtriton.optim import NGD
from ngtriton.optim.preconditioner import AdamDiagonal
from ngtriton.optim.quadratic import minimise_on_plane


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed: int = 1, n: int = 10):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_minimise_on_plane_matches_a_dense_2x2_solve():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        B = torch.randn(2, 2, generator=gen, dtype=torch.float64)
        G = B @ B.T + 0.1 * torch.eye(2, dtype=torch.float64)
        c = torch.randn(2, generator=gen, dtype=torch.float64)
        plane = minimise_on_plane(float(c[0]), float(c[1]), float(G[0, 0]), float(G[0, 1]),
                                  float(G[1, 1]))
        ab = -torch.linalg.solve(G, c)
        assert (plane.a, plane.b) == pytest.approx((float(ab[0]), float(ab[1])), rel=1e-9)
        assert plane.predicted == pytest.approx(float(c @ ab + 0.5 * ab @ G @ ab), rel=1e-9)
    # scale s: the model's value at s·(a, b) is m*(2s − s²)
    half = minimise_on_plane(1.0, 0.0, 2.0, 0.0, 1.0, scale=0.5)
    assert (half.a, half.predicted) == pytest.approx((-0.25, -0.25 * (1 - 0.25)))
    # a degenerate plane (Δ₂ ∥ Δ₁) falls back to Δ₁ alone; no curvature: no step
    assert minimise_on_plane(-1.0, -2.0, 1.0, 2.0, 4.0).b == 0.0
    assert minimise_on_plane(-1.0, 0.0, 0.0, 0.0, 0.0) is None
    assert minimise_on_plane(math.nan, 0.0, 1.0, 0.0, 0.0) is None


def test_adam_diagonal_is_the_running_second_moment():
    rule = AdamDiagonal(beta=0.9, power=0.5, eps=0.0)
    g1, g2 = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])
    v = rule.advance(None, g1)
    torch.testing.assert_close(v, g1.square())
    v = rule.advance(v, g2)
    torch.testing.assert_close(v, 0.9 * g1.square() + 0.1 * g2.square())
    d = rule.diagonal(v)
    assert bool((d > 0).all())  # the zero coordinate is floored, not singular
    torch.testing.assert_close(d[:2], v[:2].sqrt())


def test_momentum_auto_steps_to_the_dense_plane_minimiser():
    """Two steps with momentum="auto" (exact solves, fixed damping): the second step is
    a·(−n) + b·δ₁ with (a, b) minimising gᵀδ + ½δᵀ(F + λI)δ, all dense in float64."""
    model, (x, y) = tiny_mlp(), batch()
    lam = 0.3
    opt = NGD(model, damping=lam, adaptive_damping=False, reject_steps=False, method="cg",
              tol=1e-13, maxiter=500, momentum="auto")
    theta0 = flat(model)
    opt.step(closure_for(opt, model, x, y))
    d1 = flat(model) - theta0
    x2, y2 = batch(seed=7)
    Fd, g = dense_fisher(model, x2, y2, "categorical")
    A = Fd + lam * torch.eye(len(g), dtype=Fd.dtype)
    n = torch.linalg.solve(A, g)
    D = torch.stack([-n, d1], 1)
    ab = -torch.linalg.solve(D.T @ A @ D, D.T @ g)
    expected = flat(model) + D @ ab
    opt.step(closure_for(opt, model, x2, y2))
    torch.testing.assert_close(flat(model), expected, rtol=1e-7, atol=1e-9)
    s = opt.last_stats
    assert (s.alpha, s.momentum) == pytest.approx((float(ab[0]), float(ab[1])), rel=1e-6)
    predicted = float(g @ (D @ ab) + 0.5 * (D @ ab) @ A @ (D @ ab))
    assert s.predicted_reduction == pytest.approx(predicted, rel=1e-7)


def test_fixed_momentum_adds_the_previous_step():
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model, damping=0.5, adaptive_damping=False, reject_steps=False, method="cg",
              tol=1e-13, maxiter=500, momentum=0.5, lr=0.8)
    theta0 = flat(model)
    opt.step(closure_for(opt, model, x, y))
    d1 = flat(model) - theta0
    Fd, g = dense_fisher(model, x, y, "categorical")
    n = torch.linalg.solve(Fd + 0.5 * torch.eye(len(g), dtype=Fd.dtype), g)
    expected = flat(model) - 0.8 * n + 0.5 * d1
    opt.step(closure_for(opt, model, x, y))
    torch.testing.assert_close(flat(model), expected, rtol=1e-8, atol=1e-10)


def test_preconditioned_solve_converges_to_the_same_damped_step():
    """With λ > 0 the system is nonsingular: PCG with any diagonal reaches the dense answer."""
    model, (x, y) = tiny_mlp(), batch()
    lam = 0.05
    Fd, g = dense_fisher(model, x, y, "categorical")
    expected = flat(model) - torch.linalg.solve(Fd + lam * torch.eye(len(g), dtype=Fd.dtype), g)
    opt = NGD(model, damping=lam, adaptive_damping=False, reject_steps=False,
              preconditioner="adam", tol=1e-13, maxiter=500, progress_tol=0.0)
    opt.step(closure_for(opt, model, x, y))
    assert opt.last_stats.method == "pcg"
    torch.testing.assert_close(flat(model), expected, rtol=1e-8, atol=1e-9)
    v = opt.state[next(iter(model.parameters()))]["exp_avg_sq"]
    torch.testing.assert_close(v, next(iter(model.parameters())).grad.square())


def test_preconditioned_solve_at_zero_damping_keeps_the_function_space_step():
    """Over-parametrised, λ = 0: PCG's solution differs from F⁺g but the function-space step
    J·n is the same (up to the per-example logit shift that the softmax cannot see)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x, y = batch(n=3)
    Fd, g = dense_fisher(model, x, y, "categorical")
    J = torch.func.jacrev(lambda th: torch.func.functional_call(
        model, dict(zip([k for k, _ in model.named_parameters()],
                        th.split([p.numel() for p in model.parameters()]))) | {
            k: v.view(p.shape) for (k, p), v in zip(
                model.named_parameters(),
                th.split([p.numel() for p in model.parameters()]))}, (x,)))(flat(model))
    J = J.reshape(-1, J.shape[-1])
    min_norm = torch.linalg.pinv(Fd, rtol=1e-10) @ g
    opt = NGD(model, damping=0.0, damping_floor=0.0, adaptive_damping=False,
              reject_steps=False, preconditioner="adam", tol=1e-12, maxiter=500,
              progress_tol=0.0)
    theta = flat(model)
    opt.step(closure_for(opt, model, x, y))
    n = theta - flat(model)
    assert (n - min_norm).norm() > 1e-3 * min_norm.norm()  # another solution of Fn = g ...
    torch.testing.assert_close(Fd @ n, g, rtol=1e-7, atol=1e-9)

    def centred(v):  # logits up to a shift per example (the softmax cannot see a shift)
        z = (J @ v).reshape(3, 3)
        return z - z.mean(1, keepdim=True)
    torch.testing.assert_close(centred(n), centred(min_norm), rtol=1e-6, atol=1e-8)  # same Jn


def test_trial_every_skips_trials_between_damping_updates():
    model, (x, y) = tiny_mlp(), batch()
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt = NGD(model, reject_steps=False, trial_every=3)
    for _ in range(6):
        opt.step(closure)
    assert calls["n"] == 6 + 2  # trials at steps 3 and 6 only
    rhos = [h["rho"] for h in opt.history]
    assert [math.isnan(r) for r in rhos] == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match="trial_every"):
        NGD(model, trial_every=2)  # rejection needs a trial at every step
    with pytest.raises(TypeError, match="trial_every"):
        NGD(model, reject_steps=False, trial_every=2.5)


def test_new_arguments_are_checked():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="momentum"):
        NGD(model, momentum="fast")
    with pytest.raises(ValueError, match="momentum"):
        NGD(model, momentum=1.5)
    with pytest.raises(ValueError, match="preconditioner"):
        NGD(model, preconditioner="kfac")
    with pytest.raises(ValueError, match="preconditioner"):
        NGD(model, preconditioner="adam", method="minres")
    with pytest.raises(TypeError, match="reject_steps"):
        NGD(model, reject_steps="False")


def test_state_round_trip_with_momentum_and_preconditioner():
    import io
    model, (x, y) = tiny_mlp(), batch()
    opt = NGD(model, momentum="auto", preconditioner="adam", maxiter=3)
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = tiny_mlp(5)
    model2.load_state_dict(ck["m"])
    opt2 = NGD(model2, momentum="auto", preconditioner="adam", maxiter=3)
    opt2.load_state_dict(ck["o"])
    for _ in range(2):
        opt.step(closure_for(opt, model, x, y))
        opt2.step(closure_for(opt2, model2, x, y))
    assert torch.equal(flat(model), flat(model2))
