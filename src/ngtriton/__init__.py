"""ngtriton: matrix-free natural gradients for PyTorch.

``FisherOperator`` caches one linearization of a model and evaluates Fisher-vector products from
it; ``solve`` runs a Krylov (or sample-space) solver on it; ``natural_gradient`` does both.
"""

from .fisher import FISHER_TYPES, FisherOperator
from .likelihoods import LIKELIHOODS, Bernoulli, Categorical, Gaussian, Likelihood
from .linearize import ForwardRecord, linearize
from .natgrad import natural_gradient
from .optim import NGD, NGDStats, NonFiniteError
from .solvers import SolveResult, solve

__version__ = "0.1.0"

__all__ = [
    "FISHER_TYPES",
    "LIKELIHOODS",
    "NGD",
    "Bernoulli",
    "Categorical",
    "FisherOperator",
    "ForwardRecord",
    "Gaussian",
    "Likelihood",
    "NGDStats",
    "NonFiniteError",
    "SolveResult",
    "linearize",
    "natural_gradient",
    "solve",
]
