"""A forward the caller already ran, recorded so that building the linearization can reuse it.

NGD's closure runs the model once for the loss and its gradient; the engine's build then needs
the same forward values at the same parameters. :class:`ForwardRecord` hooks, for the length of a
``with`` block, the leaf modules whose outputs the engine's rules take unchanged (``nn.Linear``
with its own forward, and the elementwise activation modules), so that the build skips their
matrix products and activations. A recorded output is used only when it is certainly the value
the rule would compute (:meth:`ForwardRecord.lookup`); anything else is recomputed, so a record
never changes a result, only its cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .precision import ambient_autocast

__all__ = ["ForwardRecord"]


@dataclass
class _Entry:
    x: Tensor
    x_version: int
    out: Tensor
    out_version: int
    params: tuple[tuple[Tensor, int], ...]
    autocast: torch.dtype | None = None  # the autocast the module ran under (None: off)
    calls: int = 1


def _recordable(m: nn.Module) -> bool:
    from .classify import _module_activation, _plain, _same_forward  # the engine's rules

    if m._forward_hooks or m._forward_pre_hooks:  # the rules do not run a module's hooks
        return False
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)):
        return type(m) in _LAYERS and _plain(m)
    if (type(m).__name__, type(m).__module__) in _ROW_LAYERS:
        return _plain(m)
    return _same_forward(m, nn.Linear) or _module_activation(m) is not None


# layers that are one matrix product over their input's rows, written as ``addmm`` (Hugging
# Face's GPT-2 ``Conv1D``): found in a captured graph by ``lookup_rows``
_ROW_LAYERS = {("Conv1D", "transformers.pytorch_utils")}


# layers whose output the engine's rules take from a record (their exact types)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ForwardRecord:
    """Records ``(input, output)`` of the recordable leaf modules of ``model`` while active.

    Use as ``with ForwardRecord(model) as record: loss = closure()``, then pass ``record`` to
    :class:`~ngtriton.FisherOperator` built on the same inputs right after. Holding the record
    keeps the recorded tensors alive; drop it once the operator is built.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._entries: dict[nn.Module, _Entry] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ForwardRecord:
        self._entries.clear()
        self._handles = [m.register_forward_hook(self._hook) for m in self.model.modules()
                         if _recordable(m)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        entry = self._entries.get(module)
        if entry is not None:  # called twice (shared module): which call is which is unknown
            entry.calls += 1
            return
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return
        x = args[0]
        self._entries[module] = _Entry(
            x, x._version, output, output._version,
            tuple((p, p._version) for p in module._parameters.values() if p is not None),
            ambient_autocast(x.device.type))

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """``module``'s recorded output (detached) if it is ``module(x)`` now, else None.

        That holds when the module ran once while recording, on an input with ``x``'s dtype,
        shape and values (the same memory, or equal element by element), and since then
        neither that input, nor the output, nor the module's parameters changed in place; and
        the module ran under the same autocast (none, or the same dtype) as the lookup now.
        """
        e = self._entries.get(module)
        if e is None or e.calls != 1:
            return None
        if e.out._version != e.out_version or e.x._version != e.x_version:
            return None
        if any(p._version != v for p, v in e.params):
            return None
        if e.autocast != ambient_autocast(x.device.type):  # another precision than the build's
            return None
        if e.autocast is None and e.params and e.out.dtype != e.params[0][0].dtype:
            return None
        rx = e.x
        if rx.dtype != x.dtype or rx.shape != x.shape or rx.device != x.device:
            return None
        same_memory = rx.data_ptr() == x.data_ptr() and rx.stride() == x.stride()
        if not same_memory and not torch.equal(rx, x):
            return None
        return e.out.detach()

    def lookup_rows(self, module: nn.Module, x2: Tensor) -> Tensor | None:
        """:meth:`lookup` for a layer applied to the rows of its input: ``x2`` is the input
        with its leading dims flattened, and so is the output returned."""
        e = self._entries.get(module)
        if e is None or e.x.dim() < 1 or e.out.dim() < 1 or x2.dim() != 2:
            return None
        if e.x.numel() != x2.numel() or e.x.shape[-1] != x2.shape[-1]:
            return None
        out = self.lookup(module, x2.view(e.x.shape) if x2.is_contiguous() else
                          x2.reshape(e.x.shape))
        return None if out is None else out.reshape(-1, out.shape[-1])
