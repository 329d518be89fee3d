"""NGD: a natural-gradient ``torch.optim.Optimizer`` in the style of Hessian-free optimisation.

One step solves ``(F + λI) n = g`` matrix-free (F: the Fisher of the model on the batch the
closure ran, g: the parameters' ``.grad``) and moves ``θ ← θ − lr·n``. Around that core sit the
practical pieces of Martens (2010) and Martens & Sutskever (2012): Levenberg–Marquardt damping
adapted from the reduction ratio ρ, rejection of steps that raise the loss, an optional warm start
of the solver, an optional curvature subsample, caps on the solver's iterations, weight decay, and
a guard that keeps non-finite numbers away from the parameters.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ._frames import user_stacklevel
from .fisher import FISHER_TYPES, FisherOperator
from .likelihoods import Likelihood, get_likelihood
from .linearize import BACKENDS, ForwardRecord
from .solvers import DUAL_DIRECT_MAX_ROWS, METHODS, Workspace, solve
from .solvers._vecops import acc_dtype, all_finite, norm

# Defaults tuned on the digits MLP 64-128-128-10 (tanh, batch 256, 2-core CPU), see
# benchmarks/bench_optim.py: a handful of CG iterations on a moderately damped Fisher is the
# cheapest way to a low loss; the LM rule then moves the damping where the batch needs it.
DEFAULT_DAMPING = 1e-1
DEFAULT_DAMPING_FLOOR = 1e-4
DEFAULT_DAMPING_CEILING = 1e4
DEFAULT_TOL = 1e-3
DEFAULT_MAXITER = 20
# Methods NGD can run: its right-hand side is the closure's gradient, so there is no factor b
# with Aᵀb = g and the dual Krylov solve (which needs one) is out; "dual" is the exact one.
NGD_METHODS = tuple(m for m in METHODS if m != "dual-krylov")
WARM_START_METHODS = ("auto", "cg", "minres")


@dataclass
class NGDStats:
    """Diagnostics of one :meth:`NGD.step` (``opt.last_stats``; ``opt.history``: as dicts).

    ``reason`` is ``"accepted"``, ``"rejected"`` (the trial loss was higher: parameters restored),
    or, for a step skipped because a value was not finite (nothing reached the parameters; counted
    in ``skipped_total``): ``"nonfinite_loss"`` (the closure's loss), ``"nonfinite_grad"`` (the
    parameters' ``.grad``), ``"nonfinite_curvature"`` (a Fisher product, or the quadratic model
    built from one), ``"nonfinite_solution"`` (the solver's result), ``"nonfinite_step"``
    (``lr·n`` or ``θ − lr·n`` overflowed) or ``"nonfinite_trial_loss"`` (the loss at the trial
    point; the parameters were restored).
    """

    step: int
    loss: float
    trial_loss: float
    accepted: bool
    reason: str
    iterations: int
    residual: float
    converged: bool
    method: str
    damping: float
    next_damping: float
    rho: float
    predicted_reduction: float
    actual_reduction: float
    grad_norm: float
    step_norm: float
    time: float
    skipped_total: int
    rejected_total: int


def _positive(name: str, value: Any, *, allow_zero: bool = False, upper: float | None = None
              ) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if upper is not None:
        ok = ok and value <= upper
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        extra = f" and ≤ {upper:g}" if upper is not None else ""
        raise ValueError(f"{name}: expected a finite number {bound}{extra}, got {value!r}")
    return value


NONFINITE_MODES = ("skip", "raise")

# Where the damping restarts when a bad step must raise it from exactly 0 (damping_floor = 0).
_RESTART_DAMPING = DEFAULT_DAMPING_FLOOR


class NonFiniteError(FloatingPointError):
    """Raised by ``NGD(..., nonfinite="raise")`` when a step meets a non-finite value.

    It is raised after the step's bookkeeping (``skipped_total``, the raised damping, the
    ``history`` entry) with every parameter bit for bit as before the step. ``reason`` is the
    :class:`NGDStats` reason (``"nonfinite_loss"``, ``"nonfinite_grad"``, ...), ``what`` names the
    non-finite quantity (``"loss"``, ``"gradient"``, ``"Fisher product"``, ...), ``step`` the
    optimizer's step count.
    """

    def __init__(self, message: str, *, reason: str, what: str, step: int) -> None:
        super().__init__(message)
        self.reason, self.what, self.step = reason, what, step


# What autograd says when a closure differentiates tensors that evaluation mode froze.
_NEEDS_GRAD = re.compile(r"requires_grad|require grad|`inputs` argument to `\w+\(\)`")


class _ProductWatch:
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


def _guarded(product: Callable[..., Tensor], watch: _ProductWatch) -> Callable[..., Tensor]:
    def guarded(v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = product(v, *args, **kwargs)
        watch.see(out)
        return out
    return guarded


class _GuardedOperator:
    """A :class:`FisherOperator` whose products report to a :class:`_ProductWatch`.

    The guarded products are bound once (CG calls one per iteration) and refer to the watch,
    not to this object, so no reference cycle keeps the operator's cached forward alive.
    """

    PRODUCTS = frozenset({"fisher_matvec", "damped_matvec", "factor_matvec", "factor_rmatvec",
                          "factor_matmat", "factor_rmatmat"})

    def __init__(self, op: FisherOperator) -> None:
        self._op = op
        self.watch = _ProductWatch(op.device)
        for name in self.PRODUCTS:
            product = getattr(op, name, None)
            if product is not None:
                setattr(self, name, _guarded(product, self.watch))

    def __getattr__(self, name: str) -> Any:  # everything but the products: the operator's
        return getattr(self._op, name)

    def any_bad(self) -> bool:
        return self.watch.any_bad()


def _as_positional(model: nn.Module, args: tuple, kwargs: dict[str, Any]
                   ) -> tuple[tuple, dict[str, Any]]:
    """The keyword arguments folded into positional ones (defaults filled in) where
    ``model.forward``'s signature allows it, so the engine can trace the model itself; else
    unchanged (then :class:`_BoundKwargs` binds them)."""
    if not kwargs:
        return args, kwargs
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    params = list(sig.parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = [p for p in params if p not in named]
    if any(p.kind != p.VAR_KEYWORD for p in rest) or any(bound.arguments.get(p.name)
                                                         for p in rest):
        return args, kwargs  # keyword-only parameters, or keywords only **kwargs takes
    given = [p.name in bound.arguments for p in named]
    named = named[:max(i for i, g in enumerate(given) if g) + 1]  # defaults after: the engine's
    if any(p.name not in bound.arguments and isinstance(p.default, Tensor) for p in named):
        return args, kwargs  # a tensor default is no input to check (its dtype may differ)
    bound.apply_defaults()
    return tuple(bound.arguments[p.name] for p in named), {}


def _input_tensors(args: Sequence[Any], kwargs: dict[str, Any] | None = None
                  ) -> list[tuple[str, Tensor]]:
    """The tensors among a model's inputs, also inside tuples, lists and dicts, each with its
    name (``inputs[0]['x']``)."""
    found = []
    for prefix, value in [*((f"inputs[{i}]", a) for i, a in enumerate(args)),
                          *((f"inputs[{k!r}]", v) for k, v in (kwargs or {}).items())]:
        if isinstance(value, Tensor):
            found.append((prefix, value))
            continue
        leaves = pytree.tree_flatten_with_path(value)[0]
        found += [(prefix + pytree.keystr(path), t) for path, t in leaves if isinstance(t, Tensor)]
    return found


def _same_tensors(first: tuple, second: tuple) -> bool:
    """Whether two calls' ``(args, kwargs)`` hold the same tensors: the same objects, or equal
    ones (a closure may rebuild its batch from the same data), NaN matching NaN. Sparse and
    nested tensors count as the same (torch cannot compare them cheaply)."""
    a, b = _input_tensors(*first), _input_tensors(*second)
    return len(a) == len(b) and all(na == nb and _same_tensor(x, y) for (na, x), (nb, y)
                                    in zip(a, b))


def _same_tensor(x: Tensor, y: Tensor) -> bool:
    """One pair of :func:`_same_tensors`."""
    if x is y or any(t.layout != torch.strided or t.is_nested for t in (x, y)):
        return True
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if torch.equal(x, y):
        return True
    return (x.is_floating_point() or x.is_complex()) and bool(
        ((x == y) | (x.isnan() & y.isnan())).all())


def _names_by_id(model: nn.Module) -> dict[int, str]:
    """Parameter names for messages, keyed by ``id`` (tensors hash by identity anyway)."""
    return {id(p): name for name, p in model.named_parameters()}


class _BoundKwargs(nn.Module):
    """``model(*args, **kwargs)`` with the keyword arguments bound, for the Fisher's forward."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        return self.model(*args, **self.kwargs)


class NGD(torch.optim.Optimizer):
    """Natural gradient descent with adaptive (Levenberg–Marquardt) damping.

    Use it like :class:`torch.optim.LBFGS`: ``opt.step(closure)`` where the closure zeroes the
    gradients, runs the model, computes the loss, calls ``loss.backward()`` and returns the loss::

        opt = ngtriton.NGD(model)
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

    **Where the Fisher comes from.** During the closure a forward pre-hook on ``model`` records
    the arguments of the model's *first* forward call (positional and keyword). After the closure
    the Fisher ``F`` of ``model`` at those inputs is built as a :class:`~ngtriton.FisherOperator`
    (reusing the Linear and activation outputs of the closure's forward, which a
    :class:`~ngtriton.ForwardRecord` catches, and recomputing the rest), with the given
    ``likelihood`` on the model's outputs: the loss the closure computes should be the mean
    negative log-likelihood of that likelihood (cross-entropy for ``"categorical"``, ½‖y − z‖²
    for ``"gaussian"``, BCE-with-logits for ``"bernoulli"``), plus any regulariser. The last
    dimension of the output holds one example's outputs (the class logits), every leading one
    counts examples: a model that emits ``(B, C, T)`` for ``F.cross_entropy`` must move its
    classes last (``(B, T, C)``). The
    right-hand side ``g`` is the parameters' ``.grad`` after the closure plus
    ``weight_decay·θ``, so anything the closure adds to the loss composes.

    **The step.** ``(F + λI) n = g`` is solved by :func:`ngtriton.solve` (``method``, ``tol``,
    ``maxiter``), then each parameter group moves by ``−lr·n`` (``lr`` read from the group every
    step, so LR schedulers work). Parameters of ``model`` that are in no group stay fixed (they are
    still part of ``F``, and :meth:`zero_grad` clears their ``.grad`` too); set
    ``requires_grad=False`` to leave them out of it. ``requires_grad`` is read at every step, so
    freezing a layer, or unfreezing one (then ``add_param_group`` to move it), works between
    steps.

    **Damping, ρ and rejection.** With ``adaptive_damping`` (default) or ``reject_steps``
    (default), the loss is re-evaluated at the trial point by calling the closure once more in
    *evaluation mode*: the model's parameters temporarily do not require grad and every output of
    ``model`` is handed to the loss as a fresh leaf, so the closure runs unchanged (its
    ``backward()`` only reaches the loss head) at the cost of about one forward pass. A closure
    that differentiates with respect to the parameters themselves (``autograd.grad(loss,
    params)``, ``backward(inputs=params)``) cannot run that way: its trials run the closure as
    it is, backward included. The CPU
    (and the model's GPU) random generators are replayed for it, so the trial sees the same
    dropout masks, and the same batch if the closure draws it with torch's generator (not one of
    its own, ``random``/NumPy or a DataLoader); after the step they stand where the first call
    left them. A trial that runs the model on other input tensors than the first call did (a
    closure that fetches its own batch) gets a warning, once: fix the batch outside the
    closure. The reduction ratio
    ``ρ = (f(θ+δ) − f(θ)) / (gᵀδ + ½δᵀ(F + λI + W)δ)`` (``W``: the weight decay; one extra
    Fisher product) drives the LM rule: ``λ ← λ·damping_increase`` (3/2) if ρ < 1/4,
    ``λ ← λ·damping_decrease`` (2/3) if ρ > 3/4, clipped to ``[damping_floor, damping_ceiling]``.
    A step that raises the loss (or makes it non-finite) is undone: the parameters are restored
    bit for bit and the damping raised. The parameters' ``.grad`` after :meth:`step` is the
    gradient of the first closure call, and the running statistics of train-mode BatchNorm
    layers are those its forward left (the build and the trial forward do not advance them).

    **Memory.** On the CPU the step's flat vectors (the gradient, CG's x, r and p, and the
    restore point) stay allocated between steps, five vectors the size of the parameters, because
    fresh ones would page-fault on every step (``opt.workspace.clear()`` frees them); on a GPU
    PyTorch's caching allocator already reuses memory and nothing is kept.

    **Non-finite values** (loss, gradient, a Fisher product, solution, step, trial loss) never
    reach the parameters: every parameter stays bit for bit as it was, the damping is raised (when
    adaptive; from 0 it restarts at 1e-4), ``skipped_total`` and ``last_stats.reason`` record the
    event, and with ``nonfinite="raise"`` a :class:`NonFiniteError` (a ``FloatingPointError``)
    naming the quantity is raised after that bookkeeping. Any other exception raised during a step
    (a bad argument, an error in the closure) leaves the parameters and the optimizer's state
    (damping, counters, generator, history) as they were before the call.

    Args:
        model: the network to optimise (needed to linearize it).
        lr: step size applied to the natural gradient (default 1: the Newton-like step).
        damping: initial Tikhonov damping λ.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a ``Likelihood``.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"`` (the latter needs ``step(closure,
            targets=y)``).
        method: solver (``"auto"``, ``"cg"``, ``"minres"``, ``"lsmr"``, ``"dual"``: the exact
            sample-space solve, an eigendecomposition of the R × R kernel, R = batch × output
            factor columns, so for small batches; ``"dual-krylov"`` needs a factor of the
            gradient that NGD does not have).
        params: optional parameters or param-group dicts (default: all trainable parameters).
        weight_decay: L2 coefficient added to the gradient (per group).
        adaptive_damping: adapt λ with the LM rule (else λ stays fixed).
        damping_floor, damping_ceiling: bounds of the adaptive damping.
        damping_increase, damping_decrease: the LM factors (3/2 and 2/3).
        tol, maxiter: the solver's relative tolerance and iteration cap.
        warm_start: start the solver from ``warm_start_decay`` × the previous solution (ignored
            while λ = 0, where it would give up the minimum-norm solution; methods ``"auto"``,
            ``"cg"`` and ``"minres"`` only).
        curvature_fraction: fraction of the batch used for the Fisher products (a random subset,
            drawn from the optimizer's own generator: the same rows of every input tensor, also
            inside containers, that leads with the batch size; where that size is unclear, the
            whole batch, with a warning).
        reject_steps: undo steps that raise the loss.
        backend: linearization backend (``"auto"``, ``"torch"``, ``"triton"``, ``"autograd"``).
        mc_samples: sampled labels per example for ``fisher="mc"``.
        seed: seed of the generator for the subsample and Monte-Carlo labels.
        keep_history: append every step's statistics to ``opt.history``.
        nonfinite: ``"skip"`` (default: skip the step and go on) or ``"raise"`` (also raise a
            :class:`NonFiniteError`).
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, damping: float = DEFAULT_DAMPING,
                 likelihood: str | Likelihood = "categorical", fisher: str = "exact",
                 method: str = "auto", *, params: Iterable[Any] | None = None,
                 weight_decay: float = 0.0, adaptive_damping: bool = True,
                 damping_floor: float = DEFAULT_DAMPING_FLOOR,
                 damping_ceiling: float = DEFAULT_DAMPING_CEILING,
                 damping_increase: float = 1.5, damping_decrease: float = 2.0 / 3.0,
                 tol: float = DEFAULT_TOL, maxiter: int | None = DEFAULT_MAXITER,
                 warm_start: bool = False, warm_start_decay: float = 0.95,
                 curvature_fraction: float = 1.0, reject_steps: bool = True,
                 backend: str = "auto", mc_samples: int = 1, seed: int = 0,
                 keep_history: bool = True, nonfinite: str = "skip") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model: has no trainable parameters (none with requires_grad=True)")
        lr = _positive("lr", lr)
        damping = _positive("damping", damping, allow_zero=True)
        weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.likelihood = get_likelihood(likelihood)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher: expected one of {list(FISHER_TYPES)}, got {fisher!r}")
        if method == "dual-krylov":
            raise ValueError("method: 'dual-krylov' needs the gradient factor b (Aᵀb = g), and "
                             "NGD's gradient comes from the closure; use 'dual' (the exact "
                             "sample-space solve), 'cg', 'minres' or 'auto'")
        if method not in NGD_METHODS:
            raise ValueError(f"method: expected one of {list(NGD_METHODS)}, got {method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        if not isinstance(nonfinite, str) or nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite: expected one of {list(NONFINITE_MODES)}, "
                             f"got {nonfinite!r}")
        floor = _positive("damping_floor", damping_floor, allow_zero=True)
        ceiling = _positive("damping_ceiling", damping_ceiling)
        if ceiling < floor:
            raise ValueError(f"damping_ceiling: {ceiling:g} is below damping_floor {floor:g}")
        if adaptive_damping and not floor <= damping <= ceiling:
            raise ValueError(f"damping: {damping:g} lies outside [damping_floor, damping_ceiling]"
                             f" = [{floor:g}, {ceiling:g}]; move the bounds or pass "
                             "adaptive_damping=False")
        increase = _positive("damping_increase", damping_increase)
        decrease = _positive("damping_decrease", damping_decrease)
        if increase <= 1:
            raise ValueError(f"damping_increase: expected > 1, got {increase:g}")
        if decrease >= 1:
            raise ValueError(f"damping_decrease: expected < 1, got {decrease:g}")
        tol = _positive("tol", tol)
        if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int)
                                    or maxiter < 1):
            raise ValueError(f"maxiter: expected an integer ≥ 1 or None, got {maxiter!r}")
        warm_start_decay = _positive("warm_start_decay", warm_start_decay, allow_zero=True,
                                     upper=1.0)
        if warm_start and method not in WARM_START_METHODS:
            raise ValueError(f"warm_start: method {method!r} cannot start from a previous "
                             f"solution; use one of {list(WARM_START_METHODS)} or "
                             "warm_start=False")
        curvature_fraction = _positive("curvature_fraction", curvature_fraction, upper=1.0)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples: expected an integer ≥ 1, got {mc_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")

        defaults = {"lr": lr, "weight_decay": weight_decay}
        # add_param_group (called by torch's __init__) checks every group against the model.
        self._group_model = model
        self._ungrouped: list[Tensor] = []
        super().__init__(trainable if params is None else params, defaults)

        self.model = model
        self.fisher = fisher
        self.method = method
        self.backend = backend
        self.adaptive_damping = bool(adaptive_damping)
        self.damping_floor, self.damping_ceiling = floor, ceiling
        self.damping_increase, self.damping_decrease = increase, decrease
        self.tol, self.maxiter = tol, maxiter
        self.warm_start, self.warm_start_decay = bool(warm_start), warm_start_decay
        self.curvature_fraction = curvature_fraction
        self.reject_steps = bool(reject_steps)
        self.mc_samples = mc_samples
        self.keep_history = bool(keep_history)
        self.nonfinite = nonfinite
        self._set_trainable(trainable)
        self.workspace = Workspace()  # the step's flat vectors on the CPU (see _step)
        self._full_trials = False  # set once a closure cannot run in evaluation mode
        self._warned_batch = False  # the trial saw another batch (warned once)
        self._batch_rows: int | None = None  # leading size of the closure's model output
        self._warned_subsample = False  # the subsample found no batch dimension (warned once)
        self._names = _names_by_id(model)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        # Optimizer-wide state (what state_dict() must carry beyond the per-parameter state).
        self.damping = damping
        self.steps = 0
        self.skipped_total = 0
        self.rejected_total = 0
        self.last_stats: NGDStats | None = None
        self.history: list[dict[str, Any]] = []
        # What the closure's first call left during a step: the running statistics of the
        # model's BatchNorm layers and the random generators (see _keep_after_closure).
        self._after_closure: tuple[tuple[list[Tensor], list[Tensor]] | None,
                                   list[Tensor]] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, plus NGD's checks: parameters of ``model``, ``lr`` > 0
        and ``weight_decay`` ≥ 0 (errors name the argument; the group is not added)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            ids = {id(p) for p in self._group_model.parameters()}  # as the model is now
            for p in group["params"]:
                if id(p) not in ids:
                    raise ValueError("params: every parameter must be a parameter of model "
                                     "(the Fisher is taken over model.parameters())")
            _positive("lr", group["lr"])
            _positive("weight_decay", group["weight_decay"], allow_zero=True)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if hasattr(self, "_trainable"):  # torch's __init__ adds the first groups before it
            self._set_trainable(self._trainable)

    def _set_trainable(self, trainable: list[Tensor]) -> None:
        """The parameters the Fisher is taken over (the model's with ``requires_grad``), their
        sizes, and those of them in no group (fixed, but their gradient is part of g)."""
        self._trainable = trainable
        self._sizes = [p.numel() for p in trainable]
        self._numel = sum(self._sizes)
        grouped = {id(p) for group in self.param_groups for p in group["params"]}
        self._ungrouped = [p for p in trainable if id(p) not in grouped]

    def _refresh_trainable(self) -> None:
        """Follow ``requires_grad`` changes since the last step: a layer frozen since leaves F
        (and the step), one unfrozen joins F (and moves if it is in a group)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if len(trainable) == len(self._trainable) and all(
                a is b for a, b in zip(trainable, self._trainable)):
            return
        if not trainable:
            raise ValueError("model: has no trainable parameters (none with requires_grad=True)")
        self._set_trainable(trainable)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, also over the model's trainable parameters in no group: they
        stay fixed, but their ``.grad`` is part of the gradient the step solves with, so it
        must not accumulate across steps either."""
        super().zero_grad(set_to_none)
        for p in self._ungrouped:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        """The model's inputs must live on its device and, when floating, share its dtype."""
        ref = self._trainable[0]
        same_dtype = all(p.dtype == ref.dtype for p in self._trainable)
        same_device = all(p.device == ref.device for p in self._trainable)
        named = [(f"inputs[{i}]", a) for i, a in enumerate(args)]
        named += [(f"inputs[{k!r}]", v) for k, v in kwargs.items()]
        for name, x in named:  # not inside containers: a model may cast those itself
            if not isinstance(x, Tensor):
                continue
            if same_device and x.ndim > 0 and x.device != ref.device:
                raise ValueError(f"{name}: the model was called (in the closure) with a tensor "
                                 f"on device {x.device}, but its parameters are on {ref.device}; "
                                 f"move the batch with .to({str(ref.device)!r})")
            if same_dtype and x.is_floating_point() and x.dtype != ref.dtype:
                raise ValueError(f"{name}: the model was called (in the closure) with dtype "
                                 f"{x.dtype}, but its parameters are {ref.dtype}; floating-point "
                                 f"inputs must be {ref.dtype}")

    # --- the closure's forward ---
    def _rng_states(self) -> list[Tensor]:
        """The generators a closure draws from: the CPU one, and the model's GPU's."""
        device = self._trainable[0].device
        cpu = torch.get_rng_state()
        return [cpu, torch.cuda.get_rng_state(device)] if device.type == "cuda" else [cpu]

    def _set_rng_states(self, states: list[Tensor]) -> None:
        torch.set_rng_state(states[0])
        if len(states) > 1:
            torch.cuda.set_rng_state(states[1], self._trainable[0].device)

    def _run_closure(self, closure: Callable[[], Any]
                     ) -> tuple[Any, tuple, dict, ForwardRecord | None, list[Tensor]]:
        """Run the closure with the model's inputs captured and its forward recorded; also
        returns the random generators' states from before the call, which the trial replays."""
        captured: dict[str, Any] = {}
        rng = self._rng_states()
        # The closure's own forward, recorded for the engine's build (only where it is built on
        # exactly those inputs: the whole batch, not the autograd fallback).
        record = (ForwardRecord(self.model) if self.curvature_fraction >= 1.0
                  and self.backend != "autograd" else None)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if "args" not in captured:
                self._check_inputs(args, kwargs)
                captured["args"], captured["kwargs"] = args, dict(kwargs)

        def rows(module: nn.Module, args: tuple, out: Any) -> None:  # the subsample's batch
            if "rows" not in captured and isinstance(out, Tensor) and out.ndim > 0:
                captured["rows"] = out.shape[0]

        handles = [self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
        if self.curvature_fraction < 1.0:
            handles.append(self.model.register_forward_hook(rows))
        try:
            with torch.enable_grad(), record if record is not None else contextlib.nullcontext():
                loss = closure()
        finally:
            for handle in handles:
                handle.remove()
        if "args" not in captured:
            raise ValueError("closure: it never called the model passed to NGD, so there are no "
                             "inputs to build the Fisher at")
        self._batch_rows = captured.get("rows")
        return loss, captured["args"], captured["kwargs"], record, rng

    @staticmethod
    def _loss_value(loss: Any) -> float:
        if loss is None:
            raise ValueError("closure: returned None; it must return the loss (like LBFGS's)")
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"closure: must return a scalar loss, got shape "
                                 f"{tuple(loss.shape)}")
            return float(loss.detach())
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            return float(loss)
        raise TypeError(f"closure: must return the loss as a Tensor or a number, got "
                        f"{type(loss).__name__}")

    def _evaluate(self, closure: Callable[[], Any], rng: list[Tensor], inputs: tuple
                  ) -> float:
        """The closure's loss at the current parameters, at the cost of about one forward.

        The parameters stop requiring grad for the call (grad mode itself stays on, so a model
        whose forward differentiates, e.g. ``autograd.grad`` of an energy, still runs) and each
        output of the model reaches the closure as a fresh leaf, so the closure's ``backward()``
        only runs through the loss head. A closure that cannot run that way (it differentiates
        with respect to the parameters themselves, e.g. ``autograd.grad(loss, params)`` or
        ``backward(inputs=params)``) is called once more as it is, with its full backward, and
        so is every later trial of this optimizer.

        The random generators start from ``rng``, their states before the first call, so the
        trial sees the same dropout masks (and the same batch, if the closure draws it from
        torch's generator); :meth:`step` puts them back where the first call left them. The
        ``.grad`` tensors of the first call are set aside meanwhile (a closure that zeroes them
        in place must not wipe them) and put back afterwards.

        ``inputs``: the first call's ``(args, kwargs)`` of the model. A trial that calls the
        model with other tensors (a closure that fetches its own batch) measures ρ across two
        batches: a warning says so, once per optimizer.
        """
        seen: list[tuple] = []
        handle = self.model.register_forward_pre_hook(
            lambda _, args, kwargs: None if seen else seen.append((args, kwargs)),
            with_kwargs=True)
        try:
            value = self._trial_loss(closure, rng, seen)
        finally:
            handle.remove()
        if seen and not self._warned_batch and not _same_tensors(inputs, seen[0]):
            self._warned_batch = True
            warnings.warn("closure: the trial call ran the model on other inputs than the first "
                          "call, so ρ and the step rejection compare the losses of two different "
                          "batches; fix the batch outside the closure (as for LBFGS), or pass "
                          "adaptive_damping=False, reject_steps=False",
                          stacklevel=user_stacklevel())
        return value

    def _trial_loss(self, closure: Callable[[], Any], rng: list[Tensor], seen: list) -> float:
        """:meth:`_evaluate`'s call of the closure (``seen``: the inputs its hook caught)."""
        saved_grads = [p.grad for p in self._trainable]
        try:
            for p in self._trainable:
                p.grad = None
            if self._full_trials:
                return self._call_for_loss(closure, rng, leaves=False)
            try:
                return self._call_for_loss(closure, rng, leaves=True)
            except RuntimeError as err:  # e.g. autograd.grad(loss, params) needs their grad
                if not _NEEDS_GRAD.search(str(err)):
                    raise  # the closure's own error: it reaches the caller
            for p in self._trainable:  # whatever the failed call left
                p.grad = None
            seen.clear()
            value = self._call_for_loss(closure, rng, leaves=False)
            self._full_trials = True  # it runs as it is: do that from now on
            return value
        finally:
            for p, grad in zip(self._trainable, saved_grads):
                p.grad = grad

    def _call_for_loss(self, closure: Callable[[], Any], rng: list[Tensor], *, leaves: bool
                       ) -> float:
        """One call of the closure from the generators' states ``rng``; with ``leaves``, in the
        evaluation mode of :meth:`_evaluate`."""
        self._set_rng_states(rng)
        if not leaves:
            with torch.enable_grad():
                return self._loss_value(closure())
        flags = [(p, p.requires_grad) for p in self.model.parameters()]

        def leaf_outputs(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, Tensor) and output.is_floating_point():
                return output.detach().requires_grad_(True)
            return None

        handle = self.model.register_forward_hook(leaf_outputs)
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                return self._loss_value(closure())
        finally:
            handle.remove()
            for p, flag in flags:
                p.requires_grad_(flag)

    # --- pieces of a step ---
    def _flat(self, name: str, tensors: list[Tensor], ws: Workspace | None) -> Tensor:
        """``tensors`` flattened into one vector: the workspace's buffer ``name`` if given."""
        parts = [t.reshape(-1) for t in tensors]
        if ws is None:
            return torch.cat(parts)
        return torch.cat(parts, out=ws.get(name, self._numel, parts[0].dtype, parts[0].device))

    def _per_param(self, key: str) -> dict[int, float]:
        return {id(p): float(g[key]) for g in self.param_groups for p in g["params"]}

    def _curvature_inputs(self, args: tuple, kwargs: dict, targets: Tensor | None
                          ) -> tuple[tuple, dict, Tensor | None]:
        """The curvature subsample: the same random rows of every batched input, also inside
        tuples, lists and dicts (and of ``targets``, which must then stay aligned with the
        inputs).

        The batch size is the number of rows of the model's output in the closure (else of
        ``targets``) when inputs have that many rows; else, without targets, the one leading
        size all inputs share if it divides the output's rows (sequences whose (B·T, V) logits
        were flattened). Where there is none, or targets have other rows, nothing is
        subsampled, with a warning (once)."""
        if self.curvature_fraction >= 1.0:
            return args, kwargs, targets
        tensors = [a for _, a in _input_tensors(args, kwargs) if a.ndim > 0]
        leading = {a.shape[0] for a in tensors}
        t_rows = targets.shape[0] if isinstance(targets, Tensor) and targets.ndim > 0 else None
        rows = self._batch_rows if self._batch_rows is not None else t_rows
        if rows in leading:
            n = rows
        elif targets is None and len(leading) == 1 and (rows is None or rows % min(leading) == 0):
            n = min(leading)
        else:
            n = None
        if n is None or t_rows not in (None, n):
            if tensors and not self._warned_subsample:
                self._warned_subsample = True
                out = "" if rows is None else f"the model returns {rows} rows, "
                tgt = "" if t_rows is None else f"the targets {t_rows}, "
                warnings.warn(f"curvature_fraction: the batch dimension is unclear ({out}{tgt}"
                              f"the inputs lead with {sorted(leading)}); the Fisher uses the "
                              "whole batch", stacklevel=user_stacklevel())
            return args, kwargs, targets
        first = next(a for a in tensors if a.shape[0] == n)
        k = max(1, round(self.curvature_fraction * n))
        if k >= n:
            return args, kwargs, targets
        idx = torch.randperm(n, generator=self._generator)[:k].to(first.device)

        def take(a: Any) -> Any:
            return a.index_select(0, idx.to(a.device)) if isinstance(a, Tensor) and a.ndim > 0 \
                and a.shape[0] == n else a

        # also inside tuples, lists and dicts of inputs
        args, kwargs = pytree.tree_map(take, (tuple(args), kwargs))
        return args, kwargs, take(targets)

    def _resolve_method(self, op: Any, x0: Tensor | None) -> str:
        """``"auto"``: the exact sample-space solve when it costs fewer products than the capped
        Krylov solve (R ≤ 2·maxiter, R ≤ P); else CG, whose iterates from 0 satisfy
        ``nᵀ(F+λI)n = nᵀg`` so that ρ needs no extra product (and which, on the digits MLP,
        reached lower losses than MINRES in less time); the solver's own choice where CG does not
        apply (an inconsistent system: the Monte-Carlo Fisher at λ = 0)."""
        if self.method == "dual":  # no factor b here (g is the closure's): the exact solve
            return "dual-direct"
        if self.method != "auto" or x0 is not None:
            return self.method
        cap = 2 * (self.maxiter if self.maxiter is not None else op.num_params)
        if op.num_rows <= min(cap, DUAL_DIRECT_MAX_ROWS, op.num_params):
            return "dual-direct"
        return "cg" if op.damping > 0 or self.fisher != "mc" else "auto"

    def _bump_damping(self) -> None:
        """Raise λ by ``damping_increase`` (from exactly 0: restart at 1e-4), within bounds."""
        if not self.adaptive_damping:
            return
        lam = self.damping * self.damping_increase
        if not lam > 0:
            lam = _RESTART_DAMPING
        self.damping = min(max(lam, self.damping_floor), self.damping_ceiling)

    def _update_damping(self, rho: float) -> None:
        """The Levenberg–Marquardt rule (NaN ρ counts as a bad step)."""
        if not self.adaptive_damping:
            return
        if not rho >= 0.25:
            self._bump_damping()
        elif rho > 0.75:
            self.damping = min(max(self.damping * self.damping_decrease, self.damping_floor),
                               self.damping_ceiling)

    def _finish(self, stats: dict[str, Any], t0: float) -> None:
        stats.setdefault("next_damping", self.damping)
        stats["time"] = time.perf_counter() - t0
        stats["skipped_total"] = self.skipped_total
        stats["rejected_total"] = self.rejected_total
        self.last_stats = NGDStats(**stats)
        if self.keep_history:
            self.history.append(dict(vars(self.last_stats)))  # a shallow copy: all scalars

    def _skip(self, reason: str, what: str, detail: str, stats: dict[str, Any], t0: float
              ) -> None:
        """Book a step skipped for a non-finite value; raise in ``nonfinite="raise"`` mode."""
        self.skipped_total += 1
        self._bump_damping()
        stats["reason"] = reason
        self._finish(stats, t0)
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{what}: {detail} at NGD step {self.steps}; the step was skipped and the "
                f"parameters are unchanged (damping is now {self.damping:g})",
                reason=reason, what=what, step=self.steps)

    def _describe_inputs(self, args: tuple, kwargs: dict) -> str:
        bad = [name for name, a in [(f"inputs[{i}]", a) for i, a in enumerate(args)]
               + [(f"inputs[{k!r}]", v) for k, v in kwargs.items()]
               if isinstance(a, Tensor) and a.is_floating_point()
               and not bool(torch.isfinite(a).all())]
        return f" (the model's {', '.join(bad)} contain NaN or Inf)" if bad else ""

    # --- the step ---
    def step(self, closure: Callable[[], Any] | None = None,  # type: ignore[override]
             targets: Tensor | None = None) -> Any:
        """One natural-gradient step (see the class docstring); returns the closure's loss.

        ``targets`` is needed only for ``fisher="empirical"`` (the observed labels of the batch).
        """
        if closure is None or not callable(closure):
            raise TypeError("closure: NGD.step needs a closure that zeroes the gradients, runs "
                            "the model, calls backward() and returns the loss")
        if self.fisher == "empirical" and targets is None:
            raise ValueError("targets: fisher='empirical' needs step(closure, targets=labels)")
        if targets is not None and not isinstance(targets, Tensor):
            raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
        self._refresh_trainable()
        # Anything but a non-finite event (booked, then raised on purpose) rolls the state back.
        saved = (self.steps, self.damping, self.skipped_total, self.rejected_total,
                 len(self.history), self.last_stats, self._generator.get_state(),
                 [(p, self.state.get(p, {}).get("warm_start")) for p in self._trainable])
        try:
            return self._step(closure, targets)
        except NonFiniteError:
            raise
        except BaseException:
            (self.steps, self.damping, self.skipped_total, self.rejected_total, n_hist,
             self.last_stats, gen_state, warm) = saved
            del self.history[n_hist:]
            self._generator.set_state(gen_state)
            for p, w in warm:
                if w is None:
                    self.state[p].pop("warm_start", None)
                else:
                    self.state[p]["warm_start"] = w
            raise
        finally:
            self._restore_after_closure()

    def _keep_after_closure(self) -> None:
        """Remember what the closure's first call left, for :meth:`step` to put back when the
        step is over: the running statistics of the model's train-mode BatchNorm-like modules
        and the random generators. The build and the trial forward run the model again on the
        same batch, and would otherwise advance both once or twice more."""
        bufs = [b for m in self.model.modules()
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                and m.track_running_stats
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._after_closure = ((bufs, [b.clone() for b in bufs]) if bufs else None,
                               self._rng_states())

    def _restore_after_closure(self) -> None:
        kept, self._after_closure = self._after_closure, None
        if kept is None:
            return
        stats, rng = kept
        if stats is not None:
            with torch.no_grad():
                torch._foreach_copy_(*stats)
        self._set_rng_states(rng)

    def _step(self, closure: Callable[[], Any], targets: Tensor | None) -> Any:
        t0 = time.perf_counter()
        loss, args, kwargs, record, rng = self._run_closure(closure)
        self._keep_after_closure()  # put back by step() when this step is over
        loss_value = self._loss_value(loss)
        params = self._trainable
        if all(p.grad is None for p in params):
            raise ValueError("closure: no parameter has a .grad after it ran; it must call "
                             "loss.backward() before returning the loss")
        lr = self._per_param("lr")
        for i, group in enumerate(self.param_groups):
            for key in ("lr", "weight_decay"):
                value = group[key]
                if isinstance(value, bool) or not isinstance(value, int | float) \
                        or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{key}: param_groups[{i}][{key!r}] must be a finite "
                                     f"number ≥ 0 (set by a scheduler?), got {value!r}")
        self.steps += 1
        damping = self.damping
        stats: dict[str, Any] = {
            "step": self.steps, "loss": loss_value, "trial_loss": math.nan, "accepted": False,
            "reason": "", "iterations": 0, "residual": math.nan, "converged": False,
            "method": self.method, "damping": damping, "rho": math.nan,
            "predicted_reduction": math.nan, "actual_reduction": math.nan,
            "grad_norm": math.nan, "step_norm": 0.0}
        if not math.isfinite(loss_value):
            self._skip("nonfinite_loss", "loss", f"the closure returned {loss_value}"
                       + self._describe_inputs(args, kwargs), stats, t0)
            return loss

        decay = self._per_param("weight_decay")
        # On the CPU the step's flat vectors (g, CG's x, r, p, the restore point) live in a
        # workspace kept between steps: fresh ones would page-fault on every step.
        ws = (self.workspace if params[0].device.type == "cpu"
              and all(p.dtype == params[0].dtype and p.device == params[0].device for p in params)
              else None)
        with torch.no_grad():  # g = the .grads (+ weight decay), flat: one copy of them
            g = self._flat("g", [torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                                 if p.grad is None else p.grad.detach() for p in params], ws)
            if any(decay.values()):
                for p, chunk in zip(params, g.split(self._sizes)):
                    if decay.get(id(p)):
                        chunk.add_(p.detach().reshape(-1), alpha=decay[id(p)])
            # A finite ‖g‖ means a finite g (NaN and Inf propagate): one pass for both. A norm
            # that overflowed from finite values is no use either: every solver's first
            # products and norms would overflow too.
            grad_norm = float(norm(g))
        stats["grad_norm"] = grad_norm
        if not math.isfinite(grad_norm):
            bad = [self._names.get(id(p), "?") for p in params
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                detail = f"NaN or Inf in the .grad of {', '.join(bad)}"
            elif not bool(torch.isfinite(g).all()):
                detail = "NaN or Inf after weight decay"
            else:
                detail = (f"‖g‖ overflows {g.dtype} (|g| up to {float(g.abs().max()):.3g}); "
                          "the solvers cannot use it")
            self._skip("nonfinite_grad", "gradient", detail, stats, t0)
            return loss

        c_args, c_kwargs, c_targets = self._curvature_inputs(args, kwargs, targets)
        c_args, c_kwargs = _as_positional(self.model, c_args, c_kwargs)
        fisher_model = _BoundKwargs(self.model, c_kwargs) if c_kwargs else self.model
        op = _GuardedOperator(FisherOperator(
            fisher_model, c_args, self.likelihood, targets=c_targets, fisher=self.fisher,
            damping=damping, backend=self.backend, mc_samples=self.mc_samples,
            generator=self._generator, record=record))
        del record
        x0 = None
        warm = ([self.state[p].get("warm_start") if p in self.state else None for p in params]
                if self.warm_start and damping > 0 else [])
        if any(w is not None for w in warm):
            # a parameter without one (in no group, or just unfrozen) starts from 0
            x0 = torch.cat([(torch.zeros_like(p) if w is None else w).reshape(-1)
                            for p, w in zip(params, warm)])
            x0 = x0.mul_(self.warm_start_decay).to(g.dtype)
        method = self._resolve_method(op, x0)
        op.watch.last_only = method == "cg" and op.device.type == "cpu"  # CG's host loop
        try:
            with torch.no_grad():
                result = solve(op, g, method=method, tol=self.tol, maxiter=self.maxiter, x0=x0,
                               workspace=ws)
        except torch.linalg.LinAlgError:  # e.g. eigh of a kernel matrix holding NaN
            if not op.any_bad():
                raise
            stats["method"] = method
            self._skip("nonfinite_curvature", "Fisher product",
                       "NaN or Inf from a Fisher product (the solver failed on it)", stats, t0)
            return loss
        n = result.x.detach()
        stats.update(iterations=int(result.iterations), residual=float(result.residual),
                     converged=bool(result.converged), method=str(result.method))
        if op.any_bad():
            self._skip("nonfinite_curvature", "Fisher product",
                       f"NaN or Inf from a Fisher product during the {result.method} solve",
                       stats, t0)
            return loss
        with torch.no_grad():
            # ‖n‖² and nᵀg in one host read; a finite ‖n‖² means a finite n (one pass fewer).
            ng, nn_ = (float(t) for t in torch.stack([n.dot(g), n.dot(n)]).tolist())
        if not math.isfinite(nn_) and not bool(all_finite(n)):
            self._skip("nonfinite_solution", "solution",
                       f"NaN or Inf in the natural gradient returned by {result.method}",
                       stats, t0)
            return loss
        in_group = {id(p) for group in self.param_groups for p in group["params"]}
        if self.warm_start:  # kept for grouped parameters only: torch's state_dict maps those
            for p, chunk in zip(params, op.unflatten(n)):
                if id(p) in in_group:
                    self.state[p]["warm_start"] = chunk.clone()

        rates = [lr[id(p)] if id(p) in in_group else 0.0 for p in params]
        uniform = len(set(rates)) == 1
        chunks = torch.split_with_sizes(n, self._sizes)
        with torch.no_grad():
            # Per-parameter norms only when the rates differ or weight decay needs them.
            # δ = −rate·n is never formed unless a product needs it.
            if uniform and not any(decay.values()):
                sq = [nn_]
            else:
                sq = torch.stack([c.dot(c) for c in chunks]).tolist()
            step_sq = (rates[0] * rates[0] * nn_ if uniform
                       else sum(r * r * q for r, q in zip(rates, sq)))
        step_norm = math.sqrt(step_sq) if step_sq >= 0 else math.nan
        stats["step_norm"] = step_norm
        if not math.isfinite(step_norm) or step_norm > torch.finfo(n.dtype).max:
            self._skip("nonfinite_step", "step", f"lr·n overflowed (step norm {step_norm:g}, "
                       f"lr {max(lr.values()):g})", stats, t0)
            return loss
        if step_norm == 0.0:  # zero gradient (or lr 0): nothing to try, nothing learned
            stats.update(accepted=True, reason="accepted")
            self._finish(stats, t0)
            return loss

        evaluate = self.adaptive_damping or self.reject_steps
        predicted = math.nan
        if evaluate:
            gdelta = (-rates[0] * ng if uniform else  # one host read either way
                      -sum(r * d for r, d in zip(rates, torch.stack(
                          [c.dot(gc) for c, gc in zip(chunks, g.split(self._sizes))]).tolist())))
            if x0 is None and uniform and result.method in ("cg", "dual-direct"):
                # Galerkin: CG from 0 (and the exact solve) give nᵀ(F+λI)n = nᵀg, so
                # δᵀFδ = lr²(nᵀg − λ‖n‖²) without one more Fisher product.
                curvature = rates[0] * rates[0] * (ng - damping * nn_)
            else:
                with torch.no_grad():
                    delta = torch.cat([c * -r for c, r in zip(chunks, rates)])
                    curvature = float(delta.dot(op.fisher_matvec(delta)))
                del delta
            l2 = (sum(decay.get(id(p), 0.0) * r * r * q for p, r, q in zip(params, rates, sq))
                  if any(decay.values()) else 0.0)
            predicted = gdelta + 0.5 * (curvature + damping * step_sq + l2)
            if not math.isfinite(predicted) or op.any_bad():
                self._skip("nonfinite_curvature", "Fisher product",
                           f"NaN or Inf in the quadratic model (δᵀFδ = {curvature:g})",
                           stats, t0)
                return loss
        stats["predicted_reduction"] = predicted

        with torch.no_grad():  # a bit-exact restore point: one flat copy
            old_flat = self._flat("restore", [p.detach() for p in params], ws)

        def old() -> list[Tensor]:
            return [o.view(p.shape) for o, p in zip(torch.split_with_sizes(old_flat, self._sizes),
                                                    params)]

        def restore() -> None:
            with torch.no_grad():
                torch._foreach_copy_(params, old())

        with torch.no_grad():
            if uniform:  # one dispatch for all parameters (same arithmetic as p.add_)
                torch._foreach_add_(params, [c.view(p.shape) for c, p in zip(chunks, params)],
                                    alpha=-rates[0])
            else:
                for p, c, r in zip(params, chunks, rates):
                    if r:
                        p.add_(c.view(p.shape), alpha=-r)
            # One summing pass per parameter (NaN and Inf propagate, see all_finite); the exact
            # test only when a sum is not finite.
            finite = (bool(torch.isfinite(torch.stack(
                [p.sum(dtype=acc_dtype(p.dtype)) for p in params])).all())
                      or all(bool(torch.isfinite(p).all()) for p in params))
        if not finite:
            restore()
            stats["step_norm"] = 0.0
            self._skip("nonfinite_step", "step", f"θ − lr·n overflowed (step norm "
                       f"{step_norm:g}, lr {max(lr.values()):g})", stats, t0)
            return loss
        if not evaluate:
            stats.update(accepted=True, reason="accepted")
            self._finish(stats, t0)
            return loss

        try:
            trial = self._evaluate(closure, rng, (args, kwargs))
        except BaseException:
            restore()
            raise
        if not math.isfinite(trial):
            restore()
            stats.update(trial_loss=trial, step_norm=0.0)
            self._skip("nonfinite_trial_loss", "trial loss",
                       f"the loss at the trial point θ − lr·n is {trial}; the step was undone",
                       stats, t0)
            return loss
        with torch.no_grad():
            reg_change = (sum(0.5 * decay[id(p)] * (float(p.pow(2).sum()) - float(o.pow(2).sum()))
                              for p, o in zip(params, old()) if decay.get(id(p)))
                          if any(decay.values()) else 0.0)
        actual = trial - loss_value + reg_change
        rho = actual / predicted if predicted < 0 else -math.inf
        if not math.isfinite(actual):
            rho = math.nan
        stats.update(trial_loss=trial, actual_reduction=actual, rho=rho)
        if self.reject_steps and not actual <= 0:
            restore()
            self.rejected_total += 1
            stats.update(reason="rejected", step_norm=0.0)
            self._update_damping(-math.inf)
        else:
            stats.update(accepted=True, reason="accepted")
            self._update_damping(rho)
        self._finish(stats, t0)
        return loss

    # --- state ---
    def state_dict(self) -> dict[str, Any]:
        """The torch.optim state plus NGD's own: damping, counters, generator, history and the
        last step's statistics."""
        out = super().state_dict()
        out["ngd"] = {
            "damping": self.damping, "steps": self.steps, "skipped_total": self.skipped_total,
            "rejected_total": self.rejected_total, "generator": self._generator.get_state(),
            "history": [dict(h) for h in self.history],
            "last_stats": None if self.last_stats is None else dict(vars(self.last_stats)),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; checked first, so a malformed one raises a
        ``ValueError`` naming ``state_dict`` and leaves this optimizer as it was. A damping
        outside this optimizer's ``[damping_floor, damping_ceiling]`` is moved into it (when
        adaptive)."""
        state_dict = dict(state_dict)
        ngd = state_dict.pop("ngd", None)
        if ngd is None:
            raise ValueError("state_dict: has no 'ngd' entry; it was not saved by NGD")
        ngd = self._check_ngd_state(ngd)
        before = super().state_dict()
        super().load_state_dict(state_dict)
        try:
            for p in self._trainable:
                warm = self.state.get(p, {}).get("warm_start")
                if warm is not None and warm.shape != p.shape:
                    raise ValueError(f"state_dict: the warm-start vector of "
                                     f"{self._names.get(id(p), '?')} has shape "
                                     f"{tuple(warm.shape)}, the parameter {tuple(p.shape)}")
        except ValueError:
            super().load_state_dict(before)
            raise
        damping = ngd["damping"]
        if self.adaptive_damping:
            damping = min(max(damping, self.damping_floor), self.damping_ceiling)
        self.damping = damping
        self.steps = ngd["steps"]
        self.skipped_total = ngd["skipped_total"]
        self.rejected_total = ngd["rejected_total"]
        self._generator.set_state(ngd["generator"])
        self.history = ngd["history"]
        last = ngd.get("last_stats") or (self.history[-1] if self.history else None)
        self.last_stats = None if last is None else NGDStats(**last)

    @staticmethod
    def _check_ngd_state(ngd: Any) -> dict[str, Any]:
        """The ``"ngd"`` entry of a state dict, checked and converted (nothing is loaded)."""
        if not isinstance(ngd, dict):
            raise ValueError(f"state_dict: its 'ngd' entry must be a dict, got "
                             f"{type(ngd).__name__}")
        required = ("damping", "steps", "skipped_total", "rejected_total", "generator",
                    "history")
        missing = [key for key in required if key not in ngd]
        if missing:
            raise ValueError(f"state_dict: its 'ngd' entry lacks {missing}")
        out = dict(ngd)
        try:
            out["damping"] = float(ngd["damping"])
            for key in ("steps", "skipped_total", "rejected_total"):
                out[key] = int(ngd[key])
            out["generator"] = torch.as_tensor(ngd["generator"]).to("cpu", torch.uint8)
            out["history"] = [dict(h) for h in ngd["history"]]
            if ngd.get("last_stats") is not None:
                out["last_stats"] = dict(ngd["last_stats"])
            for stats in out["history"] + [out.get("last_stats") or {}]:
                if stats:
                    NGDStats(**stats)
        except (TypeError, ValueError) as err:
            raise ValueError(f"state_dict: its 'ngd' entry is malformed ({err})") from None
        if not math.isfinite(out["damping"]) or out["damping"] < 0:
            raise ValueError(f"state_dict: damping must be finite and ≥ 0, got {out['damping']}")
        if min(out[key] for key in ("steps", "skipped_total", "rejected_total")) < 0:
            raise ValueError("state_dict: negative step counters")
        if out["generator"].shape != torch.Generator().get_state().shape:
            raise ValueError("state_dict: its generator state is not a CPU generator's")
        return out

    # --- copies ---
    def __getstate__(self) -> dict[str, Any]:
        """The whole optimizer, for ``copy.deepcopy`` and pickle (torch's own keeps only the
        defaults, state and groups, which would leave an NGD without its model or damping).
        As with torch's optimizers, hooks are not carried. The names keyed by ``id(parameter)``
        are rebuilt on the other side; the workspace's buffers are scratch."""
        state = {key: value for key, value in self.__dict__.items()
                 if not key.endswith("_hooks") and key != "_names"}
        state["workspace"] = Workspace()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "model" in state:
            self._names = _names_by_id(self.model)

    def __repr__(self) -> str:
        return (f"NGD(lr={self.param_groups[0]['lr']:g}, damping={self.damping:g}, "
                f"likelihood={self.likelihood.name!r}, fisher={self.fisher!r}, "
                f"method={self.method!r}, steps={self.steps})")
