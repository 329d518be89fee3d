"""The guard around a step's Fisher products: a non-finite product is noticed without a host
synchronisation on a GPU, so the step can be skipped before it touches the parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..fisher import FisherOperator
from ..solvers._vecops import all_finite


class ProductWatch:
    """Whether a guarded product returned a non-finite vector (on a GPU without a host sync).

    ``last_only``: check only the newest product, when :meth:`any_bad` is asked. Right for CG's
    host loop, which stops at the first non-finite product (its pᵀAp is then non-finite: NaN·x,
    Inf·0 and Inf − Inf are all NaN), so a bad product is always the last one.
    """

    def __init__(self, device: torch.device) -> None:
        self.host = device.type == "cpu"  # reading a CPU scalar costs no synchronisation
        self.bad_host = False
        self.bad = None if self.host else torch.zeros((), dtype=torch.bool, device=device)
        self.last_only = False
        self.last: Tensor | None = None

    def see(self, out: Tensor) -> None:
        # Every vector the solvers and NGD pass in is finite (the solvers mask, NGD checks), so
        # a non-finite output is the product's own doing: one summing pass.
        if self.last_only:
            self.last = out
        elif self.host:
            self.bad_host = self.bad_host or not bool(all_finite(out))
        else:
            self.bad = self.bad | ~all_finite(out)

    def any_bad(self) -> bool:
        if self.last is not None:
            self.bad_host = self.bad_host or not bool(all_finite(self.last))
            self.last = None
        return self.bad_host or (self.bad is not None and bool(self.bad))


def _guarded(product: Callable[..., Tensor], watch: ProductWatch) -> Callable[..., Tensor]:
    def guarded(v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = product(v, *args, **kwargs)
        watch.see(out)
        return out
    return guarded


class GuardedOperator:
    """A :class:`FisherOperator` whose products report to a :class:`ProductWatch`.

    The guarded products are bound once (CG calls one per iteration) and refer to the watch,
    not to this object, so no reference cycle keeps the operator's cached forward alive.
    """

    PRODUCTS = frozenset({"fisher_matvec", "damped_matvec", "factor_matvec", "factor_rmatvec",
                          "factor_matmat", "factor_rmatmat"})

    def __init__(self, op: FisherOperator) -> None:
        self._op = op
        self.watch = ProductWatch(op.device)
        for name in self.PRODUCTS:
            product = getattr(op, name, None)
            if product is not None:
                setattr(self, name, _guarded(product, self.watch))

    def __getattr__(self, name: str) -> Any:  # everything but the products: the operator's
        return getattr(self._op, name)

    def any_bad(self) -> bool:
        return self.watch.any_bad()


