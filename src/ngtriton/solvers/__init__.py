"""Krylov and direct solvers for ``(F + λI) x = rhs`` on flat vectors; one :class:`SolveResult`.

:func:`solve` dispatches on a Fisher operator; :func:`cg`, :func:`minres`, :func:`lsmr` work on
plain callables; :func:`dual_direct` / :func:`dual_krylov` solve in sample space.
"""

from .api import (
    BATCHED_COLUMN_COST,
    DUAL_DIRECT_MAX_ROWS,
    METHODS,
    choose_method,
    dual_cost,
    krylov_cost,
    solve,
)
from .cg import cg
from .dual import dual_direct, dual_krylov, kernel_matrix
from .lsmr import lsmr
from .minres import minres
from .result import (
    ON_UNCONVERGED,
    REASONS,
    ConvergenceError,
    ConvergenceWarning,
    SolveResult,
)
from .workspace import Workspace

__all__ = ["BATCHED_COLUMN_COST", "DUAL_DIRECT_MAX_ROWS", "METHODS", "ON_UNCONVERGED", "REASONS",
           "ConvergenceError", "ConvergenceWarning", "SolveResult", "Workspace", "cg",
           "choose_method", "dual_cost", "dual_direct", "dual_krylov", "kernel_matrix",
           "krylov_cost", "lsmr", "minres", "solve"]
