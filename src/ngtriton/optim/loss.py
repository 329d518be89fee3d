"""NGD's ``loss=``: the torch loss module the closure calls, watched during its first call.

The Fisher must be the GGN of exactly the loss the closure computes (DESIGN.md §6). With
``loss=`` NGD records what the closure passes to that module (its input and targets) and what
the model returned, checks that the loss read the model's output (or a reshape of all of it),
and builds the operator with that loss and those targets: no likelihood to pick, no scale to
get wrong, ``ignore_index`` rows out of the Fisher.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..linearize.outputs import select_output
from ..losses import LossCapture, is_outputs_or_reshape


class ClosureLoss:
    """``with ClosureLoss(loss, model, output) as watch: closure()``, then :meth:`targets`.

    The hooks come off in ``__exit__`` whatever happened (idempotent)."""

    def __init__(self, loss: nn.Module, model: nn.Module, output: Any) -> None:
        self.capture = LossCapture(loss)
        self.model, self.output = model, output
        self.model_out: Any = None
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.model_out is None:
            self.model_out = out

    def __enter__(self) -> ClosureLoss:
        self.capture.__enter__()
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._handle is not None:
                self._handle.remove()
        finally:
            self.capture.__exit__(*exc)

    def targets(self) -> Any:
        """The targets of the closure's one loss call, checked against the model's output."""
        cap = self.capture
        if cap.calls != 1:
            raise ValueError(f"loss: the closure called it {cap.calls} times; NGD's Fisher is "
                             "the curvature of one call of loss= on the model's output")
        out = select_output(self.model_out, self.output)
        if not isinstance(out, Tensor) or not is_outputs_or_reshape(cap.input, out):
            raise ValueError("loss: its input is not the model's output (or a reshape of all of "
                             "it, or its upcast): a slice, shift, cast or transpose in between "
                             "is a different loss of the model; shift the targets instead "
                             "(padding with ignore_index), or pass likelihood= for a loss NGD "
                             "need not check")
        return cap.targets
