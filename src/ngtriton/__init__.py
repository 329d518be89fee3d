"""ngtriton: matrix-free natural gradients for PyTorch.

``FisherOperator`` caches one linearization of a model and evaluates Fisher-vector products from
it; ``solve`` runs a Krylov (or sample-space) solver on it; ``natural_gradient`` does both.
"""

from .fisher import FISHER_TYPES, FisherOperator
from .likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    GaussianPrecision,
    Likelihood,
)
from .linearize import ForwardRecord, NotLinearizable, linearize
from .losses import SUPPORTED_LOSSES, LossCapture, LossTerms, loss_terms
from .natgrad import natural_gradient
from .optim import NGD, NGDStats, NonFiniteError
from .solvers import ConvergenceError, ConvergenceWarning, SolveResult, solve

__version__ = "0.1.0"

__all__ = [
    "FISHER_TYPES",
    "LIKELIHOODS",
    "NGD",
    "SUPPORTED_LOSSES",
    "Bernoulli",
    "Categorical",
    "ConvergenceError",
    "ConvergenceWarning",
    "FisherOperator",
    "ForwardRecord",
    "Gaussian",
    "GaussianPrecision",
    "Likelihood",
    "LossCapture",
    "LossTerms",
    "NGDStats",
    "NonFiniteError",
    "NotLinearizable",
    "SolveResult",
    "linearize",
    "loss_terms",
    "natural_gradient",
    "solve",
]
