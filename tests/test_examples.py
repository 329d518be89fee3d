"""Each script in examples/ runs at a small size and does what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adam_to_ngd():
    pytest.importorskip("sklearn")
    ngd = load("adam_to_ngd").main(epochs=1)
    adam = load("adam_to_ngd").main(epochs=1, use_ngd=False)
    assert ngd["loss"] < adam["loss"]


def test_regression_gaussian():
    out = load("regression_gaussian").main(steps=10, n=64)
    assert out["final"] < 0.5 * out["initial"]


def test_binary_bernoulli():
    out = load("binary_bernoulli").main(steps=10, n=128)
    assert out["accuracy"] > 0.8


def test_checkpoint_resume(tmp_path):
    pytest.importorskip("sklearn")
    out = load("checkpoint_resume").main(steps=4, path=str(tmp_path / "ckpt.pt"))
    assert out["identical"]
    assert all(torch.equal(p, q) for p, q in zip(out["model"].parameters(),
                                                 out["resumed"].parameters()))
    assert out["damping"][0] == out["damping"][1]
