"""MINRES and LSMR through the fused Krylov kernels, in the Triton interpreter on the CPU.

On CUDA ``_vecops`` sends the solvers' vector work to ``ngtriton.kernels.krylov``; elsewhere it
runs torch ops. The ``fused`` fixture forces the kernel path for CPU vectors by replacing the
dispatch predicate ``_vecops._fused`` (tests/conftest.py sets ``TRITON_INTERPRET=1`` when there
is no GPU), and makes the kernels' torch references raise, so a silent fallback fails the test.
"""

from __future__ import annotations

import math

import pytest
import scipy.sparse.linalg as spla
import torch
from solver_helpers import RTOL, TOL, make_operator, rel_err

from ngtriton.solvers import _vecops as vo
from ngtriton.solvers import lsmr, minres

pytest.importorskip("triton")
from ngtriton.kernels import krylov as Kr
from ngtriton.kernels import triton_available

if not triton_available():  # pragma: no cover - triton importable but nothing to run it on
    pytest.skip("triton cannot run here (no CUDA, TRITON_INTERPRET unset)", allow_module_level=True)

DTYPES = [torch.float64, torch.float32]
# (R, P, rank): F = AᵀA of full rank (SPD, with damping or R ≥ P) or rank-deficient (PSD)
SYSTEMS = {"spd": (40, 24, None), "singular": (30, 24, 6)}


def _boom(*args, **kwargs):
    raise AssertionError("a torch reference ran instead of the kernel")


def _force_kernels(mp: pytest.MonkeyPatch) -> None:
    """Route ``_vecops`` to the kernels for every vector, and forbid the torch references."""
    mp.setattr(vo, "_fused", lambda x: Kr)
    for name in dir(Kr):
        if name.endswith("_reference"):
            mp.setattr(Kr, name, _boom)


@pytest.fixture
def fused(monkeypatch):
    _force_kernels(monkeypatch)


def _minres(op, **kw):
    kw.setdefault("tol", TOL[op.dtype])
    kw.setdefault("maxiter", 3 * op.num_params)
    return minres(op.damped_matvec, op.gradient(), **kw)


def _lsmr(op, **kw):
    kw.setdefault("tol", TOL[op.dtype])
    kw.setdefault("maxiter", 3 * op.num_params)
    return lsmr(op.factor_matvec, op.factor_rmatvec, op.b, damp=math.sqrt(op.damping), **kw)


def _agree(fused_res, torch_res, dtype):
    assert fused_res.reason == torch_res.reason
    assert abs(fused_res.iterations - torch_res.iterations) <= 1
    assert rel_err(fused_res.x, torch_res.x) < RTOL[dtype]
    n = min(len(fused_res.history), len(torch_res.history))
    torch.testing.assert_close(torch.tensor(fused_res.history[:n]),
                               torch.tensor(torch_res.history[:n]), rtol=1e-3, atol=10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("solver", [_minres, _lsmr], ids=["minres", "lsmr"])
def test_fused_matches_torch_path_and_oracle(solver, system, dtype, monkeypatch):
    op = make_operator(*SYSTEMS[system], dtype=dtype, seed=21)
    torch_res = solver(op)
    with monkeypatch.context() as m:
        _force_kernels(m)
        fused_res = solver(op)
    assert fused_res.converged and fused_res.reason == "converged", fused_res
    assert fused_res.x.dtype == dtype and torch.isfinite(fused_res.x).all()
    _agree(fused_res, torch_res, dtype)
    ref = op.reference(op.gradient())  # pinv(F) g: the minimum-norm solution when singular
    assert rel_err(fused_res.x, ref) < RTOL[dtype]
    null = op.null_basis()
    if null.shape[1]:
        assert float((null.T @ fused_res.x.double()).norm()) < RTOL[dtype] * float(ref.norm())


@pytest.mark.parametrize("system", SYSTEMS)
def test_fused_minres_against_scipy(system, fused):
    op = make_operator(*SYSTEMS[system], seed=22)
    A = op.A.numpy()
    x_sp = spla.minres(A.T @ A, op.gradient().numpy(), rtol=1e-12)[0]
    assert rel_err(_minres(op).x, torch.from_numpy(x_sp)) < 1e-8


@pytest.mark.parametrize("solver", [_minres, _lsmr], ids=["minres", "lsmr"])
def test_fused_check_every_gives_the_same_answer(solver, fused):
    op = make_operator(30, 20, 5, damping=0.1, seed=23)
    ref = solver(op, check_every=1)
    other = solver(op, check_every=4)
    assert torch.equal(other.x, ref.x)
    assert (other.iterations, other.reason, other.history) == (ref.iterations, ref.reason,
                                                              ref.history)


def test_fused_minres_exhaustion_and_lstsq(monkeypatch):
    """Inconsistent diagonal system: stops as 'krylov space exhausted' (or converged with
    ``lstsq``) at the same least-squares iterate as the torch path."""
    d = torch.zeros(20, dtype=torch.float64)
    d[:3] = torch.tensor([1.0, 2.0, 4.0])
    b = torch.ones(20, dtype=torch.float64)
    expected = [minres(lambda v: d * v, b, tol=1e-10, lstsq=ls) for ls in (False, True)]
    _force_kernels(monkeypatch)
    res, ls = (minres(lambda v: d * v, b, tol=1e-10, lstsq=ls) for ls in (False, True))
    assert res.reason == "krylov space exhausted" and res.iterations <= 5
    assert torch.allclose(res.x[:3], 1 / d[:3])
    assert res.residual == pytest.approx(math.sqrt(17 / 20), rel=1e-8)
    assert ls.converged and torch.allclose(ls.x[:3], 1 / d[:3])
    for got, want in zip((res, ls), expected):
        _agree(got, want, torch.float64)


@pytest.mark.parametrize("solver", ["minres", "lsmr"])
@pytest.mark.parametrize("check_every", [1, 3])
def test_fused_nonfinite_products_freeze_the_iterate(solver, check_every, fused):
    op = make_operator(20, 12, seed=4, cond=50.0)
    calls = {"n": 0}

    def bad(v):
        calls["n"] += 1
        out = op.damped_matvec(v)
        return out * float("nan") if calls["n"] > 3 else out

    g = op.gradient()
    if solver == "minres":
        res = minres(bad, g, tol=1e-11, check_every=check_every)
    else:
        res = lsmr(bad, bad, g, tol=1e-11, check_every=check_every)
    assert res.reason == "breakdown" and not res.converged
    assert torch.isfinite(res.x).all() and math.isfinite(res.residual)
    assert res.iterations <= 3


def test_fused_minres_warm_start_and_identity_matvec(fused):
    """``x0`` (r1 = b − M x0 is then a buffer of the solve) and a matvec that returns its
    input, so the product aliases the Lanczos vector that the kernels later overwrite."""
    op = make_operator(30, 20, 5, damping=0.1, seed=12)
    ref = op.reference(op.gradient())
    x0 = ref.clone() + 0.1 * torch.randn(20, dtype=torch.float64)
    res = _minres(op, x0=x0)
    assert res.converged and rel_err(res.x, ref) < 1e-8
    b = torch.arange(1.0, 8.0, dtype=torch.float64)
    for res in (minres(lambda v: v, b), lsmr(lambda v: v, lambda v: v, b)):
        assert res.converged and res.iterations == 1
        torch.testing.assert_close(res.x, b)
