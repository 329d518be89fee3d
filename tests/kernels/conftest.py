"""Kernel tests run on CUDA, or in the Triton interpreter (enabled by tests/conftest.py)."""

from __future__ import annotations

import secrets

import pytest
import torch

pytest.importorskip("triton")

from ngtriton.kernels import triton_available

if not triton_available():  # pragma: no cover - triton importable but nothing to run it on
    pytest.skip("triton cannot run here (no CUDA, TRITON_INTERPRET unset)", allow_module_level=True)


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed each run (printed: shown by pytest on failure)."""
    seed = secrets.randbits(31)
    print(f"generator seed = {seed}")
    g = torch.Generator()
    g.manual_seed(seed)
    return g
