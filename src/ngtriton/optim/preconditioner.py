"""Diagonal preconditioners for NGD's Krylov solve.

``"adam"``: the running second moment of the gradient, as Adam keeps it,
``v ← β·v + (1 − β)·g²`` (started at the first g², so no bias correction is needed), used as
``M = diag((v + ε)^power)``
(``power = 0.5``: Adam's scaling; Martens 2010 uses an empirical-Fisher diagonal to the 0.75).
It costs no Fisher product. The first preconditioned CG iterate is then an Adam-like direction
whose length the curvature sets; later iterates add the Fisher's coupling between parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PRECONDITIONERS = ("adam",)


@dataclass(frozen=True)
class AdamDiagonal:
    """The ``"adam"`` preconditioner's rule (its state, ``v``, lives in the optimizer)."""

    beta: float = 0.999
    power: float = 0.5
    eps: float = 1e-12

    def advance(self, v: Tensor | None, g: Tensor) -> Tensor:
        """The new second moment, a fresh tensor (the old one is kept until the step commits);
        ``v`` None (no history): ``g²``."""
        g2 = g.detach().square()
        return g2 if v is None else torch.lerp(g2, v.to(g2.dtype), self.beta)

    def diagonal(self, v: Tensor) -> Tensor:
        """``(v + ε)^power``, floored at 1e-6 of its mean so no parameter without a gradient
        makes the preconditioner singular."""
        d = (v + self.eps).pow_(self.power)
        return d.clamp_(min=float(d.mean()) * 1e-6 + torch.finfo(d.dtype).tiny)
