"""Launch plumbing of the kernels: 32-bit offsets guarded by the strided span, the tensors' own
CUDA device made current for the launch."""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_helpers import randn, spy

from ngtriton.kernels import _config, krylov, ops, output
from ngtriton.kernels import linear as K
from ngtriton.linearize import ops_torch


def test_span_counts_strides_not_elements():
    base = torch.empty(10, 20)
    assert _config.span(base) == 200
    assert _config.span(base.t()) == 200
    assert _config.span(base[:, :3]) == 9 * 20 + 3  # 30 elements, reaching to offset 182
    assert _config.span(base[::3, ::5]) == 9 * 20 + 15 + 1
    assert _config.span(torch.empty(0, 5)) == 0
    assert _config.span(torch.empty(4, 1).expand(4, 1000)) == 4  # stride 0: the same element
    assert _config.offsets_fit(base, None) and not _config.offsets_fit(base, slack=2**31)


def test_ops_fall_back_when_the_span_exceeds_int32(gen, monkeypatch):
    """A view with few elements but a span past 32-bit offsets goes to torch, not the kernel."""
    calls = spy(monkeypatch, [(K, "linear_jvp")])
    x = randn(6, 50, gen=gen)
    w = randn(4, 50, gen=gen)
    x_view = x[:, :5]  # 30 elements, span 5·50 + 5 - 50 = 255
    w_view = w[:, :5]
    assert ops.linear_jvp(x_view, x_view, w_view, None, None, None).shape == (6, 4)
    assert calls == ["linear_jvp"]
    calls.clear()
    monkeypatch.setattr(_config, "INT32_MAX", 254)
    got = ops.linear_jvp(x_view, x_view, w_view, None, None, None)
    assert calls == []  # x_view's span (256) > 254 though it has 30 elements
    assert torch.equal(got, ops_torch.linear_jvp(x_view, x_view, w_view, None, None, None))


def test_krylov_and_output_guard_offsets(gen, monkeypatch):
    v = randn(300, gen=gen)
    monkeypatch.setattr(_config, "INT32_MAX", 100)
    calls = spy(monkeypatch, [(krylov, "dot_reference"), (output, "bernoulli_fvp_reference")])
    krylov.dot(v, v)
    output.bernoulli_fvp(torch.rand(300), v)
    assert calls == ["dot_reference", "bernoulli_fvp_reference"]


class _FakeDevice:
    def __init__(self, index):
        self.type, self.index = "cuda", index


class _FakeTensor:
    def __init__(self, index):
        self.device = _FakeDevice(index)


def test_on_device_switches_only_when_needed(monkeypatch):
    """Triton launches on the current CUDA device: a tensor on another one makes its own device
    current for the launch; a tensor on the current device, or on the CPU, changes nothing."""
    entered = []

    class Switch(contextlib.AbstractContextManager):
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev.index)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    assert isinstance(_config.on_device(torch.empty(1)), contextlib.nullcontext)
    assert isinstance(_config.on_device(_FakeTensor(0)), contextlib.nullcontext)
    with _config.on_device(_FakeTensor(1)):
        pass
    assert entered == [1]

    @_config.launch_on_device
    def launch(t, k=1):
        return k

    monkeypatch.setattr(torch, "Tensor", _FakeTensor)  # isinstance check inside the decorator
    assert launch(_FakeTensor(1), k=3) == 3
    assert entered == [1, 1]
    assert launch(_FakeTensor(0)) == 1
    assert entered == [1, 1]


@pytest.mark.parametrize("fn", [K.linear_jvp, K.linear_jvp_fvp, K.linear_vjp_split,
                                krylov.cg_update, krylov.dot, krylov.lsmr_update,
                                output._categorical, output._bernoulli, K.linear_vjp_split],
                         ids=lambda f: f.__name__)
def test_launching_functions_are_wrapped(fn):
    assert getattr(fn, "__wrapped__", None) is not None
