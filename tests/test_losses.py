"""``loss=``: the Fisher is the GGN of exactly torch's loss module, against dense float64 oracles
(torch.func.hessian of the loss module in the outputs, torch.func.jacrev for J) and curvlinops."""

from __future__ import annotations

import pytest
import torch
from loss_oracles import ggn_oracle
from torch import nn

from ngtriton import FisherOperator, LossCapture, natural_gradient
from ngtriton.losses import is_outputs_or_reshape

F64 = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)


class Net(nn.Module):
    """A tanh MLP whose outputs take the layout asked: ``"rows"`` (N, m), ``"dim1"``
    (N, m, d: torch's class layout, by a transpose), ``"dim1x2"`` (N, m, d, d),
    ``"last"`` (N, d, m) or ``"flat"`` (N,) for m = 1."""

    def __init__(self, m: int, layout: str, d: int = 3) -> None:
        super().__init__()
        self.layout, self.d = layout, d
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, m)

    def forward(self, x):
        z = self.b(torch.tanh(self.a(x)))
        if self.layout in ("dim1", "dim1x2"):
            z = z.transpose(1, -1)
        if self.layout == "dim1x2":
            z = z.reshape(z.shape[0], z.shape[1], self.d, -1)
        if self.layout == "flat":
            z = z.squeeze(-1)
        return z


def make(layout: str, m: int, n: int = 5, d: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = Net(m, layout, d).to(F64)
    shape = {"rows": (n, 2), "flat": (n, 2), "dim1": (n, d, 2), "last": (n, d, 2),
             "dim1x2": (n, d * d, 2)}[layout]
    return model, torch.randn(*shape, dtype=F64)


def indices(shape, m, ignore=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, m, shape, generator=gen)
    if ignore is not None:
        y.view(-1)[::3] = ignore  # every third row is padding
    return y


def probabilities(shape, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=gen, dtype=F64), dim=1)


def values(shape, kind, seed=3):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bce":
        return torch.rand(*shape, generator=gen, dtype=F64)
    return torch.randn(*shape, generator=gen, dtype=F64)


def _cases():
    n, m, d = 5, 4, 3
    ce = nn.CrossEntropyLoss
    yield "ce-mean", ce(), "rows", m, indices((n,), m)
    yield "ce-sum", ce(reduction="sum"), "rows", m, indices((n,), m)
    yield "ce-ignore", ce(ignore_index=-100), "rows", m, indices((n,), m, -100)
    yield "ce-ignore-7", ce(ignore_index=2), "rows", m, indices((n,), m, 2)
    yield "ce-smooth-ignore", ce(ignore_index=-1, label_smoothing=0.1), "rows", m, \
        indices((n,), m, -1)
    yield "ce-smooth-sum", ce(reduction="sum", label_smoothing=0.2), "rows", m, indices((n,), m)
    yield "ce-dim1-ignore", ce(ignore_index=-100), "dim1", m, indices((n, d), m, -100)
    yield "ce-dim1-sum", ce(reduction="sum"), "dim1", m, indices((n, d), m)
    yield "ce-dim1x2", ce(label_smoothing=0.1), "dim1x2", m, indices((n, d, d), m)
    yield "ce-dim1-d-eq-C", ce(), "dim1", d, indices((n, d), d)  # d == C: torch's layout
    yield "ce-flat-rows", ce(ignore_index=-100), "last", m, indices((n * d,), m, -100)
    yield "ce-probs", ce(), "rows", m, probabilities((n, m))
    yield "ce-probs-smooth-sum", ce(reduction="sum", label_smoothing=0.1), "rows", m, \
        probabilities((n, m))
    yield "ce-probs-dim1", ce(), "dim1", m, probabilities((n, m, d))
    for red in ("mean", "sum"):
        yield f"mse-{red}", nn.MSELoss(reduction=red), "rows", 3, values((n, 3), "mse")
        yield f"mse-seq-{red}", nn.MSELoss(reduction=red), "last", 3, values((n, d, 3), "mse")
        yield f"bce-{red}", nn.BCEWithLogitsLoss(reduction=red), "rows", 2, values((n, 2), "bce")
        yield f"bce-seq-{red}", nn.BCEWithLogitsLoss(reduction=red), "last", 2, \
            values((n, d, 2), "bce")
    yield "mse-flat", nn.MSELoss(), "flat", 1, values((n,), "mse")
    yield "bce-flat-sum", nn.BCEWithLogitsLoss(reduction="sum"), "flat", 1, values((n,), "bce")
    var = torch.rand(n, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) + 0.1
    yield "gnll-mean", nn.GaussianNLLLoss(), "rows", 3, (values((n, 3), "g"), var)
    yield "gnll-sum-full", nn.GaussianNLLLoss(full=True, reduction="sum"), "rows", 3, \
        (values((n, 3), "g"), var)
    yield "gnll-homoscedastic", nn.GaussianNLLLoss(), "rows", 3, (values((n, 3), "g"), var[:, 0])
    yield "gnll-clamped", nn.GaussianNLLLoss(eps=0.5), "rows", 3, (values((n, 3), "g"), var)


CASES = list(_cases())


def _call(loss, z, targets):
    if isinstance(loss, nn.GaussianNLLLoss):
        return loss(z, *targets)
    if isinstance(loss, nn.CrossEntropyLoss) and z.ndim >= 3 and targets.ndim == 1:
        z = z.reshape(-1, z.shape[-1])  # the closure's logits.view(-1, C), y.view(-1)
    return loss(z, targets)


@pytest.mark.parametrize("backend", ["torch", "autograd"])
@pytest.mark.parametrize(("name", "loss", "layout", "m", "targets"), CASES,
                         ids=[c[0] for c in CASES])
def test_fisher_is_the_ggn_of_the_loss_module(name, loss, layout, m, targets, backend):
    model, x = make(layout, m)
    op = FisherOperator(model, x, loss=loss, targets=targets, backend=backend)
    G, g, value = ggn_oracle(model, (x,), lambda z: _call(loss, z, targets))
    torch.testing.assert_close(op.to_dense(), G, **TOL)
    torch.testing.assert_close(op.gradient(), g, **TOL)
    torch.testing.assert_close(op.loss(), value, **TOL)
    A = op.factor_to_dense()
    torch.testing.assert_close(A.T @ A, G, **TOL)
    b = op.gradient_factor()
    assert b is not None
    torch.testing.assert_close(A.T @ b, g, **TOL)


@pytest.mark.parametrize(("name", "damping"), [
    ("ce-sum", 0.0), ("mse-mean", 0.0), ("ce-sum", 1e-3), ("ce-dim1-ignore", 1e-2),
    ("mse-mean", 1e-2), ("bce-seq-mean", 1e-2), ("ce-smooth-ignore", 1e-1)])
def test_natural_gradient_solves_with_the_loss_ggn(name, damping):
    """The step of ``natural_gradient(loss=...)``: (G + λI)⁻¹g, or G⁺g at λ = 0, in the loss's
    units (the issue measured 35× off for summed CE, 0.5×-0.67× for mean BCE / MSE)."""
    _, loss, layout, m, targets = next(c for c in CASES if c[0] == name)
    model, x = make(layout, m)
    G, g, _ = ggn_oracle(model, (x,), lambda z: _call(loss, z, targets))
    P = G.shape[0]
    want = (torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ g if damping == 0
            else torch.linalg.solve(G + damping * torch.eye(P, dtype=F64), g))
    got = natural_gradient(model, x, targets, loss=loss, damping=damping, tol=1e-12)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in got]), want,
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_empirical_and_mc_fisher_take_the_loss_scale(fisher):
    """Summed CE with padding: the empirical Fisher is Σ over counted rows of Jᵢᵀ gᵢ gᵢᵀ Jᵢ with
    gᵢ the row's loss gradient; the MC one has the exact one's scale in expectation."""
    loss = nn.CrossEntropyLoss(reduction="sum", ignore_index=-100)
    model, x = make("dim1", 4)
    y = indices((5, 3), 4, -100)
    exact = FisherOperator(model, x, loss=loss, targets=y).to_dense()
    if fisher == "empirical":
        op = FisherOperator(model, x, loss=loss, targets=y, fisher="empirical")
        from loss_oracles import dense_jacobian, model_fn

        f, params = model_fn(model, (x,))
        J = dense_jacobian(f, params).reshape(5, 4, 3, -1).movedim(1, 2).reshape(15, 4, -1)
        z = f(*params).detach().movedim(1, 2).reshape(15, 4)
        rows = (y.reshape(-1) != -100).nonzero().squeeze(-1)
        gz = torch.softmax(z, -1) - nn.functional.one_hot(y.reshape(-1).clamp(min=0), 4)
        want = sum(J[i].T @ torch.outer(gz[i], gz[i]) @ J[i] for i in rows.tolist())
        torch.testing.assert_close(op.to_dense(), want, **TOL)
    else:
        gen = torch.Generator().manual_seed(0)
        op = FisherOperator(model, x, loss=loss, targets=y, fisher="mc", mc_samples=800,
                            generator=gen)
        err = (op.to_dense() - exact).norm() / exact.norm()
        assert err < 0.15, float(err)  # ~1/√800 statistical error; a wrong scale is ≥ 0.5


def test_ignored_rows_are_out_of_the_fisher_and_the_mean():
    """Padding rows change nothing: the operator equals the one on the counted rows alone."""
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    model, x = make("rows", 4, n=6)
    y = indices((6,), 4, -100)
    keep = y != -100
    full = FisherOperator(model, x, loss=loss, targets=y)
    sub = FisherOperator(model, x[keep], loss=loss, targets=y[keep])
    torch.testing.assert_close(full.to_dense(), sub.to_dense(), **TOL)
    assert full.num_examples == sub.num_examples == int(keep.sum())
    with pytest.raises(ValueError, match=r"^targets: every target is ignore_index"):
        FisherOperator(model, x, loss=loss, targets=torch.full((6,), -100))


def test_damping_is_in_the_loss_units():
    """A summed loss has R times the mean's Fisher and gradient; its damping is R times less
    strong, so the damped steps agree when λ is scaled by R."""
    model, x = make("rows", 4, n=6)
    y = indices((6,), 4)
    mean = natural_gradient(model, x, y, loss=nn.CrossEntropyLoss(), damping=1e-2, tol=1e-12)
    total = natural_gradient(model, x, y, loss=nn.CrossEntropyLoss(reduction="sum"),
                             damping=6e-2, tol=1e-12)
    for a, b in zip(mean, total):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(("loss", "words"), [
    (nn.CrossEntropyLoss(weight=torch.ones(4, dtype=F64)), "weight="),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(4, dtype=F64)), "pos_weight="),
    (nn.BCEWithLogitsLoss(weight=torch.ones(4, dtype=F64)), "weight="),
    (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
    (nn.MSELoss(reduction="none"), "reduction='none'"),
    (nn.L1Loss(), "expected one of"),
    (nn.NLLLoss(), "expected one of"),
    (lambda z, y: z.sum(), "expected one of"),
])
def test_unsupported_losses_are_refused(loss, words):
    model, x = make("rows", 4)
    with pytest.raises((ValueError, TypeError), match=r"^loss: ") as info:
        FisherOperator(model, x, loss=loss, targets=torch.zeros(5, 4, dtype=F64))
    assert words in str(info.value)


def test_a_loss_subclass_with_its_own_forward_is_refused():
    class Focal(nn.CrossEntropyLoss):
        def forward(self, z, y):
            return super().forward(z, y) ** 2

    model, x = make("rows", 4)
    with pytest.raises(ValueError, match=r"^loss: Focal overrides CrossEntropyLoss.forward"):
        FisherOperator(model, x, loss=Focal(), targets=indices((5,), 4))


@pytest.mark.parametrize(("loss", "layout", "targets", "pattern"), [
    (nn.CrossEntropyLoss(), "dim1", torch.zeros(5, 4, dtype=torch.long), r"^targets: .*\(5, 3\)"),
    (nn.CrossEntropyLoss(), "rows", torch.zeros(5, 4, dtype=F64), r"^targets: class prob"),
    (nn.CrossEntropyLoss(), "rows", torch.full((5,), 7), r"^targets: class indices must lie"),
    (nn.MSELoss(), "rows", torch.zeros(5, 1, dtype=F64), r"^targets: .*broadcast"),
    (nn.MSELoss(), "rows", torch.zeros(5, 4, dtype=torch.long), r"^targets: .*floating"),
    (nn.BCEWithLogitsLoss(), "rows", torch.full((5, 4), 2.0, dtype=F64), r"^targets: .*\[0, 1\]"),
    (nn.GaussianNLLLoss(), "rows", torch.zeros(5, 4, dtype=F64), r"^targets: .*\(target, var\)"),
    (nn.CrossEntropyLoss(), "rows", None, r"^targets: loss= needs"),
])
def test_targets_that_do_not_fit_the_loss_are_refused(loss, layout, targets, pattern):
    model, x = make(layout, 4)
    with pytest.raises((ValueError, TypeError), match=pattern):
        FisherOperator(model, x, loss=loss, targets=targets)


def test_loss_and_likelihood_together_and_a_var_that_depends_on_the_model_are_refused():
    model, x = make("rows", 3)
    with pytest.raises(ValueError, match=r"^loss: give loss= or likelihood="):
        FisherOperator(model, x, "gaussian", loss=nn.MSELoss(), targets=torch.zeros(5, 3))
    var = torch.ones(5, 3, dtype=F64, requires_grad=True) * 2
    with pytest.raises(ValueError, match=r"^loss: GaussianNLLLoss with a var that depends"):
        FisherOperator(model, x, loss=nn.GaussianNLLLoss(),
                       targets=(torch.zeros(5, 3, dtype=F64), var))


def test_categorical_likelihood_on_torch_class_layout_is_not_silent():
    """The issue: outputs (N, C, d) with targets (N, d) were refused when d ≠ C and, when
    d == C, read classes-last with a Fisher 98 % off. Now: an error that points to loss=, and
    a warning where both layouts fit; loss= reads torch's layout exactly."""
    model, x = make("dim1", 4)  # outputs (5, 4, 3)
    with pytest.raises(ValueError, match=r"^targets: .*torch's \(N, C, d…\).*loss="):
        FisherOperator(model, x, "categorical", targets=indices((5, 3), 3))
    model, x = make("dim1", 3)  # outputs (5, 3, 3): both layouts fit
    y = indices((5, 3), 3)
    with pytest.warns(UserWarning, match=r"^targets: .*classes in the last dimension"):
        FisherOperator(model, x, "categorical", targets=y)


@pytest.mark.parametrize("name", ["ce-mean", "ce-sum", "ce-ignore", "ce-smooth-ignore",
                                  "mse-mean", "mse-sum", "bce-mean", "bce-sum", "ce-dim1-ignore",
                                  "mse-seq-mean"])
def test_matches_curvlinops_ggn(name):
    cl = pytest.importorskip("curvlinops")
    _, loss, layout, m, targets = next(c for c in CASES if c[0] == name)
    model, x = make(layout, m)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        ggn = cl.GGNLinearOperator(model, loss, params, [(x, targets)])
        want = ggn @ torch.eye(sum(p.numel() for p in params), dtype=F64)
    except (ValueError, NotImplementedError, RuntimeError) as err:
        pytest.skip(f"curvlinops does not have this case: {err}")
    got = FisherOperator(model, x, loss=loss, targets=targets).to_dense()
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=F64), **TOL)


def test_loss_capture_records_what_the_closure_passed():
    """NGD's way to the targets: a pre-hook on the loss module while the closure runs."""
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    model, x = make("last", 4)  # outputs (5, 3, 4)
    y = indices((5, 3), 4, -100)
    seen = {}
    handle = model.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with LossCapture(loss) as cap:
        z = model(x)
        value = loss(z.view(-1, 4), target=y.view(-1))  # keyword target
    handle.remove()
    assert cap.calls == 1 and cap.targets is not None
    assert is_outputs_or_reshape(cap.input, seen["out"])
    assert not is_outputs_or_reshape(seen["out"][:, :-1], seen["out"])  # a shift: another loss
    assert not is_outputs_or_reshape(seen["out"].transpose(1, 2), seen["out"])
    op = FisherOperator(model, x, loss=loss, targets=cap.targets)
    torch.testing.assert_close(op.loss(), value.detach(), rtol=1e-12, atol=0)
    G, g, _ = ggn_oracle(model, (x,), lambda z: loss(z.reshape(-1, 4), y.view(-1)))
    torch.testing.assert_close(op.gradient(), g, **TOL)
    torch.testing.assert_close(op.to_dense(), G, **TOL)
    loss(z.view(-1, 4), y.view(-1))  # after the block: not recorded
    assert cap.calls == 1

    gnll = nn.GaussianNLLLoss()
    var = torch.ones(5, 3, 4, dtype=F64)
    with LossCapture(gnll) as cap:
        gnll(z, torch.zeros_like(z), var)
    assert cap.targets[1] is var
    with pytest.raises(TypeError, match=r"^loss: expected one of"):
        LossCapture(nn.L1Loss())
