"""Arithmetic nodes: sums and differences (``AddStep``), products and quotients by a constant
(``ScaleStep``), products of two active values (``ProductStep``) and negation.

Broadcasting is undone in the VJP (``unbroadcast``); a pattern these steps do not cover (a
quotient by an active value, ``rounding_mode``, an ``alpha`` that is a graph value) returns
False, and the node takes the per-node autograd fallback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor
from torch.fx.node import Node

from .classify import (
    _ADD_FUNCS,
    _ARITH_METHODS,
    _DIV_FUNCS,
    _MUL_FUNCS,
    _NEG_FUNCS,
    _SUB_FUNCS,
    _arg,
    as_torch,
)
from .rules import AddStep, ProductStep, ScaleStep, _is_float

if TYPE_CHECKING:
    from .builder import _Builder

__all__ = ["arith_kind", "build_arith"]


def arith_kind(node: Node, name: str | None) -> str | None:
    """``"add"``, ``"sub"``, ``"mul"``, ``"div"`` or ``"neg"`` for an arithmetic node
    (a method's ``name`` without its in-place underscore); None otherwise."""
    if name is not None:
        return _ARITH_METHODS.get(name)
    if node.op != "call_function":
        return None
    t = as_torch(node.target)
    try:
        if t in _ADD_FUNCS:
            return "add"
        if t in _SUB_FUNCS:
            return "sub"
        if t in _MUL_FUNCS:
            return "mul"
        if t in _DIV_FUNCS:
            return "div"
        if t in _NEG_FUNCS:
            return "neg"
    except TypeError:
        return None
    return None

def build_arith(bld: _Builder, node: Node, kind: str) -> bool:
    """Build add/sub/mul/div/neg; False when the pattern needs the generic fallback."""
    a_arg = _arg(node, 0, "input")
    a, a_slot = bld._src(a_arg)
    run = bld._runner(node, out_of_place=True)
    if kind == "neg":
        out = run(bld._val(node.args), bld._val(node.kwargs))
        bld._add(node, ScaleStep(a_slot, -1.0, False, a.shape, out.shape), out)
        return True
    b_arg = _arg(node, 1, "other")
    b, b_slot = bld._src(b_arg)
    extra = set(node.kwargs) - {"input", "other", "alpha"}
    if extra or not all(isinstance(v, (Tensor, int, float)) for v in (a, b)):
        return False
    if kind == "div" and (b_slot is not None or _arg(node, 2, "rounding_mode") is not None):
        return False
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, Node) or (len(node.args) > 2 and kind in ("add", "sub")):
        return False
    out = run(bld._val(node.args), bld._val(node.kwargs))
    if not _is_float(out):
        return False
    if kind in ("add", "sub"):
        coef_b = float(alpha) * (-1.0 if kind == "sub" else 1.0)
        slots, coefs, shapes = [], [], []
        for v, s, c in ((a, a_slot, 1.0), (b, b_slot, coef_b)):
            if s is not None:
                slots.append(s)
                coefs.append(c)
                shapes.append(v.shape)
        bld._add(node, AddStep(slots, coefs, shapes, out.shape), out)
        return True
    if a_slot is not None and b_slot is not None:
        bld._add(node, ProductStep(a_slot, b_slot, a, b), out)
        return True
    if a_slot is None:
        a, b, a_slot = b, a, b_slot
    if not isinstance(a, Tensor):
        return False
    bld._add(node, ScaleStep(a_slot, b, kind == "div", a.shape, out.shape), out)
    return True
