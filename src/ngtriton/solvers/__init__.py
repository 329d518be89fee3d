"""Krylov and direct solvers for ``(F + λI) x = rhs`` on flat vectors; one :class:`SolveResult`.

:func:`solve` dispatches on a Fisher operator; :func:`cg`, :func:`minres`, :func:`lsmr` work on
plain callables; :func:`dual_direct` / :func:`dual_krylov` solve in sample space.
"""

from .api import DUAL_DIRECT_MAX_ROWS, METHODS, solve
from .cg import cg
from .dual import dual_direct, dual_krylov, kernel_matrix
from .lsmr import lsmr
from .minres import minres
from .result import REASONS, SolveResult
from .workspace import Workspace

__all__ = ["DUAL_DIRECT_MAX_ROWS", "METHODS", "REASONS", "SolveResult", "Workspace", "cg",
           "dual_direct", "dual_krylov", "kernel_matrix", "lsmr", "minres", "solve"]
