"""torch's loss modules as the Fisher sees them: a likelihood per row, a row weight, a layout.

The generalised Gauss–Newton matrix of a loss ``L(z, y)`` on the model's outputs ``z`` is
``Jᵀ (∂²L/∂z²) J``. For every loss here the Hessian in ``z`` is block diagonal over *rows*
(an example, or an example's position in a sequence or an image) and equals ``w · F_R(zᵢ)``:
the per-row Fisher of a likelihood times one weight ``w`` (DESIGN.md §6). With R counted rows and
m outputs (classes) per row:

===================  =====================  ==============  ==================
loss                 likelihood             ``mean``: w     ``sum``: w
===================  =====================  ==============  ==================
CrossEntropyLoss     categorical            1/R             1
BCEWithLogitsLoss    bernoulli              1/(R·m)         1
MSELoss              gaussian (½‖y−z‖²)     2/(R·m)         2
GaussianNLLLoss      gaussian, precision    1/(R·m)         1
                     1/max(var, eps)
===================  =====================  ==============  ==================

Rows whose target is CrossEntropyLoss's ``ignore_index`` are out of the Fisher and of R (as
they are out of torch's mean). Label smoothing leaves the Hessian in the logits unchanged and
smooths the gradient's targets. What this table does not cover (class weights, ``pos_weight``,
``reduction='none'``, a subclass with its own ``forward``, a ``var`` that depends on the
parameters) is refused with an error naming ``loss``, never approximated.

Damping is in the loss's units: ``F + λI`` with F this GGN, so a summed loss (R times the
mean's curvature and gradient) takes R times the mean's λ for the same step.

Layout, as torch's losses take it: CrossEntropyLoss's classes are in dim 1 of ``(N, C, d…)``
outputs with targets ``(N, d…)``; outputs ``(..., C)`` with targets flattened to one class
index per row (``logits.view(-1, C)``, ``y.view(-1)`` in the loss call) are read classes-last.
The elementwise losses take targets shaped like the outputs (or like their rows ``(R, m)``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._frames import user_stacklevel
from .likelihoods import Bernoulli, Categorical, Gaussian, GaussianPrecision, Likelihood

__all__ = ["SUPPORTED_LOSSES", "LossCapture", "LossTerms", "check_loss",
           "is_outputs_or_reshape", "likelihood_terms", "loss_terms", "loss_value"]

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, nn.GaussianNLLLoss)


@dataclass
class LossTerms:
    """What :class:`~ngtriton.FisherOperator` needs from a loss on the model's outputs.

    ``GGN = weight · Σᵢ Jᵢᵀ F_R(zᵢ) Jᵢ`` over the counted rows ``zᵢ`` of the outputs, where the
    rows are the outputs with dim 1 moved last when ``classes_in_dim1``, flattened to
    ``(-1, m)``, and restricted to ``keep`` (row indices; None: all).
    """

    likelihood: Likelihood
    weight: float
    classes_in_dim1: bool
    keep: Tensor | None
    targets: Tensor
    """The counted rows' targets, as :attr:`likelihood` takes them."""
    num_rows: int
    num_outputs: int
    """m: outputs per row."""
    flat_rows: bool = False
    """The loss takes the outputs flattened to rows ``(R, m)`` (``logits.view(-1, C)``)."""


def check_loss(loss: Any) -> nn.Module:
    """``loss`` if it is a supported torch loss module in a supported configuration; TypeError
    or ValueError naming ``loss`` otherwise."""
    cls = next((c for c in SUPPORTED_LOSSES if isinstance(loss, c)), None)
    if cls is None:
        names = ", ".join(f"torch.nn.{c.__name__}" for c in SUPPORTED_LOSSES)
        raise TypeError(f"loss: expected one of {names} (a module instance), got "
                        f"{type(loss).__name__}; for another loss pass likelihood= (a "
                        "ngtriton.Likelihood) instead")
    if type(loss).forward is not cls.forward or "forward" in vars(loss):
        raise ValueError(f"loss: {type(loss).__name__} overrides {cls.__name__}.forward; its "
                         "curvature is unknown, so it is refused rather than approximated")
    if loss.reduction not in ("mean", "sum"):
        raise ValueError(f"loss: reduction={loss.reduction!r} is not supported (only 'mean' "
                         "and 'sum' define one scalar loss whose curvature the step follows)")
    if isinstance(loss, nn.CrossEntropyLoss | nn.BCEWithLogitsLoss) and loss.weight is not None:
        raise ValueError(f"loss: {cls.__name__} with weight= (per-class or per-element "
                         "weights) is not supported; it is refused rather than approximated")
    if isinstance(loss, nn.BCEWithLogitsLoss) and loss.pos_weight is not None:
        raise ValueError("loss: BCEWithLogitsLoss with pos_weight= is not supported; it is "
                         "refused rather than approximated")
    return loss


def _classes_last_rows(outputs: Tensor) -> int:
    return outputs.numel() // outputs.shape[-1] if outputs.ndim else 1


def _elementwise_rows(outputs: Tensor) -> tuple[int, int]:
    """Rows and outputs per row of an elementwise loss (1-D outputs: one per row)."""
    if outputs.ndim <= 1:
        return outputs.numel(), 1
    return _classes_last_rows(outputs), outputs.shape[-1]


def _row_view(t: Tensor, classes_in_dim1: bool) -> Tensor:
    """``t`` (shaped like the outputs) as rows ``(-1, m)``."""
    if classes_in_dim1:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)


def loss_terms(loss: nn.Module, outputs: Tensor, targets: Any) -> LossTerms:
    """The :class:`LossTerms` of ``loss(outputs, targets)`` (``targets``: ``(target, var)``
    for GaussianNLLLoss). Errors name ``loss`` or ``targets``."""
    check_loss(loss)
    if targets is None:
        raise ValueError("targets: loss= needs the targets the loss is computed with (they "
                         "decide ignored rows and the mean's count)")
    if not outputs.is_floating_point():
        raise ValueError(f"loss: the model's outputs have dtype {outputs.dtype}; "
                         f"{type(loss).__name__} takes floating-point outputs")
    if isinstance(loss, nn.CrossEntropyLoss):
        return _cross_entropy(loss, outputs, targets)
    if isinstance(loss, nn.GaussianNLLLoss):
        return _gaussian_nll(loss, outputs, targets)
    target = _elementwise_target(loss, outputs, targets)
    rows, m = _elementwise_rows(outputs)
    mean = loss.reduction == "mean"
    if isinstance(loss, nn.MSELoss):  # mean((z − y)²) = 2/(R·m) · Σ ½‖zᵢ − yᵢ‖²
        lik: Likelihood = Gaussian()
        weight = 2.0 / outputs.numel() if mean else 2.0
    else:
        lik = Bernoulli()
        weight = 1.0 / outputs.numel() if mean else 1.0
    rows_out = outputs.detach().reshape(rows, m)
    return LossTerms(lik, weight, False, None,
                     lik.check_targets(rows_out, target.reshape(rows, m)), rows, m)


def _elementwise_target(loss: nn.Module, outputs: Tensor, target: Any) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(target).__name__}")
    if target.shape != outputs.shape and target.shape != _elementwise_rows(outputs):
        raise ValueError(f"targets: {type(loss).__name__} takes targets shaped like the outputs "
                         f"{tuple(outputs.shape)}, got {tuple(target.shape)} (torch would "
                         "broadcast them, a different loss; it is refused)")
    if not target.dtype.is_floating_point:
        raise ValueError(f"targets: {type(loss).__name__} takes floating-point targets, got "
                         f"dtype {target.dtype}")
    return target.to(device=outputs.device, dtype=outputs.dtype)


def _cross_entropy(loss: nn.CrossEntropyLoss, outputs: Tensor, target: Any) -> LossTerms:
    if not isinstance(target, Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(target).__name__}")
    shape, nd = tuple(outputs.shape), outputs.ndim
    if nd == 0:
        raise ValueError("loss: CrossEntropyLoss needs class logits, the model returns a scalar")
    probabilities = target.dtype.is_floating_point
    torch_layout = (target.shape == outputs.shape if probabilities
                    else tuple(target.shape) == (shape[:1] + shape[2:] if nd >= 2 else ()))
    rows = _classes_last_rows(outputs)
    flat = nd >= 3 and tuple(target.shape) == ((rows, shape[-1]) if probabilities else (rows,))
    if not (torch_layout or flat):
        want = (f"{shape} (class probabilities)" if probabilities else
                f"{shape[:1] + shape[2:] if nd >= 2 else ()} (class indices)")
        raise ValueError(f"targets: CrossEntropyLoss on outputs {shape} takes targets shaped "
                         f"{want}, classes in dim 1 as torch has them, or one per row of the "
                         f"outputs read classes-last ({rows},), got {tuple(target.shape)}")
    in_dim1 = torch_layout and nd >= 3
    C = shape[1] if in_dim1 else shape[-1]
    z = _row_view(outputs.detach(), in_dim1)
    eps = float(loss.label_smoothing)
    keep = None
    if probabilities:
        t = _row_view(target, in_dim1).to(device=outputs.device, dtype=outputs.dtype)
        t = Categorical().check_targets(z, t)
    else:
        y = target.reshape(-1).to(outputs.device)
        counted = y != loss.ignore_index
        if not bool(counted.all()):
            keep = counted.nonzero().squeeze(-1)
            y, z = y[keep], z[keep]
        if y.numel() == 0:
            raise ValueError(f"targets: every target is ignore_index ({loss.ignore_index}): no "
                             "row counts (torch's mean would be NaN)")
        y = Categorical().check_targets(z, y)
        t = y if eps == 0 else F.one_hot(y, C).to(outputs.dtype)
    if eps:
        t = t * (1.0 - eps) + eps / C
    count = z.shape[0]
    weight = 1.0 / count if loss.reduction == "mean" else 1.0
    return LossTerms(Categorical(), weight, in_dim1, keep, t, count, C, flat and not torch_layout)


def _gaussian_nll(loss: nn.GaussianNLLLoss, outputs: Tensor, targets: Any) -> LossTerms:
    if not (isinstance(targets, tuple | list) and len(targets) == 2):
        raise TypeError("targets: GaussianNLLLoss takes targets=(target, var), the two "
                        f"arguments after the input, got {type(targets).__name__}")
    target, var = targets
    target = _elementwise_target(loss, outputs, target)
    if isinstance(var, float | int) and not isinstance(var, bool):
        var = torch.full_like(outputs, float(var))
    if not isinstance(var, Tensor):
        raise TypeError(f"targets: var must be a Tensor or a number, got {type(var).__name__}")
    if var.requires_grad:
        raise ValueError("loss: GaussianNLLLoss with a var that depends on trainable "
                         "parameters (a heteroscedastic model) is not supported; pass var "
                         "detached if it is data")
    if var.shape != outputs.shape and var.shape == outputs.shape[:-1]:
        var = var.unsqueeze(-1)
    try:
        var = torch.broadcast_to(var, outputs.shape)
    except RuntimeError:
        raise ValueError(f"targets: var of shape {tuple(var.shape)} does not fit the outputs "
                         f"{tuple(outputs.shape)}") from None
    if bool((var < 0).any()):
        raise ValueError("targets: var has negative entries")
    precision = 1.0 / var.to(device=outputs.device, dtype=outputs.dtype).clamp(min=loss.eps)
    rows, m = _elementwise_rows(outputs)
    weight = 1.0 / outputs.numel() if loss.reduction == "mean" else 1.0
    lik = GaussianPrecision(precision.reshape(rows, m))
    rows_out = outputs.detach().reshape(rows, m)
    return LossTerms(lik, weight, False, None,
                     lik.check_targets(rows_out, target.reshape(rows, m)), rows, m)


def _rows(targets: Any, out_shape: torch.Size) -> Any:
    """Targets laid out like the model's outputs ``(..., m)``, or like them without the last
    dimension (class indices), flattened to rows as the outputs are; others as given (the
    likelihood then checks them against the rows ``(N, m)``)."""
    if isinstance(targets, Tensor) and len(out_shape) > 2:
        if targets.shape == out_shape:
            return targets.reshape(-1, out_shape[-1])
        if targets.shape == out_shape[:-1]:
            return targets.reshape(-1)
    return targets


def likelihood_terms(likelihood: Likelihood, out: Tensor, targets: Any) -> LossTerms:
    """The low-level interface as :class:`~ngtriton.losses.LossTerms`: rows ``(..., m)`` with
    the classes last, every row counted, weight 1/N (the mean over rows)."""
    m = 1 if out.ndim <= 1 else out.shape[-1]
    rows = out.detach().reshape(-1, m)
    n = rows.shape[0]
    if isinstance(likelihood, Categorical) and isinstance(targets, Tensor) and out.ndim > 2 \
            and not targets.dtype.is_floating_point:
        torch_layout = targets.shape == (out.shape[0], *out.shape[2:])
        classes_last = targets.shape == out.shape[:-1]
        if torch_layout and not classes_last:
            raise ValueError(f"targets: shaped {tuple(targets.shape)} for torch's (N, C, d…) "
                             "class layout; likelihood='categorical' takes the classes in the "
                             f"last dimension of the outputs {tuple(out.shape)}. For torch's "
                             "layout pass loss=torch.nn.CrossEntropyLoss()")
        if torch_layout:  # both layouts fit: say which one is used
            warnings.warn(f"targets: the outputs {tuple(out.shape)} are read with the classes "
                          "in the last dimension (likelihood='categorical'), while torch's "
                          "cross_entropy would read them in dim 1; pass "
                          "loss=torch.nn.CrossEntropyLoss() for torch's layout",
                          stacklevel=user_stacklevel())
    checked = None if targets is None else likelihood.check_targets(rows, _rows(targets,
                                                                                out.shape))
    return LossTerms(likelihood, 1.0 / n, False, None, checked, n, m)


def loss_value(loss: nn.Module, outputs: Tensor, targets: Any, flat_rows: bool = False
               ) -> Tensor:
    """``loss(outputs, targets)`` as the closure computes it (GaussianNLLLoss: targets
    ``(target, var)``; ``flat_rows``: on the outputs flattened to rows, classes last)."""
    if flat_rows:
        outputs = outputs.reshape(-1, outputs.shape[-1])
    if isinstance(loss, nn.GaussianNLLLoss):
        return loss(outputs, *targets)
    return loss(outputs, targets)


class LossCapture:
    """Records the arguments of every call of a torch loss module while active (a forward
    pre-hook): how an optimizer learns the targets its closure's loss was computed with.

    ``with LossCapture(loss) as cap: closure()`` then ``cap.input``, ``cap.targets`` (the
    argument after the input; ``(target, var)`` for GaussianNLLLoss) and ``cap.calls``.
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = check_loss(loss)
        self.calls = 0
        self.input: Tensor | None = None
        self.targets: Any = None
        self._handle: RemovableHandle | None = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("input", "target", "var")
        values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        self.calls += 1
        self.input = values[0] if values else None
        rest = values[1:]
        self.targets = tuple(rest) if isinstance(module, nn.GaussianNLLLoss) else (
            rest[0] if rest else None)

    def __enter__(self) -> LossCapture:
        self.calls, self.input, self.targets = 0, None, None
        self._handle = self.loss.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def is_outputs_or_reshape(loss_input: Any, outputs: Tensor) -> bool:
    """Whether ``loss_input`` is ``outputs`` itself or a reshape of all of it (same memory, same
    element order), or an fp32/fp64 copy of bf16/fp16 outputs (an exact upcast, as under
    autocast): the cases where ``loss=`` on the model's outputs is the closure's loss."""
    if loss_input is outputs:
        return True
    if not isinstance(loss_input, Tensor) or loss_input.numel() != outputs.numel():
        return False
    if (loss_input.dtype == outputs.dtype and loss_input.is_contiguous()
            and outputs.is_contiguous() and loss_input.data_ptr() == outputs.data_ptr()):
        return True
    # an exact upcast of low-precision outputs (``logits.float()`` under autocast), reshaped or
    # not: the same numbers, so the same loss of the model's outputs (checked by value)
    return (outputs.dtype in (torch.bfloat16, torch.float16)
            and loss_input.dtype in (torch.float32, torch.float64)
            and torch.equal(loss_input.reshape(-1), outputs.reshape(-1).to(loss_input.dtype)))

