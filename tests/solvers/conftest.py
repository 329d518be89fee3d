"""Fixtures of the solver tests (the test double lives in ``solver_helpers``)."""

from __future__ import annotations

import pytest
from solver_helpers import OpFactory, make_operator


@pytest.fixture
def make_op() -> OpFactory:
    """Factory of dense factored Fisher operators (R, P, rank, damping, dtype, seed, has_b)."""
    return make_operator
