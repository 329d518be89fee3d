"""Where a graph node meets its rule, for the layers beyond Linear and LayerNorm.

One table, :data:`FUNCTION_RULES`, maps a torch function or an ATen op (matched by its overload
packet, so every overload) to the function that builds its step; :data:`MODULE_RULES` does the
same for a torch.nn module type met as one fx node. Each builder returns False when the call is
outside what its rule covers (a transposed convolution, grouped-query attention, ...): the node
then takes the per-node autograd fallback, which is exact. Adding a rule is one entry here and
its step beside it (:mod:`~ngtriton.linearize.convolution`, :mod:`~ngtriton.linearize.batchnorm`,
:mod:`~ngtriton.linearize.attention`), with its test in ``tests/linearize/test_layer_rules.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Node

from .attention import AttentionStep, attention_supported
from .batchnorm import BatchNormStep
from .classify import _arg, _plain
from .convolution import ConvStep, conv_forward, conv_geometry
from .pooling import MaxPoolStep, max_pool_with_indices
from .products import MatmulStep, SoftmaxStep, matmul_operands_ok, softmax_value
from .rmsnorm import RMSNormStep, rms_norm_parts
from .rules import ElementwiseStep, EmbeddingStep, LinearStep, build_linear_fn

if TYPE_CHECKING:
    from .builder import _Builder

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "function_rule", "module_rule"]

_aten = torch.ops.aten
Rule = Callable[["_Builder", Node], bool]


class TransposedLinearStep(LinearStep):
    """``x W + b`` with ``W`` stored ``(in, out)`` (``addmm``, ``mm``; Hugging Face's
    ``Conv1D``): a Linear step on the transposed view, whose weight tangent and cotangent are
    transposed on the way in and out."""

    def jvp(self, dots, epilogue=None):
        if self.wp is not None:
            dots = list(dots)
            dots[self.wp] = dots[self.wp].t()
        return super().jvp(dots, epilogue)

    def vjp(self, g):
        cots = super().vjp(g)
        if self.wp is not None:
            cots[self.wp] = cots[self.wp].t()
        return cots


# -- convolution -------------------------------------------------------------------------------

def _conv(b: _Builder, node: Node, x_arg: Any, w_arg: Any, bias_arg: Any, stride: Any,
          padding: Any, dilation: Any, groups: Any) -> bool:
    (x, x_slot), (w, w_slot), (bias, b_slot) = (b._src(a) for a in (x_arg, w_arg, bias_arg))
    if not isinstance(x, Tensor) or not isinstance(w, Tensor) or w.dim() < 3:
        return False
    return _conv_step(b, node, x, w, bias, (x_slot, w_slot, b_slot), b._val(stride),
                      b._val(padding), b._val(dilation), int(b._val(groups)))


def _conv_step(b: _Builder, node: Node, x: Tensor, w: Tensor, bias: Tensor | None,
               slots: tuple[int | None, int | None, int | None], stride: Any, padding: Any,
               dilation: Any, groups: int, value: Tensor | None = None) -> bool:
    """The convolution's value (``value``: a recorded one) and step, from resolved operands;
    False for a geometry the rule does not cover (unbatched input, odd "same" padding)."""
    geometry = conv_geometry(w, stride, padding, dilation)
    if geometry is None or not isinstance(x, Tensor) or x.dim() != w.dim():
        return False
    stride_, padding_, dilation_ = geometry
    if value is None:
        value = conv_forward(x, w, bias, stride_, padding_, dilation_, groups)
    if all(sl is None for sl in slots):
        b.values[node] = value
        return True
    b._add(node, ConvStep(x, w, *slots, stride_, padding_, dilation_, groups, value.shape),
           value)
    return True


def _conv_function(b: _Builder, node: Node) -> bool:
    """``F.conv{1,2,3}d`` / ``aten.conv{1,2,3}d``: (input, weight, bias, stride, padding,
    dilation, groups)."""
    return _conv(b, node, _arg(node, 0, "input"), _arg(node, 1, "weight"),
                 _arg(node, 2, "bias"), _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                 _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1))


def _convolution(b: _Builder, node: Node) -> bool:
    """``aten.convolution``: (input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups)."""
    if b._val(_arg(node, 6, "transposed")):
        return False
    return _conv(b, node, _arg(node, 0, "input"), _arg(node, 1, "weight"),
                 _arg(node, 2, "bias"), _arg(node, 3, "stride"), _arg(node, 4, "padding"),
                 _arg(node, 5, "dilation"), _arg(node, 8, "groups"))


def _conv_module(b: _Builder, node: Node, mod: nn.Module) -> bool:
    if (type(mod) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or not _plain(mod)
            or mod.padding_mode != "zeros" or len(node.args) + len(node.kwargs) != 1):
        return False
    x_arg = node.args[0] if node.args else next(iter(node.kwargs.values()))
    return _module_conv(b, node, mod, x_arg)


def _module_conv(b: _Builder, node: Node, mod: nn.Module, x_arg: Any) -> bool:
    x, x_slot = b._src(x_arg)
    (w, w_slot), (bias, b_slot) = b._param(mod.weight), b._param(mod.bias)
    value = b._recorded(node, x) if isinstance(x, Tensor) else None
    return _conv_step(b, node, x, w, bias, (x_slot, w_slot, b_slot), mod.stride, mod.padding,
                      mod.dilation, mod.groups, value)


# -- batch norm --------------------------------------------------------------------------------

def _batch_norm(b: _Builder, node: Node, x_arg: Any, w_arg: Any, bias_arg: Any, rm_arg: Any,
                rv_arg: Any, training: Any, momentum: Any, eps: Any) -> bool:
    x, x_slot = b._src(x_arg)
    w, w_slot = b._src(w_arg)
    bias, b_slot = b._src(bias_arg)
    rm, rv = b._val(rm_arg), b._val(rv_arg)
    if b._slot(rm_arg) is not None or b._slot(rv_arg) is not None or not isinstance(x, Tensor):
        return False
    if x.dim() < 2:
        return False
    batch_stats = bool(b._val(training)) or rm is None
    eps = float(b._val(eps))
    # the value through torch itself (it updates the running statistics in train mode: the
    # build keeps the model's buffers, see buffers_kept)
    value = F.batch_norm(x, rm, rv, w, bias, bool(b._val(training)), float(b._val(momentum)
                         if b._val(momentum) is not None else 0.0), eps)
    if x_slot is None and w_slot is None and b_slot is None:
        b.values[node] = value
        return True
    b._add(node, _batch_norm_step(x, w, rm, rv, eps, batch_stats, (x_slot, w_slot, b_slot)),
           value)
    return True


def _batch_norm_step(x: Tensor, w: Tensor | None, rm: Tensor | None, rv: Tensor | None,
                     eps: float, batch_stats: bool,
                     slots: tuple[int | None, int | None, int | None]) -> BatchNormStep:
    """The step, with the statistics it normalises by: the batch's (in fp32 at least) or the
    running ones."""
    if batch_stats:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(xf, [0, *range(2, x.dim())], correction=0)
    else:
        mean, var = rm, rv
    return BatchNormStep(x, w, mean, var, eps, batch_stats, *slots)


def _batch_norm_function(b: _Builder, node: Node) -> bool:
    """``F.batch_norm``: (input, running_mean, running_var, weight, bias, training, momentum,
    eps)."""
    return _batch_norm(b, node, _arg(node, 0, "input"), _arg(node, 3, "weight"),
                       _arg(node, 4, "bias"), _arg(node, 1, "running_mean"),
                       _arg(node, 2, "running_var"), _arg(node, 5, "training", False),
                       _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5))


def _batch_norm_aten(b: _Builder, node: Node) -> bool:
    """``aten.batch_norm``: (input, weight, bias, running_mean, running_var, training,
    momentum, eps, cudnn_enabled)."""
    return _batch_norm(b, node, _arg(node, 0, "input"), _arg(node, 1, "weight"),
                       _arg(node, 2, "bias"), _arg(node, 3, "running_mean"),
                       _arg(node, 4, "running_var"), _arg(node, 5, "training"),
                       _arg(node, 6, "momentum"), _arg(node, 7, "eps"))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_norm_module(b: _Builder, node: Node, mod: nn.Module) -> bool:
    if (type(mod) not in _BATCH_NORMS or not _plain(mod)
            or len(node.args) + len(node.kwargs) != 1):
        return False
    x_arg = node.args[0] if node.args else next(iter(node.kwargs.values()))
    x, x_slot = b._src(x_arg)
    w, w_slot = b._param(mod.weight)
    _bias, b_slot = b._param(mod.bias)
    if not isinstance(x, Tensor) or x.dim() < 2:
        return False
    batch_stats = mod.training or mod.running_mean is None
    value = b._recorded(node, x)
    if value is None:  # the module itself: its statistics update is undone by buffers_kept
        value = mod(x)
    if x_slot is None and w_slot is None and b_slot is None:
        b.values[node] = value
        return True
    b._add(node, _batch_norm_step(x, w, mod.running_mean, mod.running_var, mod.eps,
                                  batch_stats, (x_slot, w_slot, b_slot)), value)
    return True


# -- attention ---------------------------------------------------------------------------------

def _attention(b: _Builder, node: Node) -> bool:
    """``F.scaled_dot_product_attention`` / its ATen op: (query, key, value, attn_mask,
    dropout_p, is_causal, scale, enable_gqa); dropout_p is ignored (dropout is off)."""
    if not hasattr(b.ops, "attention_jvp"):
        return False
    args = [_arg(node, i, n) for i, n in enumerate(("query", "key", "value"))]
    (q, qs), (k, ks), (v, vs) = (b._src(a) for a in args)
    mask_arg = _arg(node, 3, "attn_mask")
    mask = b._val(mask_arg)
    if b._slot(mask_arg) is not None or not all(isinstance(t, Tensor) for t in (q, k, v)):
        return False
    if mask is not None and not isinstance(mask, Tensor):
        return False
    if not attention_supported(q, k, v, mask):
        return False
    causal = bool(b._val(_arg(node, 5, "is_causal", False)))
    scale = b._val(_arg(node, 6, "scale"))
    if causal and mask is not None:
        return False  # torch refuses the pair as well
    step = AttentionStep(b.ops, q, k, v, mask, causal, scale, (qs, ks, vs))
    b._add(node, step, step.value)
    return True


# -- RMSNorm --------------------------------------------------------------------------------

def _rms_norm(b: _Builder, node: Node, x_arg: Any, shape: Any, w_arg: Any, eps: Any) -> bool:
    (x, x_slot), (w, w_slot) = b._src(x_arg), b._src(w_arg)
    return _rms_norm_step(b, node, x, x_slot, w, w_slot, tuple(b._val(shape)), b._val(eps))


def _rms_norm_function(b: _Builder, node: Node) -> bool:
    """``F.rms_norm`` / ``aten.rms_norm``: (input, normalized_shape, weight, eps)."""
    return _rms_norm(b, node, _arg(node, 0, "input"), _arg(node, 1, "normalized_shape"),
                     _arg(node, 2, "weight"), _arg(node, 3, "eps"))


def _rms_norm_module(b: _Builder, node: Node, mod: nn.Module) -> bool:
    if not _plain(mod) or len(node.args) + len(node.kwargs) != 1:
        return False
    x, x_slot = b._src(node.args[0] if node.args else next(iter(node.kwargs.values())))
    w, w_slot = b._param(mod.weight)
    return _rms_norm_step(b, node, x, x_slot, w, w_slot, tuple(mod.normalized_shape), mod.eps)


def _rms_norm_step(b: _Builder, node: Node, x: Any, x_slot: int | None, w: Tensor | None,
                   w_slot: int | None, shape: tuple[int, ...], eps: float | None) -> bool:
    if not isinstance(x, Tensor) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        return False
    if x_slot is None and w_slot is None:
        return False
    xhat, r = rms_norm_parts(x, len(shape), eps)
    value = xhat if w is None else xhat * w
    b._add(node, RMSNormStep(xhat, r, w, len(shape), x_slot, w_slot), value)
    return True


# -- Linear in other clothes, and embeddings ----------------------------------------------------

def _transposed_linear(b: _Builder, node: Node, x_arg: Any, w_arg: Any,
                       bias_arg: Any) -> bool:
    x, x_slot = b._src(x_arg)
    w, w_slot = b._src(w_arg)
    bias, b_slot = b._src(bias_arg)
    if not (isinstance(x, Tensor) and isinstance(w, Tensor)) or x.dim() != 2 or w.dim() != 2:
        return False
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (w.shape[1],)):
        return False
    value = b._recorded_rows(node, x)  # the closure's forward of a Conv1D layer
    if value is None:
        value = x @ w if bias is None else torch.addmm(bias, x, w)
    if x_slot is None and w_slot is None and b_slot is None:
        b.values[node] = value
        return True
    step = TransposedLinearStep(b.ops, x, w.t(), None, x_slot, w_slot, b_slot, x.shape,
                                value.shape)
    b._add(node, step, value)
    return True


def _addmm(b: _Builder, node: Node) -> bool:
    """``addmm(bias, x, W)`` with beta = alpha = 1: ``x W + bias``."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
        return False
    return _transposed_linear(b, node, _arg(node, 1, "mat1"), _arg(node, 2, "mat2"),
                              _arg(node, 0, "input"))


def _mm(b: _Builder, node: Node) -> bool:
    return _transposed_linear(b, node, _arg(node, 0, "input"), _arg(node, 1, "mat2"), None)


def _embedding_aten(b: _Builder, node: Node) -> bool:
    """``aten.embedding``: (weight, indices, padding_idx = -1, scale_grad_by_freq, sparse)."""
    if b._val(_arg(node, 3, "scale_grad_by_freq", False)):
        return False
    w, w_slot = b._src(_arg(node, 0, "weight"))
    idx = b._val(_arg(node, 1, "indices"))
    pad = int(b._val(_arg(node, 2, "padding_idx", -1)))
    if w_slot is None or not isinstance(w, Tensor) or b._slot(_arg(node, 1, "indices")):
        return False
    value = F.embedding(idx, w)
    padding = None if pad < 0 else pad
    b._add(node, EmbeddingStep(idx, w_slot, w.shape[0], w.shape[1], padding), value)
    return True


# -- products, softmax, powers ---------------------------------------------------------------

def _matmul(b: _Builder, node: Node) -> bool:
    """``a @ b`` / ``bmm`` with both operands of one rank (eager attention's products)."""
    a_arg, b_arg = _arg(node, 0, "input"), _arg(node, 1, "other" if "mat2" not in node.kwargs
                                                else "mat2")
    (x, xs), (y, ys) = b._src(a_arg), b._src(b_arg)
    if not matmul_operands_ok(x, y) or (xs is None and ys is None):
        return False
    b._add(node, MatmulStep(x, y, xs, ys), x @ y)
    return True


def _softmax(b: _Builder, node: Node) -> bool:
    """``softmax(x, dim[, dtype])`` (``F.softmax``, ``aten.softmax.int``, ``aten._softmax``)."""
    x, x_slot = b._src(_arg(node, 0, "input"))
    dim = b._val(_arg(node, 1, "dim"))
    target = node.target
    if target is F.softmax:  # (input, dim, _stacklevel, dtype)
        dtype = b._val(_arg(node, 3, "dtype"))
    elif isinstance(target, torch._ops.OpOverload) and target.overloadpacket is _aten._softmax:
        dtype = torch.float32 if b._val(_arg(node, 2, "half_to_float")) else None
    else:  # torch.softmax, aten.softmax: (input, dim, dtype)
        dtype = b._val(_arg(node, 2, "dtype"))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return False
    if x_slot is None or not isinstance(x, Tensor) or not isinstance(dim, int):
        return False
    value = softmax_value(x, dim, dtype)
    b._add(node, SoftmaxStep(value, dim, x_slot), value)
    return True


def _pow(b: _Builder, node: Node) -> bool:
    """``x ** c`` for a number ``c``: elementwise, with derivative ``c x^(c-1)``."""
    x, x_slot = b._src(_arg(node, 0, "input"))
    c = b._val(_arg(node, 1, "exponent"))
    if (x_slot is None or not isinstance(x, Tensor) or isinstance(c, bool)
            or not isinstance(c, (int, float)) or c == 0):
        return False
    b._add(node, ElementwiseStep(x_slot, x.pow(c - 1).mul_(c)), x.pow(c))
    return True



_LINEAR_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d,
                   nn.ZeroPad3d)


def _linear_module(b: _Builder, node: Node, mod: nn.Module) -> bool:
    """Average pooling and zero padding: linear in their input, so the JVP applies the module
    to the tangent and the VJP is its pullback."""
    if not _plain(mod) or len(node.args) + len(node.kwargs) != 1:
        return False
    x_arg = node.args[0] if node.args else next(iter(node.kwargs.values()))
    x, x_slot = b._src(x_arg)
    if x_slot is None or not isinstance(x, Tensor):
        return False
    value, step = build_linear_fn(mod, mod, [x], [x_slot])
    if step is None:
        b.values[node] = value
    else:
        b._add(node, step, value)
    return True


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _max_pool_module(b: _Builder, node: Node, mod: nn.Module) -> bool:
    if not _plain(mod) or mod.return_indices or len(node.args) + len(node.kwargs) != 1:
        return False
    x, x_slot = b._src(node.args[0] if node.args else next(iter(node.kwargs.values())))
    if x_slot is None or not isinstance(x, Tensor):
        return False
    pooled = max_pool_with_indices(x, mod)
    if pooled is None:
        return False
    b._add(node, MaxPoolStep(pooled[1], x.shape, x_slot), pooled[0])
    return True


def _max_pool_function(b: _Builder, node: Node) -> bool:
    """``F.max_pool{1,2,3}d`` / ``aten.max_pool{1,2,3}d``: (input, kernel_size, stride,
    padding, dilation, ceil_mode)."""
    x, x_slot = b._src(_arg(node, 0, "input"))
    kernel = b._val(_arg(node, 1, "kernel_size"))
    if x_slot is None or not isinstance(x, Tensor) or b._val(_arg(node, 6, "return_indices")):
        return False
    dims = len(kernel) if isinstance(kernel, (list, tuple)) else None
    name = getattr(node.target, "__name__", "")
    for d in (1, 2, 3):
        if f"max_pool{d}d" in name:
            dims = d
    if dims is None or x.dim() != dims + 2:
        return False
    stride = b._val(_arg(node, 2, "stride")) or None  # aten's default is []
    value, idx = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1](
        x, kernel, stride, b._val(_arg(node, 3, "padding", 0)),
        b._val(_arg(node, 4, "dilation", 1)), ceil_mode=bool(b._val(_arg(node, 5, "ceil_mode"))),
        return_indices=True)
    b._add(node, MaxPoolStep(idx, x.shape, x_slot), value)
    return True


MODULE_RULES: dict[type, Callable[[_Builder, Node, nn.Module], bool]] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv_module),
    **dict.fromkeys(_BATCH_NORMS, _batch_norm_module),
    **dict.fromkeys(_LINEAR_MODULES, _linear_module),
    **dict.fromkeys(_MAX_POOLS, _max_pool_module),
    nn.RMSNorm: _rms_norm_module,
}


FUNCTION_RULES: dict[Any, Rule] = {
    torch.matmul: _matmul, torch.bmm: _matmul, _aten.matmul: _matmul, _aten.bmm: _matmul,
    F.softmax: _softmax, torch.softmax: _softmax, _aten.softmax: _softmax,
    _aten._softmax: _softmax,
    torch.pow: _pow, _aten.pow: _pow, operator.pow: _pow,
    F.max_pool1d: _max_pool_function, F.max_pool2d: _max_pool_function,
    F.max_pool3d: _max_pool_function, _aten.max_pool1d: _max_pool_function,
    _aten.max_pool2d: _max_pool_function, _aten.max_pool3d: _max_pool_function,
    F.conv1d: _conv_function, F.conv2d: _conv_function, F.conv3d: _conv_function,
    _aten.conv1d: _conv_function, _aten.conv2d: _conv_function, _aten.conv3d: _conv_function,
    _aten.convolution: _convolution,
    F.batch_norm: _batch_norm_function, _aten.batch_norm: _batch_norm_aten,
    F.scaled_dot_product_attention: _attention, _aten.scaled_dot_product_attention: _attention,
    torch.addmm: _addmm, _aten.addmm: _addmm, _aten.mm: _mm,
    _aten.embedding: _embedding_aten,
    F.rms_norm: _rms_norm_function, _aten.rms_norm: _rms_norm_function,
}


METHOD_RULES: dict[str, Rule] = {"pow": _pow, "__pow__": _pow, "softmax": _softmax,
                                  "matmul": _matmul, "bmm": _matmul, "__matmul__": _matmul}


def function_rule(target: Any) -> Rule | None:
    """The rule for a call_function node's ``target`` (an ATen overload by its packet), or for
    a call_method node's method name."""
    if isinstance(target, str):
        return METHOD_RULES.get(target)
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    try:
        return FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable callable
        return None


def module_rule(mod: nn.Module) -> Callable[[_Builder, Node, nn.Module], bool] | None:
    """The rule for a module called as one node (its exact type; subclasses are opaque)."""
    return MODULE_RULES.get(type(mod))
