"""ForwardRecord: the engine reuses a recorded forward only where it is certainly the same value.

Every case compares a build from the record with a build from scratch (and with torch.func via
``check_against_oracle``), and counts the matrix products the build ran to see whether the
record was used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import (
    ACT_FUNCS,
    ACT_MODULES,
    F64,
    FunctionalMLP,
    Residual,
    _CountOps,
    check_against_oracle,
    mlp,
)
from torch import nn

import ngtriton
from ngtriton.linearize import ForwardRecord
from ngtriton.linearize.engine import build_engine


def recorded(model: nn.Module, x: torch.Tensor, closure=None) -> ForwardRecord:
    """Record ``model(x)`` with autograd on, as NGD's closure runs it (loss and backward)."""
    with ForwardRecord(model) as rec:
        out = model(x) if closure is None else closure()
        out.sum().backward()
    return rec


def same_products(a, b, model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in a.params]
    u = torch.randn(a.outputs.shape, generator=gen, dtype=a.outputs.dtype)
    torch.testing.assert_close(a.outputs, b.outputs, rtol=0, atol=0)
    torch.testing.assert_close(a.jvp(v), b.jvp(v), rtol=1e-12, atol=1e-12)
    for ga, gb in zip(a.vjp(u), b.vjp(u)):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def build_counting(model, x, record=None):
    build_engine(model, (x,))  # the trace and its one check against an eager forward, first
    with _CountOps() as ops:
        lin = build_engine(model, (x,), record=record)
    return lin, ops.calls["addmm"] + ops.calls["mm"]


@pytest.mark.parametrize("name", list(ACT_MODULES))
def test_sequential_mlp_reuses_every_linear(name):
    torch.manual_seed(0)
    model = mlp(ACT_MODULES[name]).to(F64)
    x = torch.randn(9, 5, dtype=F64)
    rec = recorded(model, x)
    lin, matmuls = build_counting(model, x, rec)
    fresh, fresh_matmuls = build_counting(model, x)
    assert fresh_matmuls == 3
    # An in-place ReLU overwrites the Linear output it follows: that Linear is recomputed.
    assert matmuls == (2 if name == "relu_inplace" else 0)
    same_products(lin, fresh, model)
    check_against_oracle(model, x)


@pytest.mark.parametrize("name", ["torch.tanh", "F.gelu", "F.relu_inplace", "Tensor.sigmoid"])
def test_functional_activations_match_by_value(name):
    """Activations as functions are not recorded; the next Linear's input is then matched by
    value (torch.equal), so its product is still reused."""
    torch.manual_seed(1)
    model = FunctionalMLP(ACT_FUNCS[name]).to(F64)
    x = torch.randn(6, 5, dtype=F64)
    rec = recorded(model, x)
    lin, matmuls = build_counting(model, x, rec)
    fresh, _ = build_counting(model, x)
    same_products(lin, fresh, model)
    assert matmuls < 3


def test_residual_model_with_layernorm():
    torch.manual_seed(2)
    model = Residual().to(F64)
    x = torch.randn(5, 4, dtype=F64)
    rec = recorded(model, x)
    lin, matmuls = build_counting(model, x, rec)
    fresh, fresh_matmuls = build_counting(model, x)
    same_products(lin, fresh, model)
    assert matmuls < fresh_matmuls


def test_stale_records_are_not_used():
    torch.manual_seed(3)
    model = mlp(nn.Tanh).to(F64)
    x = torch.randn(9, 5, dtype=F64)
    rec = recorded(model, x)
    with torch.no_grad():  # parameters changed after the record: nothing of it is valid
        model[0].weight.add_(0.1)
        model[2].bias.mul_(2.0)
    lin, matmuls = build_counting(model, x, rec)
    assert matmuls == 3  # the last layer is unchanged, but its input is not
    fresh, _ = build_counting(model, x)
    same_products(lin, fresh, model)


def test_other_inputs_and_shared_modules_are_recomputed():
    torch.manual_seed(4)
    model = mlp(nn.Tanh).to(F64)
    x = torch.randn(9, 5, dtype=F64)
    rec = recorded(model, x)
    x2 = torch.randn(9, 5, dtype=F64)
    lin, matmuls = build_counting(model, x2, rec)
    assert matmuls == 3
    same_products(lin, build_counting(model, x2)[0], model)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act = nn.Linear(5, 5), nn.Tanh()

        def forward(self, x):
            return self.act(self.a(self.act(self.a(x))))

    twice = Twice().to(F64)
    rec = recorded(twice, x)
    lin, matmuls = build_counting(twice, x, rec)
    assert matmuls == 2
    check_against_oracle(twice, x)
    same_products(lin, build_counting(twice, x)[0], twice)


def test_modified_output_and_hooked_modules_are_recomputed():
    torch.manual_seed(5)
    model = mlp(nn.Tanh).to(F64)
    x = torch.randn(9, 5, dtype=F64)
    with ForwardRecord(model) as rec:
        out = model(x)
    with torch.no_grad():
        out.mul_(2.0)  # the model's output changed in place after the record
    lin, matmuls = build_counting(model, x, rec)
    assert matmuls == 1
    same_products(lin, build_counting(model, x)[0], model)

    model[2].register_forward_hook(lambda m, a, o: o * 2)  # runs as an opaque node, hook and all
    rec = recorded(model, x)
    lin, matmuls = build_counting(model, x, rec)
    assert matmuls == 3  # the hooked layer's forward and backward; the next one is reused
    same_products(lin, build_counting(model, x)[0], model)


def test_autocast_outputs_are_not_used():
    torch.manual_seed(6)
    model = mlp(nn.Tanh)
    x = torch.randn(9, 5)
    with ForwardRecord(model) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    lin, matmuls = build_counting(model, x, rec)
    assert matmuls == 3
    assert lin.outputs.dtype == torch.float32
    same_products(lin, build_counting(model, x)[0], model)


def test_fisher_operator_and_ngd_use_the_record():
    torch.manual_seed(7)
    model = mlp(nn.Tanh, dims=(6, 12, 12, 4)).to(F64)
    x = torch.randn(16, 6, dtype=F64)
    y = torch.randint(0, 4, (16,))
    with ForwardRecord(model) as rec:
        F.cross_entropy(model(x), y).backward()
    op = ngtriton.FisherOperator(model, x, damping=0.1, record=rec)
    ref = ngtriton.FisherOperator(model, x, damping=0.1)
    torch.testing.assert_close(op.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="record"):
        ngtriton.FisherOperator(model, x, record=object())



def _ngd_run(fraction: float) -> list[torch.Tensor]:
    torch.manual_seed(8)
    net = mlp(nn.Tanh, dims=(6, 12, 12, 4))
    opt = ngtriton.NGD(net, curvature_fraction=fraction)
    xs, ys = torch.randn(32, 6), torch.randint(0, 4, (32,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(xs), ys)
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return [p.detach().clone() for p in net.parameters()]


def test_ngd_records_its_closure(monkeypatch):
    """NGD reuses the closure's forward; without the record (a 'subsample' of the whole batch)
    the same steps are computed from scratch, and the two agree to the last bit."""
    hits = []
    lookup = ForwardRecord.lookup

    def spy(self, module, x):
        out = lookup(self, module, x)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(ForwardRecord, "lookup", spy)
    with_record = _ngd_run(1.0)
    assert hits and all(hits)  # every Linear and activation of every step was reused
    hits.clear()
    without = _ngd_run(0.9999)
    assert not hits
    assert all(torch.equal(a, b) for a, b in zip(with_record, without))


def test_record_argument_errors():
    with pytest.raises(TypeError, match="model"):
        ForwardRecord("not a module")
