"""The deterministic network: every dropout off, in every linearization.

The Fisher of a network with dropout is the Fisher of the network without it (dropout is an
identity in expectation and in eval mode), and a mask drawn at build time would make two builds
of the same operator disagree. Dropout hides in three kinds of call:

* the dropout functions themselves (``F.dropout``, ``torch.dropout``, ...): the identity;
* functions that take a dropout probability (``F.scaled_dot_product_attention``'s
  ``dropout_p``, ``F.multi_head_attention_forward``, ``torch.native_dropout``): called with 0;
* modules calling either (``nn.Dropout``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
  Hugging Face attention): covered by the two above, through :class:`WithoutDropout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DROPOUT_FUNCS", "WithoutDropout", "dropout_free", "math_attention"]

# The dropout functions (modules call them): the identity in every linearization.
DROPOUT_FUNCS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.dropout_, torch.alpha_dropout, torch.alpha_dropout_,
    torch.feature_dropout, torch.feature_dropout_, torch.feature_alpha_dropout,
    torch.feature_alpha_dropout_,
})

# Functions with a dropout probability among their arguments: (position, keyword) of it.
_DROPOUT_P: dict[Any, tuple[int, str]] = {
    F.scaled_dot_product_attention: (4, "dropout_p"),
    F.multi_head_attention_forward: (10, "dropout_p"),
    torch.native_dropout: (1, "p"),
}


def _lookup(table: Any, func: Any) -> Any:
    try:
        return table.get(func) if isinstance(table, dict) else func in table
    except TypeError:  # an unhashable callable
        return None


def zero_dropout_p(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call to ``func`` with its dropout probability set to 0 (unchanged
    when ``func`` takes none)."""
    spec = _lookup(_DROPOUT_P, func)
    if spec is None:
        return args, kwargs
    pos, key = spec
    if len(args) > pos:
        args = (*args[:pos], 0.0, *args[pos + 1:])
    elif key in kwargs:
        kwargs = {**kwargs, key: 0.0}
    return args, kwargs


def dropout_free(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` as a ``run(args, kwargs)`` that calls it without dropout (see module doc)."""
    if _lookup(DROPOUT_FUNCS, func):
        return lambda a, k: a[0] if a else k["input"]
    if _lookup(_DROPOUT_P, func) is None:
        return lambda a, k: func(*a, **k)

    def run(a: tuple, k: dict) -> Any:
        a, k = zero_dropout_p(func, a, k)
        return func(*a, **k)

    return run


class WithoutDropout(TorchFunctionMode):
    """Every dropout off while active (see the module docstring): the deterministic network."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _lookup(DROPOUT_FUNCS, func):
            return args[0] if args else kwargs["input"]
        args, kwargs = zero_dropout_p(func, args, kwargs)
        return func(*args, **kwargs)


def math_attention() -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention through its math backend, which has a double backward and
    forward AD (the fused CPU/GPU kernels have neither)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])
