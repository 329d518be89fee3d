"""NGD, the natural-gradient optimizer, in modules named for what they hold.

- :mod:`.ngd`: the optimizer (arguments, parameter groups, state, copies);
- :mod:`.step`: one step, from the closure's first call to the commit;
- :mod:`.transaction`: the step's all-or-nothing bookkeeping;
- :mod:`.closure`: running the user's closure (inputs, generators, BatchNorm state, the trial);
- :mod:`.inputs`: the model's inputs and the curvature subsample;
- :mod:`.damping`: the Levenberg–Marquardt rule;
- :mod:`.preconditioner`: diagonal preconditioners for the solve;
- :mod:`.quadratic`: the quadratic model, step size and momentum;
- :mod:`.guard`: the non-finite guard around Fisher products;
- :mod:`.checkpoint`: ``state_dict`` checks and loading;
- :mod:`.config`: defaults and argument checks.
"""

from .config import (
    DEFAULT_DAMPING,
    DEFAULT_DAMPING_CEILING,
    DEFAULT_DAMPING_FLOOR,
    DEFAULT_MAXITER,
    DEFAULT_TOL,
    LARGE_MODEL_SETTINGS,
    NGD_METHODS,
    NONFINITE_MODES,
    WARM_START_METHODS,
)
from .ngd import NGD
from .preconditioner import PRECONDITIONERS
from .stats import NGDStats, NonFiniteError

__all__ = ["DEFAULT_DAMPING", "DEFAULT_DAMPING_CEILING", "DEFAULT_DAMPING_FLOOR",
           "DEFAULT_MAXITER", "DEFAULT_TOL", "LARGE_MODEL_SETTINGS", "NGD", "NGD_METHODS",
           "NONFINITE_MODES", "PRECONDITIONERS", "WARM_START_METHODS", "NGDStats",
           "NonFiniteError"]
