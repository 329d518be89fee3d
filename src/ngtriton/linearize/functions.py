"""Custom ``torch.autograd.Function`` s in a linearization: honoured, never traced through.

A Function says what its derivative is (a straight-through estimator's backward is the
identity while its forward rounds; a gradient-scaling layer's forward is the identity while
its backward scales). Tracing into its ``forward`` would differentiate the forward's ops instead.
So, while the engine traces, ``Function.apply`` on traced values becomes ONE graph node
(:func:`traced_functions`); the node runs ``apply`` itself, its VJP is the Function's own
backward and its JVP the double backward of that backward (which is exactly the map whose
transpose the backward is), or the Function's ``jvp`` by forward-mode AD when its backward
cannot be differentiated again (``@once_differentiable``). Where neither exists,
:class:`NotLinearizable` names the Function.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["NotLinearizable", "custom_functions", "forward_jvp", "function_class",
           "functions_without_jvp", "traced_functions"]

_Function = torch.autograd.function.Function


class NotLinearizable(TypeError):
    """The model holds something whose ``J v`` cannot be formed (the message says what)."""


_APPLY_TARGETS: weakref.WeakKeyDictionary[type, Callable[..., Any]] = weakref.WeakKeyDictionary()


def _apply_target(cls: type) -> Callable[..., Any]:
    """The graph node's target for ``cls.apply`` (one per Function class; holds it weakly)."""
    target = _APPLY_TARGETS.get(cls)
    if target is None:
        ref = weakref.ref(cls)

        def target(*args: Any, **kwargs: Any) -> Any:
            return ref().apply(*args, **kwargs)  # type: ignore[union-attr]

        target.__name__ = target.__qualname__ = f"{cls.__name__}_apply"
        target.__module__ = cls.__module__
        target._ngtriton_function = ref  # type: ignore[attr-defined]
        _APPLY_TARGETS[cls] = target
    return target


def function_class(target: Any) -> type | None:
    """The Function class whose ``apply`` a graph node's ``target`` is, else None."""
    ref = getattr(target, "_ngtriton_function", None)
    return ref() if ref is not None else None


@contextlib.contextmanager
def traced_functions() -> Iterator[None]:
    """While active, ``SomeFunction.apply`` on fx proxies records one ``call_function`` node
    instead of running (and tracing) ``forward``; on anything else it runs as usual."""
    original = _Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in pytree.tree_leaves((args, kwargs))
                      if isinstance(a, fx.Proxy)), None)
        if proxy is None or cls.__module__.startswith("torch."):
            # torch's own Functions (reentrant checkpoint, ...) are traced through, as before:
            # their ops are what they differentiate
            return original.__func__(cls, *args, **kwargs)
        return proxy.tracer.create_proxy("call_function", _apply_target(cls), args, kwargs)

    _Function.apply = classmethod(apply)  # type: ignore[assignment]
    try:
        yield
    finally:
        _Function.apply = original  # type: ignore[assignment]


def custom_functions(roots: Sequence[Any]) -> list[type]:
    """The custom Function classes in the autograd graph below ``roots`` (grad_fn nodes)."""
    seen: set[Any] = set()
    found: dict[type, None] = {}
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if isinstance(cls, type):
            found[cls] = None
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return list(found)


def functions_without_jvp(classes: Sequence[type]) -> list[type]:
    """Those of ``classes`` that define no ``jvp`` (forward-mode AD cannot go through them)."""
    return [c for c in classes if getattr(c, "jvp", None) is _Function.jvp]


def not_linearizable(classes: Sequence[type]) -> NotLinearizable:
    """The error for Functions whose backward cannot be differentiated again and that have no
    ``jvp``: ``J v`` would otherwise be formed from nothing the Function defines."""
    names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in classes)
    return NotLinearizable(
        f"model: the custom autograd.Function {names} has a backward that cannot be "
        "differentiated again (@once_differentiable, or computed without autograd) and no "
        "jvp staticmethod, so J·v cannot be formed from its own derivative. Give it a jvp "
        "(forward-mode derivative) or a backward written in differentiable torch ops")


def forward_jvp(fn: Callable[..., Any], primals: Sequence[Tensor],
                tangents: Sequence[Tensor]) -> Any:
    """``J v`` of ``fn`` at ``primals`` by forward-mode AD: :func:`torch.func.jvp`, or dual
    numbers where functorch refuses the call (a Function without ``setup_context``). A custom
    Function contributes its own ``jvp``."""
    try:
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
    except RuntimeError as err:
        if "setup_context" not in str(err):
            raise
    with fwAD.dual_level():
        out = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        return pytree.tree_map(
            lambda o: _tangent(o) if isinstance(o, Tensor) else o, out)


def _tangent(o: Tensor) -> Tensor:
    t = fwAD.unpack_dual(o).tangent
    return torch.zeros_like(o) if t is None else t
