"""What the engine has a rule for: modules, torch functions, tensor methods and ATen ops.

The tables here name each op the builder treats specially (activations, arithmetic, reshapes,
ops linear in their tensor inputs, dropout); everything else runs on the per-node autograd
fallback. The torch-level names serve graphs traced by :mod:`torch.fx`
(:mod:`~ngtriton.linearize.trace`), the ATen ones graphs captured by :func:`torch.export.export`
(:mod:`~ngtriton.linearize.capture`).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node
from torch.nn.utils import parametrize

from .rules import Activation

# --------------------------------------------------------------------------------------------
# What has a rule
# --------------------------------------------------------------------------------------------

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_ACT_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCS: dict[Any, str] = {
    torch.tanh: "tanh", torch.tanh_: "tanh", F.tanh: "tanh",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid",
    torch.special.expit: "sigmoid",
    torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu_: "relu",
    F.silu: "silu",
}
_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu"}

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_SUB_FUNCS = {operator.sub, operator.isub, torch.sub, torch.subtract}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul, torch.multiply}
_DIV_FUNCS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide}
_NEG_FUNCS = {operator.neg, torch.neg, torch.negative}
_ARITH_METHODS = {"add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul",
                  "div": "div", "true_divide": "div", "divide": "div", "neg": "neg",
                  "negative": "neg"}

_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
                  torch.ravel}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                    "reshape_as", "contiguous", "ravel"}
# linear in their (float) tensor arguments; other arguments are structural (dims, sizes, ...)
_LINEAR_FUNCS = {torch.permute, torch.transpose, torch.t, torch.movedim, torch.moveaxis,
                 torch.swapaxes, torch.swapdims, torch.narrow, torch.select, torch.split,
                 torch.chunk, torch.unbind, torch.cat, torch.concat, torch.concatenate,
                 torch.stack, torch.hstack, torch.vstack, torch.sum, torch.mean, torch.clone,
                 torch.flip, torch.roll, torch.tile, torch.diagonal, torch.tril, torch.triu,
                 operator.getitem, builtins.getattr}
_LINEAR_METHODS = {"permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
                   "narrow", "select", "split", "chunk", "unbind", "sum", "mean", "clone", "flip",
                   "roll", "tile", "repeat", "expand", "expand_as", "diagonal", "tril", "triu",
                   "__getitem__", "to", "float", "double", "type_as"}


def _plain(m: nn.Module) -> bool:
    """Whether calling ``m`` is exactly its class's ``forward`` of its own parameters, as the
    rules assume: no forward (pre-)hooks, no parametrization (``weight_norm``, ``register_
    parametrization``), no ``forward`` set on the instance. Other modules run as opaque nodes,
    by calling them."""
    return not (m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
                or "forward" in vars(m))


def _same_forward(m: nn.Module, cls: type) -> bool:
    return isinstance(m, cls) and type(m).forward is cls.forward and _plain(m)


def _module_activation(m: nn.Module) -> Activation | None:
    if not _plain(m):
        return None
    name = _ACT_MODULES.get(type(m))
    if name is not None:
        return Activation(name)
    if type(m) is nn.GELU:
        return Activation("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if type(m) is nn.LeakyReLU:
        return Activation("leaky_relu", float(m.negative_slope))
    if type(m).__module__ == "transformers.activations" and type(m).__name__ in _HF_TANH_GELU:
        return Activation("gelu_tanh")  # Hugging Face's tanh-GELU modules (GPT-2's gelu_new)
    return None


# Hugging Face's activation modules that compute the tanh-approximate GELU (see collapse.py)
_HF_TANH_GELU = frozenset({"NewGELUActivation", "FastGELUActivation", "GELUTanh",
                           "PytorchGELUTanh"})


def _embedding_ok(m: nn.Module) -> bool:
    return (_same_forward(m, nn.Embedding) and m.max_norm is None
            and not m.scale_grad_by_freq)


def _has_module_rule(m: nn.Module) -> bool:
    return (_same_forward(m, nn.Linear) or _same_forward(m, nn.LayerNorm) or _embedding_ok(m)
            or _module_activation(m) is not None or _simple_module(m, _DROPOUT_MODULES)
            or _simple_module(m, (nn.Identity, nn.Flatten, nn.Unflatten)))


def _simple_module(m: nn.Module, types: Any) -> bool:
    """``m`` is exactly one of ``types`` (no subclass), without hooks or parametrizations."""
    return type(m) in types and _plain(m)


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _method_name(node: Node) -> str:
    """A call_method's name with an in-place trailing underscore removed (``add_`` → ``add``)."""
    name = str(node.target)
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


# --------------------------------------------------------------------------------------------
# ATen ops (graphs captured by torch.export): each classified as the torch function it equals
# (same arguments, same positions), so the tables above serve both kinds of graph
# --------------------------------------------------------------------------------------------

_aten = torch.ops.aten
_ATEN_AS_TORCH: dict[Any, Any] = {
    _aten.linear: F.linear, _aten.layer_norm: F.layer_norm, _aten.gelu: F.gelu,
    _aten.gelu_: F.gelu, _aten.leaky_relu: F.leaky_relu, _aten.leaky_relu_: F.leaky_relu_,
    _aten.relu: torch.relu, _aten.relu_: torch.relu_, _aten.tanh: torch.tanh,
    _aten.tanh_: torch.tanh_, _aten.sigmoid: torch.sigmoid, _aten.sigmoid_: torch.sigmoid_,
    _aten.silu: F.silu, _aten.silu_: F.silu,
    _aten.add: torch.add, _aten.add_: operator.iadd, _aten.sub: torch.sub,
    _aten.sub_: operator.isub, _aten.mul: torch.mul, _aten.mul_: operator.imul,
    _aten.div: torch.div, _aten.div_: operator.itruediv, _aten.neg: torch.neg,
    _aten.dropout: torch.dropout, _aten.feature_dropout: torch.feature_dropout,
    _aten.alpha_dropout: torch.alpha_dropout,
    _aten.feature_alpha_dropout: torch.feature_alpha_dropout,
    # reshapes (same elements, same order)
    _aten.view: torch.reshape, _aten._unsafe_view: torch.reshape, _aten.reshape: torch.reshape,
    _aten.unsqueeze: torch.unsqueeze, _aten.squeeze: torch.squeeze,
    _aten.flatten: torch.flatten, _aten.unflatten: torch.unflatten,
    _aten.contiguous: torch.reshape, _aten.alias: torch.reshape, _aten.clone: torch.reshape,
    _aten.view_as: torch.reshape, _aten.reshape_as: torch.reshape,
    # linear in their (float) tensor arguments
    _aten.permute: torch.permute, _aten.transpose: torch.transpose, _aten.t: torch.t,
    _aten.movedim: torch.movedim, _aten.select: torch.select, _aten.slice: torch.narrow,
    _aten.narrow: torch.narrow, _aten.split: torch.split, _aten.split_with_sizes: torch.split,
    _aten.chunk: torch.chunk, _aten.unbind: torch.unbind, _aten.cat: torch.cat,
    _aten.stack: torch.stack, _aten.expand: torch.tile, _aten.sum: torch.sum,
    _aten.mean: torch.mean, _aten.flip: torch.flip, _aten.roll: torch.roll,
    _aten.repeat: torch.tile, _aten.diagonal: torch.diagonal, _aten.tril: torch.tril,
    _aten.triu: torch.triu, _aten.index_select: torch.narrow, _aten.gather: torch.narrow,
    _aten._to_copy: torch.clone, _aten.to: torch.clone,
    _aten.avg_pool1d: torch.sum, _aten.avg_pool2d: torch.sum, _aten.avg_pool3d: torch.sum,
    _aten.adaptive_avg_pool1d: torch.sum, _aten.adaptive_avg_pool2d: torch.sum,
    _aten.adaptive_avg_pool3d: torch.sum,
}


def as_torch(target: Any) -> Any:
    """The torch function an ATen op is classified as (itself when none, or not ATen)."""
    if isinstance(target, torch._ops.OpOverload):
        return _ATEN_AS_TORCH.get(target.overloadpacket, target)
    return target


def functional(target: Any) -> Any:
    """The out-of-place ATen overload of an in-place one (``add_.Tensor`` → ``add.Tensor``),
    and ``reshape`` for ``view`` (a captured graph drops a ``contiguous()`` that the capture's
    strides made a no-op, and the builder's values may be laid out otherwise; nothing is
    written through views, see :mod:`~ngtriton.linearize.capture`); ``target`` otherwise."""
    if not isinstance(target, torch._ops.OpOverload):
        return target
    if target.overloadpacket in (_aten.view, _aten._unsafe_view) and target._overloadname in (
            "default",):
        return _aten.reshape.default
    name = target.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return target
    packet = getattr(_aten, name[:-1], None)
    return getattr(packet, target._overloadname, target) if packet is not None else target
