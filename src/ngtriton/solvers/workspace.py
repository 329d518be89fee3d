"""Reusable flat buffers for repeated solves (the vectors of a Krylov loop, an optimizer's copies).

A fresh multi-megabyte CPU tensor is served by the C allocator straight from the operating
system, and its first write page-faults every 4 KiB page: on the project's 2-core machine that
costs about as much as two passes over the vector. An NGD step allocates a handful of such
vectors (the gradient, CG's x, r and p, a restore point), so reusing them between steps removes a
cost that grows with the model. CUDA needs none of this (PyTorch's caching allocator already
reuses blocks), so callers use a workspace on the CPU only.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Named flat buffers, reallocated only when the requested length, dtype or device changes.

    A buffer handed out by :meth:`get` is overwritten by the next call that asks for the same
    name, so nothing returned from it may be kept past that call (copy it instead).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device | str
            ) -> Tensor:
        """An uninitialised flat tensor for ``name`` (the same storage as last time if it fits)."""
        buf = self._buffers.get(name)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    @staticmethod
    def check(workspace: object) -> Workspace | None:
        """``workspace`` if it is None or a Workspace; else a TypeError naming the argument."""
        if workspace is not None and not isinstance(workspace, Workspace):
            raise TypeError(f"workspace: expected an ngtriton.solvers.Workspace or None, got "
                            f"{type(workspace).__name__}")
        return workspace

    def like(self, name: str, v: Tensor) -> Tensor:
        """:meth:`get` with ``v``'s length, dtype and device."""
        return self.get(name, v.numel(), v.dtype, v.device)

    def clear(self) -> None:
        """Drop every buffer (their memory goes back to the allocator)."""
        self._buffers.clear()

    def items(self) -> list[tuple[str, Tensor]]:
        """``(name, buffer)`` pairs."""
        return list(self._buffers.items())

    def __len__(self) -> int:
        return len(self._buffers)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
