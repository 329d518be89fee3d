"""A step as a transaction: everything it changes is either all there or not at all.

The optimizer's scalar state lives in one immutable :class:`Book` that a step replaces with a
single assignment, its commit point. Before that point the step writes nothing of the optimizer
state (new per-parameter tensors are made, never written in place), so :meth:`Transaction.rollback`
only has to put the parameters back (if they moved), the per-parameter state dicts, the history's
length and the generator, and what the closure's calls changed on the model (hooks,
``requires_grad``, BatchNorm statistics, random generators, grad mode: see
:meth:`.closure.ClosureRunner.abort`). The rollback does all of it itself, because any clean-up
inside the step can be cut short by an interrupt before it starts. The commit first puts back
what the first call left (:meth:`.closure.ClosureRunner.end`), so nothing is pending once the
book is assigned. After that point the step is done: an exception that arrives later (an
interrupt in the clean-up) leaves the completed step in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .stats import NGDStats


@dataclass(frozen=True)
class Book:
    """NGD's scalar state; replaced whole, never changed in place."""

    steps: int
    damping: float
    skipped_total: int = 0
    rejected_total: int = 0
    last_stats: NGDStats | None = None


class Transaction:
    """What one step must be able to undo, taken when it starts."""

    def __init__(self, opt: Any, params: list[Tensor]) -> None:
        self.book = opt._book
        self.history_len = len(opt.history)
        self.generator = opt._generator.get_state()
        self.states = [(p, dict(opt.state[p]) if p in opt.state else None) for p in params]
        self.unmove: Callable[[], None] | None = None  # puts the parameters back, once moved
        self.committed: Book | None = None
        self.device = params[0].device
        loss = getattr(opt, "loss", None)  # NGD(loss=...): the step hooks that module too
        self.start = opt._runner.begin(  # the model's side, for the rollback
            self.device, [loss] if isinstance(loss, torch.nn.Module) else [])

    def done(self, opt: Any) -> bool:
        """Whether the step reached its commit point."""
        return self.committed is not None and opt._book is self.committed

    def commit(self, opt: Any, book: Book, stats: NGDStats,
               updates: list[tuple[Tensor, dict[str, Tensor]]]) -> None:
        """Write the step's results; the book's assignment is the point of no return."""
        opt._runner.end(self.device)
        self.committed = book
        for p, entries in updates:
            opt.state[p].update(entries)
        if opt.keep_history:
            opt.history.append(dict(vars(stats)))
        opt._book = book

    def rollback(self, opt: Any) -> None:
        """Everything as before the step (idempotent: an interrupted rollback runs again)."""
        if self.unmove is not None:
            self.unmove()
        opt._book = self.book
        del opt.history[self.history_len:]
        opt._generator.set_state(self.generator)
        for p, state in self.states:
            if state is None:
                opt.state.pop(p, None)
            else:
                opt.state[p] = dict(state)
        opt._runner.abort(self.start)


def restorer(params: list[Tensor], saved: list[Tensor]) -> Callable[[], None]:
    """A bit-exact, idempotent restore of ``params`` from ``saved`` views."""
    def unmove() -> None:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    return unmove
