"""Building a linearization leaves the model as it found it: its buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["buffers_kept"]


@contextlib.contextmanager
def buffers_kept(model: nn.Module, values: bool = True) -> Iterator[None]:
    """Put the model's buffers back as they were after the block: a buffer the block
    reassigned gets its object back (fx's trace would leave a stand-in there), and with
    ``values`` one it wrote in place its values (BatchNorm's running statistics and
    ``num_batches_tracked`` change without a version bump, so values are compared). A trace
    writes no real buffer: ``values=False`` spares it the copies."""
    saved = [(m, name, b, b.clone() if values and b is not None else None)
             for m in model.modules() for name, b in m._buffers.items()]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, copy_of in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if copy_of is not None and not torch.equal(b, copy_of):
                    # .data: the old values come back without a version bump (as BatchNorm
                    # wrote them), so tensors saved by this or earlier linearizations stay
                    # valid (BatchNorm's train-mode derivatives read the batch statistics)
                    b.data.copy_(copy_of)
