"""Test-wide setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this happens at collection
time, before any test module imports ngtriton.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
