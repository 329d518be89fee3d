"""Workspace: buffers reused by name; CG with a workspace gives bit-identical answers and
allocates nothing new on repeated solves; ``solve`` passes it to CG."""

from __future__ import annotations

import pytest
import torch
from solver_helpers import make_operator

from ngtriton.solvers import Workspace, cg, solve


def test_get_reuses_until_the_request_changes():
    ws = Workspace()
    a = ws.get("v", 10, torch.float32, "cpu")
    assert a.shape == (10,) and a.dtype == torch.float32 and len(ws) == 1
    assert ws.get("v", 10, torch.float32, "cpu").data_ptr() == a.data_ptr()
    assert ws.like("v", torch.zeros(10)).data_ptr() == a.data_ptr()
    b = ws.get("v", 11, torch.float32, "cpu")  # length changed: a new buffer
    assert b.numel() == 11 and ws.nbytes() == 44
    c = ws.get("v", 11, torch.float64, "cpu")  # dtype changed
    assert c.dtype == torch.float64 and ws.nbytes() == 88
    ws.get("w", 3, torch.float32, "cpu")
    assert len(ws) == 2
    ws.clear()
    assert len(ws) == 0 and ws.nbytes() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_cg_with_a_workspace_is_bit_identical_and_reuses_its_vectors(dtype, damping):
    op = make_operator(40, 30, 12, damping=damping, dtype=dtype, seed=5)
    g = op.gradient()
    ref = cg(op.damped_matvec, g, tol=1e-10)
    ws = Workspace()
    first = cg(op.damped_matvec, g, tol=1e-10, workspace=ws)
    assert torch.equal(first.x, ref.x) and first.history == ref.history
    assert first.x.data_ptr() == ws.like("cg.x", g).data_ptr()  # x lives in the workspace
    ptrs = {name: ws.like(f"cg.{name}", g).data_ptr() for name in "xrp"}
    # A second solve on another right-hand side: same storage, still the right answer.
    g2 = torch.randn(g.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    second = cg(op.damped_matvec, g2, tol=1e-10, workspace=ws)
    assert torch.equal(second.x, cg(op.damped_matvec, g2, tol=1e-10).x)
    assert {name: ws.like(f"cg.{name}", g).data_ptr() for name in "xrp"} == ptrs
    assert len(ws) == 3


def test_cg_workspace_with_a_warm_start_and_device_loop():
    op = make_operator(30, 20, 5, damping=0.1, seed=12)
    g = op.gradient()
    x0 = 0.1 * torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for check_every in (1, 3):
        ref = cg(op.damped_matvec, g, x0=x0, check_every=check_every)
        got = cg(op.damped_matvec, g, x0=x0, check_every=check_every, workspace=Workspace())
        assert torch.equal(got.x, ref.x) and got.iterations == ref.iterations
    assert x0.abs().sum() > 0  # the warm start itself is not overwritten


def test_solve_hands_the_workspace_to_cg_only():
    op = make_operator(30, 24, 8, damping=0.2, seed=4)
    ws = Workspace()
    res = solve(op, op.gradient(), method="cg", tol=1e-10, workspace=ws)
    assert len(ws) == 3 and res.x.data_ptr() == ws.like("cg.x", res.x).data_ptr()
    other = Workspace()
    res = solve(op, op.gradient(), method="minres", tol=1e-10, workspace=other)
    assert len(other) == 0 and res.converged


def test_cg_copes_with_a_right_hand_side_or_warm_start_from_its_own_workspace():
    # Solving again with b (or x0) = the previous result.x, which lives in the workspace.
    op = make_operator(30, 24, 8, damping=0.2, seed=6)
    ws = Workspace()
    first = cg(op.damped_matvec, op.gradient(), tol=1e-10, workspace=ws)
    b = first.x.clone()
    again = cg(op.damped_matvec, first.x, tol=1e-10, workspace=ws)
    assert torch.equal(again.x, cg(op.damped_matvec, b, tol=1e-10).x) and again.iterations > 0
    g = op.gradient()
    first = cg(op.damped_matvec, g, tol=1e-3, workspace=ws)
    x0 = first.x.clone()
    warm = cg(op.damped_matvec, g, x0=first.x, tol=1e-10, workspace=ws)
    assert torch.equal(warm.x, cg(op.damped_matvec, g, x0=x0, tol=1e-10).x)


def test_a_workspace_of_the_wrong_type_is_named():
    op = make_operator(10, 6, damping=0.1)
    g = op.gradient()
    with pytest.raises(TypeError, match=r"^workspace:"):
        cg(op.damped_matvec, g, workspace={})
    with pytest.raises(TypeError, match=r"^workspace:"):
        solve(op, g, method="minres", workspace="cg")
