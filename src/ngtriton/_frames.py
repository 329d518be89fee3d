"""Where a warning should point: the user's line, past ngtriton's and torch's own frames."""

from __future__ import annotations

import os
import sys

import torch

_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                  for m in (sys.modules[__package__], torch))


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the caller of this function that names the
    first frame outside ngtriton and torch (an LR scheduler's or torch.optim's wrappers of
    ``step`` add frames of their own, so a fixed number would point into them)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
