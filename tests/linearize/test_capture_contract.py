"""The ATen capture's contract: cached by what the graph depends on, refused (never wrong) for
a custom autograd.Function and data-dependent control flow, free of side effects on buffers and
generators, and serving NGD's record. Models: ``test_capture.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_capture import F64, NanoGPT, ResNet
from torch import nn

from ngtriton.linearize import linearize
from ngtriton.linearize.base import EngineUnsupported
from ngtriton.linearize.capture import capture, clear_capture_cache
from ngtriton.linearize.engine import build_engine

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# -- the capture's contract --------------------------------------------------------------------

def test_capture_is_cached_by_shape_and_flags(monkeypatch):
    calls = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or export(*a, **k))
    model = NanoGPT().to(F64)
    clear_capture_cache()
    idx = torch.randint(0, 11, (2, 6))
    for _ in range(3):
        build_engine(model, (idx,))
    assert len(calls) == 1
    build_engine(model, (torch.randint(0, 11, (2, 5)),))  # a new shape: captured again
    assert len(calls) == 2
    build_engine(model, (idx,))  # the first shape is still cached
    assert len(calls) == 2
    model.heads = 4  # a plain attribute forward reads: captured again
    build_engine(model, (idx,))
    assert len(calls) == 3


def test_capture_leaves_buffers_and_generators_alone():
    model = ResNet().to(F64).train()
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    clear_capture_cache()
    capture(model, (x,))
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Round(torch.autograd.Function):
    """A straight-through estimator: forward rounds, backward passes the cotangent through."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


class _Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if x.size(0) > 100:  # fx cannot trace this: the capture is asked
            return x
        return self.b(_Round.apply(self.a(x)))


def test_a_custom_function_refuses_the_capture_never_traced_through():
    model = _Quantised().to(F64)
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(EngineUnsupported, match="_Round"):
        capture(model, (x,))
    with pytest.warns(UserWarning, match="falling back"):
        lin = linearize(model, (x,), backend="torch")
    v = [torch.randn_like(p) for p in model.parameters()]
    # the straight-through Jacobian (round's derivative is the identity), not round's zero

    def straight_through(wa, ba, wb, bb):
        h = F.linear(x, wa, ba)
        return F.linear(h + (h.round() - h).detach(), wb, bb)

    want = torch.func.jvp(straight_through, tuple(p.detach() for p in model.parameters()),
                          tuple(v))[1]
    torch.testing.assert_close(lin.jvp(v), want)


def test_data_dependent_control_flow_falls_back_with_a_warning(monkeypatch):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return h if bool(h.sum() > 0) else -h

    model, x = DataDependent().to(F64), torch.randn(5, 4, dtype=F64)
    with pytest.warns(UserWarning, match="torch.export cannot capture"):
        linearize(model, (x,), backend="torch")
    calls = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or export(*a, **k))
    with pytest.warns(UserWarning, match="torch.export cannot capture"):
        linearize(model, (x,), backend="torch")  # the failure is remembered: not tried again
    assert calls == []


# -- what a cached graph depends on (found by review: each was a silent wrong answer) ----------

def _outputs_and_jvp_error(model, x):
    lin = linearize(model, (x,), backend="torch")
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    v = tuple(torch.randn_like(p) for p in params)
    out, ref = torch.func.jvp(
        lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)), params, v)
    return (float((lin.outputs - out).norm() / out.norm()),
            float((lin.jvp(list(v)) - ref).norm() / ref.norm()))


def test_a_cached_graph_follows_dict_list_and_tensor_attributes():
    class Scaled(nn.Module):  # fx path: a dict and a list of numbers
        def __init__(self):
            super().__init__()
            self.lin, self.cfg, self.scales = nn.Linear(4, 4), {"k": 1.0}, [1.0, 2.0]

        def forward(self, x):
            return self.lin(x) * self.cfg["k"] * self.scales[1]

    class Weighted(nn.Module):  # capture path: a plain tensor attribute
        def __init__(self):
            super().__init__()
            self.lin, self.t = nn.Linear(4, 4), torch.ones(4, dtype=F64)

        def forward(self, x):
            if x.shape[0] > 100:
                raise ValueError("batch too large")
            return self.lin(x) * self.t

    x = torch.randn(3, 4, dtype=F64)
    scaled, weighted = Scaled().to(F64), Weighted().to(F64)
    _outputs_and_jvp_error(scaled, x)
    scaled.cfg["k"], scaled.scales[1] = 5.0, 3.0
    assert max(_outputs_and_jvp_error(scaled, x)) < 1e-12
    _outputs_and_jvp_error(weighted, x)
    weighted.t = torch.full((4,), 2.0, dtype=F64)
    assert max(_outputs_and_jvp_error(weighted, x)) < 1e-12


def test_a_buffer_read_as_a_number_is_read_at_every_build():
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("temp", torch.tensor(2.0, dtype=F64))

        def forward(self, x):
            return self.lin(x) / self.temp.item()

    model, x = Tempered().to(F64), torch.randn(3, 4, dtype=F64)
    _outputs_and_jvp_error(model, x)
    model.temp.fill_(5.0)
    assert max(_outputs_and_jvp_error(model, x)) < 1e-12


def test_the_fallback_after_a_failed_build_sees_the_buffers_as_they_were():
    class WritesItsBuffer(nn.Module):  # a view of a buffer read after an in-place write
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)
            self.register_buffer("b", torch.zeros(4, dtype=F64))

        def forward(self, x):
            view = self.b[:2]
            self.b.add_(1.0)
            if x.shape[0] > 100:
                raise ValueError("batch too large")
            return self.lin(x[:, :2] * view)

    from ngtriton.linearize import AutogradLinearization

    torch.manual_seed(3)
    model, x = WritesItsBuffer().to(F64), torch.randn(3, 2, dtype=F64)
    with pytest.warns(UserWarning, match="falling back"):
        lin = linearize(model, (x,), backend="torch")
    torch.testing.assert_close(lin.outputs, AutogradLinearization(model, (x,)).outputs)


def test_a_model_cast_after_its_capture_is_captured_again():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(50, 8), nn.Linear(8, 3)

        def forward(self, ids):
            h = self.emb(ids).to(self.lin.weight.dtype)
            if ids.shape[0] > 100:
                raise ValueError("batch too large")
            return self.lin(h)

    model, ids = Tokens(), torch.randint(0, 50, (2, 7))
    linearize(model, (ids,), backend="torch")
    model.double()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*falling back")
        lin = linearize(model, (ids,), backend="torch")
    assert lin.outputs.dtype == F64


def test_the_record_serves_every_layer_of_a_hugging_face_gpt2():
    """Conv1D (an addmm over rows) and gelu_new are recorded and found in the captured graph,
    so a build from the closure's forward recomputes none of them (no dropout: eval mode)."""
    from ngtriton.linearize import ForwardRecord

    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=12,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 23, (2, 7))
    with ForwardRecord(model) as record:
        model(ids).logits.sum().backward()
    found = []
    lookup = record.lookup

    def counted(module, x):
        out = lookup(module, x)
        found.append(out is not None)
        return out

    record.lookup = counted
    lin = linearize(model, (ids,), backend="torch", record=record)
    assert len(found) == len(record) == 2 * 5 + 1 and all(found), found  # 4 Conv1D + GELU
    torch.testing.assert_close(lin.outputs, linearize(model, (ids,), backend="torch").outputs)
