"""Undo work that an interrupt must not leave half done.

A step changes the model (hooks, ``requires_grad``, parameters, BatchNorm statistics, random
generators) and the optimizer (damping, counters, history, per-parameter state). Any exception,
``KeyboardInterrupt`` and other asynchronous ``BaseException`` included, must leave both exactly as
before the step, or exactly as after it. The clean-up itself can be interrupted too, so each
clean-up is idempotent and :func:`settle` runs it again when that happens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def settle(undo: Callable[[], Any]) -> None:
    """Run ``undo`` to the end even if an exception interrupts it once: then it runs again from
    the start (it must be idempotent) and the exception is re-raised."""
    try:
        undo()
    except BaseException:
        undo()
        raise


def settle_all(undos: Iterable[Callable[[], Any]]) -> None:
    """:func:`settle` each of ``undos`` in turn; every one runs even if an earlier one raised,
    and the first exception is re-raised at the end."""
    first: BaseException | None = None
    for undo in undos:
        try:
            settle(undo)
        except BaseException as err:
            first = first or err
    if first is not None:
        raise first
