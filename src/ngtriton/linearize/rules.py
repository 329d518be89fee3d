"""Per-node rules of the linearization engine: what each op caches, its JVP and its VJP.

Every rule is a :class:`Step` built during the engine's ONE forward pass. A step reads the
tangents of its *active* inputs (values that depend on trainable parameters; a trainable parameter
is itself an active input of the steps that use it) and writes one output tangent; its VJP maps
the output cotangent to one cotangent per active input (``None`` = no contribution). Inactive
inputs (data, buffers, frozen parameters) are constants cached in the step; no tangent or
cotangent is ever formed for them, which is what skips the first layer's ``ẋ Wᵀ`` and input
cotangent products.

Linear and LayerNorm go through the ``ops`` module (:mod:`ngtriton.linearize.ops_torch` or the
Triton :mod:`ngtriton.kernels.ops`, same signatures), with the activation that follows a Linear
fused in as ``dact = σ′(s)``. Modules and functions without a rule use :class:`AutogradStep`, a
per-node double-backward linearization (correct for anything autograd can differentiate twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import DROPOUT_FUNCS, WithoutDropout, math_attention  # noqa: F401 (re-exported)
from .functions import custom_functions, forward_jvp, functions_without_jvp, not_linearizable
from .precision import lowp

Cot = Any  # a Tensor, a tuple of (Tensor | None) for tuple-valued nodes, or None


def reaching(roots: list[Any], *leaves: Tensor) -> set[Any]:
    """The autograd nodes, among those reachable from ``roots``, from which one of ``leaves``
    is reachable (their AccumulateGrad nodes included): what depends on them."""
    ids = {id(t) for t in leaves}
    parents: dict[Any, list[Any]] = {}
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    targets = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in ids:
            targets.append(node)
        for child, _ in node.next_functions:
            if child is not None:
                parents.setdefault(child, []).append(node)
                stack.append(child)
    good: set[Any] = set()
    while targets:
        node = targets.pop()
        if node not in good:
            good.add(node)
            targets.extend(parents.get(node, ()))
    return good


def depends_on(grad: Tensor, on: set[Any]) -> bool:
    """Whether a gradient computed with ``create_graph`` depends on the cotangents whose
    dependents are ``on`` (from :func:`reaching`). A gradient without a ``grad_fn`` that still
    requires grad is a cotangent itself (an identity path, e.g. ``h + θ``)."""
    return grad.grad_fn in on if grad.grad_fn is not None else grad.requires_grad


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


# --------------------------------------------------------------------------------------------
# Activations: the value σ(s) and its derivative σ′(s), computed together in the forward.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Activation:
    """An elementwise activation with a closed-form derivative."""

    name: str  # "tanh" | "sigmoid" | "relu" | "leaky_relu" | "gelu" | "gelu_tanh" | "silu"
    slope: float = 0.0  # negative slope of leaky_relu

    def forward(self, s: Tensor, owned: bool) -> tuple[Tensor, Tensor]:
        """``(σ(s), σ′(s))``; ``owned``: ``s`` is a fresh tensor that may be overwritten."""
        name = self.name
        if name == "tanh":
            y = torch.tanh_(s) if owned else torch.tanh(s)
        elif name == "sigmoid":
            y = torch.sigmoid_(s) if owned else torch.sigmoid(s)
        else:  # the derivative reads s: take it before an owned s is overwritten
            d = self.derivative(s, None)
            if name == "relu":
                return (torch.relu_(s) if owned else torch.relu(s)), d
            if name == "leaky_relu":
                return F.leaky_relu(s, self.slope, inplace=owned), d
            if name == "gelu":
                return F.gelu(s), d
            if name == "gelu_tanh":
                return F.gelu(s, approximate="tanh"), d
            return F.silu(s), d
        return y, self.derivative(None, y)

    def derivative(self, s: Tensor | None, y: Tensor | None) -> Tensor:
        """``σ′(s)`` from the input ``s`` or, for tanh and sigmoid, from the output ``y = σ(s)``
        (what a recorded forward provides); a fresh tensor, ``s`` and ``y`` are not modified."""
        name = self.name
        if name == "tanh" and y is not None:
            return torch.square(y).neg_().add_(1.0)
        if name == "sigmoid" and y is not None:
            return torch.rsub(y, 1.0).mul_(y)
        if s is None:
            raise ValueError(f"the {name} derivative needs the activation's input")
        if name == "tanh":
            return torch.square(torch.tanh(s)).neg_().add_(1.0)
        if name == "sigmoid":
            sig = torch.sigmoid(s)
            return torch.rsub(sig, 1.0).mul_(sig)
        if name == "relu":
            return (s > 0).to(s.dtype)
        if name == "leaky_relu":
            return (s > 0).to(s.dtype).mul_(1.0 - self.slope).add_(self.slope)
        if name == "gelu":
            cdf = torch.mul(s, _SQRT1_2).erf_().add_(1.0).mul_(0.5)
            return torch.square(s).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI).mul_(s).add_(cdf)
        if name == "gelu_tanh":
            s2 = torch.square(s)
            t = torch.mul(s2, _GELU_C).add_(1.0).mul_(s).mul_(_SQRT_2_OVER_PI).tanh_()
            # σ′ = ½(1 + t) + ½ s (1 − t²) √(2/π) (1 + 3c s²)
            inner = s2.mul_(3.0 * _GELU_C).add_(1.0).mul_(_SQRT_2_OVER_PI * 0.5).mul_(s)
            return torch.square(t).neg_().add_(1.0).mul_(inner).add_(t.add_(1.0).mul_(0.5))
        if name == "silu":
            sig = torch.sigmoid(s)
            return torch.rsub(sig, 1.0).mul_(s).add_(1.0).mul_(sig)
        raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

class Step:
    """One active node: ``jvp(dots) -> out tangent``, ``vjp(g) -> [cotangent per input]``."""

    in_slots: tuple[int, ...] = ()
    out_slot: int = -1
    label: str = ""
    out_dtype: torch.dtype | None = None  # the value's dtype (tangents are cast to it)

    def jvp(self, dots: Sequence[Any]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def vjp(self, g: Cot) -> list[Cot]:  # pragma: no cover - interface
        raise NotImplementedError


def _positions(slots: Sequence[int | None]) -> tuple[tuple[int, ...], list[int | None]]:
    """Active slots in order, and each role's position among them (None when inactive)."""
    active: list[int] = []
    pos: list[int | None] = []
    for s in slots:
        if s is None:
            pos.append(None)
        else:
            pos.append(len(active))
            active.append(s)
    return tuple(active), pos


@dataclass(frozen=True)
class OutputEpilogue:
    """The output-Fisher product ``scale · F_R`` that a model's last Linear can apply to its
    tangent before storing it (``ops.linear_jvp_fvp``), instead of a separate pass over ``J v``.

    ``kind``: ``"categorical"`` (``state`` = probabilities p) or ``"bernoulli"`` (``state`` = s);
    ``state``: (rows, out_features), the layer's output rows (leading dimensions flattened).
    """

    kind: str
    state: Tensor
    scale: float = 1.0


def _active_cotangents(positions: Sequence[int | None],
                       *parts: tuple[Tensor | None, Sequence[int]]) -> list[Cot]:
    """The ``(cotangent, shape)`` parts of the roles that are active (position not None), each
    viewed in its input's shape, in role order: what a step's ``vjp`` returns."""
    return [c.view(shape) for pos, (c, shape) in zip(positions, parts) if pos is not None]


_LOW = (torch.bfloat16, torch.float16)


class LinearStep(Step):
    """``σ(x Wᵀ + b)`` on inputs of any rank, through ``ops.linear_jvp``/``ops.linear_vjp``.

    As the model's last step its JVP can also apply an :class:`OutputEpilogue`
    (``ops.linear_jvp_fvp``), when :meth:`accepts` it.
    """

    def __init__(self, ops: ModuleType, x2: Tensor, weight: Tensor, dact: Tensor | None,
                 x_slot: int | None, w_slot: int | None, b_slot: int | None,
                 x_shape: torch.Size, out_shape: torch.Size) -> None:
        self.ops = ops
        x2, weight = lowp(x2, weight)  # under autocast: cast once, here (a no-op otherwise)
        self.x2, self.weight, self.dact = x2, weight, dact
        self.in_slots, (self.xp, self.wp, self.bp) = _positions((x_slot, w_slot, b_slot))
        self.x_shape, self.out_shape = x_shape, out_shape
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    def accepts(self, epilogue: OutputEpilogue) -> bool:
        """Whether :meth:`jvp` can apply ``epilogue`` (the ops module has the fused product and
        ``epilogue.state`` holds one row per output row)."""
        rows = (self.x2.shape[0], self.out_features)
        return (hasattr(self.ops, "linear_jvp_fvp") and len(self.out_shape) >= 2
                and tuple(epilogue.state.shape) == rows)

    def jvp(self, dots, epilogue: OutputEpilogue | None = None):
        xd = (None if self.xp is None
              else dots[self.xp].reshape(-1, self.in_features).contiguous())
        wd = None if self.wp is None else dots[self.wp]
        bd = None if self.bp is None else dots[self.bp]
        if self.x2.dtype != self.weight.dtype or self.x2.dtype in _LOW:  # under autocast
            # one dtype for every operand, so that the Triton kernels can take the call
            xd, wd, bd = (None if t is None else lowp(t)[0] for t in (xd, wd, bd))
        if epilogue is None:
            out = self.ops.linear_jvp(self.x2, xd, self.weight, wd, bd, self.dact)
        else:
            out = self.ops.linear_jvp_fvp(self.x2, xd, self.weight, wd, bd, self.dact,
                                          epilogue.state, epilogue.kind, epilogue.scale)
        return out.view(self.out_shape)

    def vjp(self, g):
        g2 = g.reshape(-1, self.out_features).contiguous()
        if g2.dtype != self.x2.dtype and self.x2.dtype in _LOW:  # under autocast
            g2 = lowp(g2)[0]
        gx, gw, gb = self.ops.linear_vjp(self.x2, self.weight, g2, self.dact,
                                         self.xp is not None, self.wp is not None,
                                         self.bp is not None)
        return _active_cotangents((self.xp, self.wp, self.bp), (gx, self.x_shape),
                                  (gw, self.weight.shape), (gb, (self.out_features,)))


class LayerNormStep(Step):
    """LayerNorm over the trailing ``normalized_shape`` (flattened to one feature dim)."""

    def __init__(self, ops: ModuleType, xhat: Tensor, rstd: Tensor, weight: Tensor | None,
                 x_slot: int | None, w_slot: int | None, b_slot: int | None,
                 x_shape: torch.Size, param_shape: torch.Size) -> None:
        self.ops = ops
        self.xhat, self.rstd, self.weight = xhat, rstd, weight
        self.in_slots, (self.xp, self.wp, self.bp) = _positions((x_slot, w_slot, b_slot))
        self.x_shape, self.param_shape = x_shape, param_shape
        self.d = xhat.shape[1]

    def jvp(self, dots):
        xd = None if self.xp is None else dots[self.xp].reshape(-1, self.d).contiguous()
        wd = None if self.wp is None else dots[self.wp].reshape(-1)
        bd = None if self.bp is None else dots[self.bp].reshape(-1)
        out = self.ops.layernorm_jvp(self.xhat, self.rstd, xd, self.weight, wd, bd)
        return out.view(self.x_shape)

    def vjp(self, g):
        g2 = g.reshape(-1, self.d).contiguous()
        gx, gw, gb = self.ops.layernorm_vjp(self.xhat, self.rstd, g2, self.weight,
                                            self.xp is not None, self.wp is not None,
                                            self.bp is not None)
        return _active_cotangents((self.xp, self.wp, self.bp), (gx, self.x_shape),
                                  (gw, self.param_shape), (gb, self.param_shape))


class EmbeddingStep(Step):
    """``W[idx]``: JVP ``Ẇ[idx]``; VJP ``index_add`` into a zero weight-shaped tensor.

    Rows at ``padding_idx`` get a zero Jacobian in both directions (torch's backward skips them).
    """

    def __init__(self, idx: Tensor, w_slot: int, num: int, dim: int,
                 padding_idx: int | None) -> None:
        self.in_slots = (w_slot,)
        self.idx = idx
        self.flat_idx = idx.reshape(-1)
        self.num, self.dim, self.padding_idx = num, dim, padding_idx
        self.pad_mask = None if padding_idx is None else (idx == padding_idx).unsqueeze(-1)

    def jvp(self, dots):
        out = F.embedding(self.idx, dots[0])
        if self.pad_mask is not None:
            out.masked_fill_(self.pad_mask, 0)
        return out

    def vjp(self, g):
        gw = g.new_zeros(self.num, self.dim)
        gw.index_add_(0, self.flat_idx, g.reshape(-1, self.dim))
        if self.padding_idx is not None:
            gw[self.padding_idx] = 0
        return [gw]


class ElementwiseStep(Step):
    """A standalone activation: ``σ′ ⊙ ẋ`` both ways."""

    def __init__(self, x_slot: int, dact: Tensor) -> None:
        self.in_slots = (x_slot,)
        self.dact = dact

    def jvp(self, dots):
        return dots[0] * self.dact

    def vjp(self, g):
        return [g * self.dact]


class IdentityStep(Step):
    """Identity (nn.Identity, and Dropout, which the engine treats as inactive)."""

    def __init__(self, x_slot: int) -> None:
        self.in_slots = (x_slot,)

    def jvp(self, dots):
        return dots[0]

    def vjp(self, g):
        return [g]


class ReshapeStep(Step):
    """Any op whose output is a reshape of its one input (flatten, view, squeeze, ...)."""

    def __init__(self, x_slot: int, in_shape: torch.Size, out_shape: torch.Size) -> None:
        self.in_slots = (x_slot,)
        self.in_shape, self.out_shape = in_shape, out_shape

    def jvp(self, dots):
        return dots[0].reshape(self.out_shape)

    def vjp(self, g):
        return [g.reshape(self.in_shape)]


def unbroadcast(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``g`` down to ``shape`` (the adjoint of broadcasting a ``shape`` tensor)."""
    if g.shape == shape:
        return g
    lead = g.dim() - len(shape)
    if lead > 0:
        g = g.sum(tuple(range(lead)))
    dims = [i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g


class AddStep(Step):
    """``Σ cᵢ aᵢ`` (+ constants) with broadcasting: add, sub, ``alpha``, scalar offsets."""

    def __init__(self, slots: Sequence[int], coefs: Sequence[float],
                 shapes: Sequence[torch.Size], out_shape: torch.Size) -> None:
        self.in_slots = tuple(slots)
        self.coefs = tuple(coefs)
        self.shapes = tuple(shapes)
        self.out_shape = out_shape

    def jvp(self, dots):
        out = None
        for d, c in zip(dots, self.coefs):
            if out is None:
                out = d if c == 1 else d * c
            elif c == 1:
                out = out + d
            else:
                out = torch.add(out, d, alpha=c)
        if out.shape != self.out_shape:
            out = out.expand(self.out_shape)
        return out

    def vjp(self, g):
        return [unbroadcast(g if c == 1 else g * c, s) for c, s in zip(self.coefs, self.shapes)]


class ScaleStep(Step):
    """``a * c`` or ``a / c`` for a constant ``c`` (a Python number or an inactive tensor)."""

    def __init__(self, a_slot: int, const: Any, divide: bool, a_shape: torch.Size,
                 out_shape: torch.Size) -> None:
        self.in_slots = (a_slot,)
        self.const, self.divide = const, divide
        self.a_shape, self.out_shape = a_shape, out_shape

    def jvp(self, dots):
        out = dots[0] / self.const if self.divide else dots[0] * self.const
        return out if out.shape == self.out_shape else out.expand(self.out_shape)

    def vjp(self, g):
        g = g / self.const if self.divide else g * self.const
        return [unbroadcast(g, self.a_shape)]


class ProductStep(Step):
    """``a * b`` with both factors active (product rule on the cached factors)."""

    def __init__(self, a_slot: int, b_slot: int, a: Tensor, b: Tensor) -> None:
        self.in_slots = (a_slot, b_slot)
        self.a, self.b = a, b

    def jvp(self, dots):
        return (dots[0] * self.b).addcmul_(self.a, dots[1])

    def vjp(self, g):
        return [unbroadcast(g * self.b, self.a.shape), unbroadcast(g * self.a, self.b.shape)]


class TupleItemStep(Step):
    """``value[i]`` of a tuple-valued active node (e.g. an opaque module returning a tuple)."""

    def __init__(self, x_slot: int, index: int, length: int) -> None:
        self.in_slots = (x_slot,)
        self.index, self.length = index, length

    def jvp(self, dots):
        return dots[0][self.index]

    def vjp(self, g):
        cot = [None] * self.length
        cot[self.index] = g
        return [tuple(cot)]


def _as_tuple(value: Any) -> tuple[tuple[Any, ...], bool]:
    if isinstance(value, (tuple, list)):
        return tuple(value), True
    return (value,), False


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


class LinearFnStep(Step):
    """An op that is linear in its active inputs (permute, cat, sum, mean, getitem, ...).

    JVP: the op applied to the tangents (float constants replaced by zeros); VJP: the pullback
    :func:`torch.func.vjp` returned in the forward (which evaluated the op there, once).
    """

    def __init__(self, slots: Sequence[int], tangent_fn: Callable[..., Any],
                 pullback: Callable[..., Any], out_value: Any) -> None:
        self.in_slots = tuple(slots)
        self.tangent_fn = tangent_fn
        self.pullback = pullback
        outs, self.is_tuple = _as_tuple(out_value)
        self.as_list = isinstance(out_value, list)  # aten.split returns a list
        self.out_meta = [(o.shape, o.dtype) if isinstance(o, Tensor) else None for o in outs]

    def jvp(self, dots):
        return self.tangent_fn(*dots)

    def vjp(self, g):
        gs = g if self.is_tuple else (g,)
        full = []
        for gi, meta in zip(gs, self.out_meta):
            if gi is None and meta is not None:
                gi = torch.zeros(meta[0], dtype=meta[1], device=self._device(gs))
            full.append(gi)
        cots = self.pullback((full if self.as_list else tuple(full)) if self.is_tuple
                             else full[0])
        return list(cots)

    @staticmethod
    def _device(gs) -> torch.device:
        return next(x.device for x in gs if isinstance(x, Tensor))


def build_linear_fn(fn: Callable[..., Any], tangent_fn: Callable[..., Any],
                    primals: Sequence[Tensor], slots: Sequence[int]
                    ) -> tuple[Any, LinearFnStep | None]:
    """Evaluate ``fn(*primals)`` once through :func:`torch.func.vjp` and build its step."""
    plain = fn(*primals)
    outs, _ = _as_tuple(plain)
    if not any(_is_float(o) for o in outs):
        return plain, None
    value, pullback = torch.func.vjp(fn, *primals)
    return value, LinearFnStep(slots, tangent_fn, pullback, value)


class AutogradStep(Step):
    """Per-node fallback for any differentiable op or module without a rule.

    The forward runs once with autograd on detached leaves; a create-graph backward with a
    dummy cotangent ``u`` then gives ``Jᵀu`` as a graph linear in ``u``. VJP: backward through
    the retained graph. JVP: the double-backward (R-operator) trick ``J v = ∂⟨Jᵀu, v⟩/∂u`` — no
    further forward of the op. If the op has no double backward, the JVP falls back to
    forward-mode AD (which evaluates the op again; a custom Function by its own ``jvp``, see
    :mod:`~ngtriton.linearize.functions`). Attention inside
    runs through the math backend of scaled-dot-product attention (the fused kernels have no
    double backward).
    """

    def __init__(self, slots: Sequence[int], fn: Callable[..., Any],
                 primals: Sequence[Tensor]) -> None:
        self.in_slots = tuple(slots)
        self.fn = fn
        self.primals = tuple(p.detach() for p in primals)
        self.forward_mode = False  # True: JVP by torch.func.jvp (no double backward)
        with torch.enable_grad(), math_attention():
            leaves = [p.detach().requires_grad_() for p in primals]
            value = fn(*leaves)
        outs, self.is_tuple = _as_tuple(value)
        self.diff = [i for i, o in enumerate(outs) if isinstance(o, Tensor) and o.requires_grad]
        self.n_out = len(outs)
        if not self.diff:
            self.active = False
            self.value = value
            return
        self.value = (tuple(o.detach() if isinstance(o, Tensor) else o for o in outs)
                      if self.is_tuple else outs[0].detach())
        self.active = True
        self.outs = [outs[i] for i in self.diff]
        self.leaves = leaves
        self.lin: list[tuple[int, Tensor]] = []
        try:
            with torch.enable_grad():
                self.u = [torch.zeros_like(o, requires_grad=True) for o in self.outs]
                grads = torch.autograd.grad(self.outs, leaves, self.u, create_graph=True,
                                            allow_unused=True)
            self.lin = [(k, gr) for k, gr in enumerate(grads) if gr is not None]
            # Jᵀu is linear in u, so it depends on u unless the backward is not differentiable
            # (e.g. @once_differentiable; it may still depend on the leaves)
            on_u = reaching([gr.grad_fn for _, gr in self.lin], *self.u)
            self.forward_mode = not all(depends_on(gr, on_u) for _, gr in self.lin)
        except RuntimeError:
            self.forward_mode = True
        if self.forward_mode:
            self.lin, self.u = [], []
            # forward-mode AD goes through a custom Function only by its own jvp
            missing = functions_without_jvp(custom_functions([o.grad_fn for o in self.outs]))
            if missing:
                raise not_linearizable(missing)

    def _zeros_out(self, i: int) -> Tensor:
        return torch.zeros_like(self.outs[i])

    def _pack(self, diff_tangents: Sequence[Tensor]) -> Any:
        if not self.is_tuple:
            return diff_tangents[0]
        full: list[Any] = [None] * self.n_out
        for i, t in zip(self.diff, diff_tangents):
            full[i] = t
        return tuple(full)

    def jvp(self, dots):
        if not self.forward_mode:
            if not self.lin:
                return self._pack([self._zeros_out(i) for i in range(len(self.outs))])
            try:
                with torch.enable_grad():
                    res = torch.autograd.grad([gr for _, gr in self.lin], self.u,
                                              [dots[k] for k, _ in self.lin],
                                              retain_graph=True, allow_unused=True)
            except RuntimeError:  # e.g. a backward marked once_differentiable
                self.forward_mode = True
            else:
                return self._pack([self._zeros_out(i) if r is None else r
                                   for i, r in enumerate(res)])
        with math_attention():
            t = forward_jvp(self.fn, self.primals, dots)
        ts, _ = _as_tuple(t)
        return self._pack([ts[i] for i in self.diff])

    def vjp(self, g):
        gs = g if self.is_tuple else (g,)
        outs, cots = [], []
        for o, i in zip(self.outs, self.diff):
            if gs[i] is not None:
                outs.append(o)
                cots.append(gs[i])
        if not outs:
            return [None] * len(self.in_slots)
        with torch.enable_grad():
            res = torch.autograd.grad(outs, self.leaves, cots, retain_graph=True,
                                      allow_unused=True)
        return list(res)
