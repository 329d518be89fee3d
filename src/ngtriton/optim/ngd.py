"""NGD: a natural-gradient ``torch.optim.Optimizer`` in the style of Hessian-free optimisation.

One step solves ``(F + λI) n = g`` matrix-free (F: the Fisher of the model on the batch the
closure ran, g: the parameters' ``.grad``) and moves the parameters along ``−n`` (optionally with
momentum, and with step size and momentum chosen from the quadratic model). Around that core sit
the practical pieces of Martens (2010), Martens & Sutskever (2012) and Martens & Grosse (2015):
Levenberg–Marquardt damping adapted from the reduction ratio ρ, rejection of steps that raise the
loss, a diagonal preconditioner, a warm start, a curvature subsample, weight decay, and a guard
that keeps non-finite numbers away from the parameters. The step is all or nothing: see
:mod:`.transaction`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._frames import user_stacklevel
from ..fisher import FISHER_TYPES
from ..likelihoods import Likelihood, get_likelihood
from ..linearize import BACKENDS
from ..linearize.outputs import check_selector
from ..losses import check_loss
from ..solvers import Workspace, choose_method
from . import checkpoint, distributed
from .atomic import settle
from .closure import ClosureRunner
from .config import (
    DEFAULT_DAMPING,
    DEFAULT_DAMPING_CEILING,
    DEFAULT_DAMPING_FLOOR,
    DEFAULT_MAXITER,
    DEFAULT_TOL,
    NGD_METHODS,
    NONFINITE_MODES,
    WARM_START_METHODS,
    choice,
    count,
    flag,
    momentum_arg,
    positive,
)
from .damping import DampingRule
from .inputs import curvature_subsample, names_by_id
from .preconditioner import PRECONDITIONERS, AdamDiagonal
from .step import _StepRun
from .transaction import Book, Transaction

# Instance attributes a copy must not carry: the names keyed by id() (rebuilt), and methods
# that an LR scheduler patched onto this instance (they call the original optimizer).
_NOT_COPIED = frozenset({"_names", "step", "zero_grad", "_ddp"})


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
    ``weight_decay·θ``, so anything the closure adds to the loss composes. A closure that runs
    the model under ``torch.autocast`` gets the Fisher's products under the same autocast (the
    solve and the step stay fp32; ``docs/mixed_precision.md``).

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
    naming the quantity is raised after that bookkeeping. A finite gradient whose norm
    overflows its dtype (|g| near 1e19 in float32) is skipped too, not rescaled: NGD's step is
    invariant to the gradient's scale only through λ, and a loss that large is broken; the step
    is skipped as long as the loss stays there, so rescale the loss. Any other exception raised
    during a step (a bad argument, an error in the closure, ``KeyboardInterrupt`` at any point)
    leaves the parameters and the optimizer's state (damping, counters, generator, history,
    per-parameter state) as they were before the call, or, if it arrives after the step's
    commit, as after it; the model's hooks, ``requires_grad`` flags, BatchNorm statistics, the
    random generators and grad mode are put back as they were before the call.

    Args:
        model: the network to optimise (needed to linearize it).
        lr: step size applied to the natural gradient (default 1: the Newton-like step).
        damping: initial Tikhonov damping λ.
        likelihood: ``"categorical"`` (the default), ``"gaussian"``, ``"bernoulli"`` or a
            ``Likelihood``; the closure's loss must then be its mean negative log-likelihood.
        loss: instead of ``likelihood``, the torch loss module the closure calls on the model's
            output (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``,
            ``GaussianNLLLoss``; see :mod:`ngtriton.losses`): the Fisher is the GGN of exactly
            that loss (its reduction, ``ignore_index``, class layout), with the targets the
            closure passed it. Damping is then in that loss's units.
        output: which part of the model's output is linearized when it returns a tuple, dict
            or Hugging Face ``ModelOutput`` (default: the tensor, else ``.logits``, else a
            tuple's first tensor): a key or attribute name, an index or a callable.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"`` (the latter needs ``step(closure,
            targets=y)``).
        method: solver (``"auto"``, ``"cg"``, ``"pcg"`` (preconditioned, truncated CG),
            ``"minres"``, ``"lsmr"``, ``"dual"``: the exact sample-space solve, an
            eigendecomposition of the R × R kernel, R = batch × output factor columns, so for
            small batches; ``"dual-krylov"`` needs a factor of the gradient that NGD does not
            have).
        params: optional parameters or param-group dicts (default: all trainable parameters).
        weight_decay: L2 coefficient added to the gradient (per group).
        adaptive_damping: adapt λ with the LM rule (else λ stays fixed).
        damping_floor, damping_ceiling: bounds of the adaptive damping.
        damping_increase, damping_decrease: the LM factors (3/2 and 2/3).
        tol, maxiter: the solver's relative tolerance and iteration cap.
        check_every: the Krylov solver reads its stopping test on the host every
            ``check_every`` iterations (see :func:`ngtriton.solvers.cg`); between reads its
            scalars stay on the device. ``None`` (default): 1 on the CPU, where reads are free,
            and 4 on CUDA (``config.CUDA_CHECK_EVERY``): 4× fewer synchronisations for at most
            3 wasted products when a solve stops early. The solution is the same (to
            round-off), and so are the step's decisions (iterations, ρ, damping, rejection).
        warm_start: start the solver from ``warm_start_decay`` × the previous solution (ignored
            while λ = 0, where it would give up the minimum-norm solution; methods ``"auto"``,
            ``"cg"``, ``"pcg"`` and ``"minres"`` only).
        curvature_fraction: fraction of the batch used for the Fisher products (a random subset,
            drawn from the optimizer's own generator: the same rows of every input tensor, also
            inside containers, that leads with the batch size; where that size is unclear, the
            whole batch, with a warning).
        reject_steps: undo steps that raise the loss.
        trial_every: without ``reject_steps``, evaluate the trial loss (and so ρ and the
            damping rule) only every ``trial_every`` steps (Martens & Grosse 2015 adapt λ every
            5): a trial costs about one forward pass.
        momentum: ``None`` (no momentum), a fixed coefficient μ in [0, 1) (``δ = −lr·n +
            μ·δ_prev``), or ``"auto"``: ``δ = a·(−n) + b·δ_prev`` with ``a`` and ``b`` minimising
            the damped quadratic model on that plane (Martens & Grosse 2015, §7), at the cost of
            one Fisher product of ``δ_prev``; ``lr`` then scales the model's optimal step.
        preconditioner: ``None`` or ``"adam"``: preconditioned CG (method ``"pcg"``) with the
            diagonal ``(v + ε)^preconditioner_power``, ``v`` the running second moment of the
            gradient (decay ``preconditioner_beta``). It costs no product. At λ = 0 the solve
            of a singular system then returns the minimum-``M``-norm solution, not the
            Euclidean one; the function-space step ``J·n`` is the same.
        progress_tol: method ``"pcg"`` also stops once the quadratic's relative progress over
            the last ``k = max(10, i/10)`` iterations falls below ``k·progress_tol`` (Martens
            2010, §4.4); 0 turns that test off.
        backend: linearization backend (``"auto"``, ``"torch"``, ``"triton"``, ``"autograd"``).
        mc_samples: sampled labels per example for ``fisher="mc"``.
        seed: seed of the generator for the subsample and Monte-Carlo labels.
        keep_history: append every step's statistics to ``opt.history``.
        nonfinite: ``"skip"`` (default: skip the step and go on) or ``"raise"`` (also raise a
            :class:`NonFiniteError`).
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, damping: float = DEFAULT_DAMPING,
                 likelihood: str | Likelihood | None = None, fisher: str = "exact",
                 method: str = "auto", *, params: Iterable[Any] | None = None,
                 weight_decay: float = 0.0, adaptive_damping: bool = True,
                 damping_floor: float = DEFAULT_DAMPING_FLOOR,
                 damping_ceiling: float = DEFAULT_DAMPING_CEILING,
                 damping_increase: float = 1.5, damping_decrease: float = 2.0 / 3.0,
                 tol: float = DEFAULT_TOL, maxiter: int | None = DEFAULT_MAXITER,
                 check_every: int | None = None, warm_start: bool = False,
                 warm_start_decay: float = 0.95,
                 curvature_fraction: float = 1.0, reject_steps: bool = True,
                 momentum: str | float | None = None, preconditioner: str | None = None,
                 preconditioner_beta: float = 0.999, preconditioner_power: float = 0.5,
                 progress_tol: float = 5e-4, trial_every: int = 1,
                 loss: nn.Module | None = None, output: Any = None,
                 backend: str = "auto", mc_samples: int = 1, seed: int = 0,
                 keep_history: bool = True, nonfinite: str = "skip") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        model, ddp = distributed.unwrap(model)  # DDP: linearize (and hook) its inner module
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model: has no trainable parameters (none with requires_grad=True)")
        distributed.refuse_sharded(trainable)
        lr = positive("lr", lr)
        damping = positive("damping", damping, allow_zero=True)
        weight_decay = positive("weight_decay", weight_decay, allow_zero=True)
        if loss is not None:
            if likelihood is not None:
                raise ValueError("loss: give loss= or likelihood=, not both (the loss decides "
                                 "the likelihood and its scale)")
            check_loss(loss)
        self.loss = loss
        self.output = check_selector(output)
        self.likelihood = None if loss is not None else get_likelihood(
            "categorical" if likelihood is None else likelihood)
        choice("fisher", fisher, FISHER_TYPES)
        if method == "dual-krylov":
            raise ValueError("method: 'dual-krylov' needs the gradient factor b (Aᵀb = g), and "
                             "NGD's gradient comes from the closure; use 'dual' (the exact "
                             "sample-space solve), 'cg', 'pcg', 'minres' or 'auto'")
        choice("method", method, NGD_METHODS)
        choice("backend", backend, BACKENDS)
        choice("nonfinite", nonfinite, NONFINITE_MODES)
        adaptive_damping = flag("adaptive_damping", adaptive_damping)
        reject_steps = flag("reject_steps", reject_steps)
        warm_start = flag("warm_start", warm_start)
        keep_history = flag("keep_history", keep_history)
        floor = positive("damping_floor", damping_floor, allow_zero=True)
        ceiling = positive("damping_ceiling", damping_ceiling)
        if ceiling < floor:
            raise ValueError(f"damping_ceiling: {ceiling:g} is below damping_floor {floor:g}")
        if adaptive_damping and not floor <= damping <= ceiling:
            raise ValueError(f"damping: {damping:g} lies outside [damping_floor, damping_ceiling]"
                             f" = [{floor:g}, {ceiling:g}]; move the bounds or pass "
                             "adaptive_damping=False")
        increase = positive("damping_increase", damping_increase)
        decrease = positive("damping_decrease", damping_decrease)
        if increase <= 1:
            raise ValueError(f"damping_increase: expected > 1, got {increase:g}")
        if decrease >= 1:
            raise ValueError(f"damping_decrease: expected < 1, got {decrease:g}")
        tol = positive("tol", tol)
        maxiter = count("maxiter", maxiter, allow_none=True)
        check_every = count("check_every", check_every, allow_none=True)
        warm_start_decay = positive("warm_start_decay", warm_start_decay, allow_zero=True,
                                    upper=1.0)
        if warm_start and method not in WARM_START_METHODS:
            raise ValueError(f"warm_start: method {method!r} cannot start from a previous "
                             f"solution; use one of {list(WARM_START_METHODS)} or "
                             "warm_start=False")
        curvature_fraction = positive("curvature_fraction", curvature_fraction, upper=1.0)
        momentum = momentum_arg(momentum)
        if preconditioner is not None:
            choice("preconditioner", preconditioner, PRECONDITIONERS)
            if method not in ("auto", "pcg"):
                raise ValueError(f"preconditioner: needs method 'pcg' (or 'auto'), got method "
                                 f"{method!r}")
        precond_rule = AdamDiagonal(
            beta=positive("preconditioner_beta", preconditioner_beta, upper=1.0 - 1e-12),
            power=positive("preconditioner_power", preconditioner_power, upper=4.0))
        progress_tol = positive("progress_tol", progress_tol, allow_zero=True)
        mc_samples = count("mc_samples", mc_samples)
        trial_every = count("trial_every", trial_every)
        if trial_every > 1 and reject_steps:
            raise ValueError(f"trial_every: {trial_every} skips trial evaluations that "
                             "reject_steps=True needs at every step; pass reject_steps=False")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if not -2**63 <= seed < 2**64:
            raise ValueError(f"seed: expected a 64-bit integer, got {seed}")

        defaults = {"lr": lr, "weight_decay": weight_decay}
        # add_param_group (called by torch's __init__) checks every group against the model.
        self._group_model = model
        self._ungrouped: list[Tensor] = []
        try:
            super().__init__(trainable if params is None else params, defaults)
        except KeyError as err:  # torch's own checks, named for the user
            raise ValueError(f"params: every param group needs a 'params' entry ({err})") \
                from None
        except (TypeError, ValueError) as err:
            if str(err).startswith(("params:", "lr:", "weight_decay:")):
                raise
            raise type(err)(f"params: {err}") from None

        self.model = model
        self._ddp = ddp
        self.communication: distributed.CommStats | None = None  # the last step's, if any
        self.fisher = fisher
        self.method = method
        self.backend = backend
        self.adaptive_damping = adaptive_damping
        self.damping_floor, self.damping_ceiling = floor, ceiling
        self.damping_increase, self.damping_decrease = increase, decrease
        self.tol, self.maxiter, self.check_every = tol, maxiter, check_every
        self.warm_start, self.warm_start_decay = warm_start, warm_start_decay
        self.curvature_fraction = curvature_fraction
        self.reject_steps = reject_steps
        self.momentum = momentum
        self.preconditioner = preconditioner
        self._precond_rule = precond_rule
        self.progress_tol = progress_tol
        self.trial_every = trial_every
        self.mc_samples = mc_samples
        self.keep_history = keep_history
        self.nonfinite = nonfinite
        self._set_trainable(trainable)
        self.workspace = Workspace()  # the step's flat vectors on the CPU (see _step)
        self._runner = ClosureRunner(model)
        self._batch_rows: int | None = None  # leading size of the closure's model output
        self._warned_subsample = False  # the subsample found no batch dimension (warned once)
        self._names = names_by_id(model)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._book = Book(steps=0, damping=damping)
        self.history: list[dict[str, Any]] = []

    # --- the book's fields, read and written as attributes ---
    def _book_field(name: str) -> property:
        def get(self: NGD) -> Any:
            return getattr(self._book, name)

        def set_(self: NGD, value: Any) -> None:
            self._book = Book(**{**vars(self._book), name: value})
        return property(get, set_, doc=f"The optimizer's ``{name}`` (part of its state).")

    steps = _book_field("steps")
    damping = _book_field("damping")
    skipped_total = _book_field("skipped_total")
    rejected_total = _book_field("rejected_total")
    last_stats = _book_field("last_stats")
    del _book_field

    @property
    def _rule(self) -> DampingRule:
        return DampingRule(self.adaptive_damping, self.damping_floor, self.damping_ceiling,
                           self.damping_increase, self.damping_decrease)

    # --- parameters ---
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
            group["lr"] = positive("lr", group["lr"])
            group["weight_decay"] = positive("weight_decay", group["weight_decay"],
                                             allow_zero=True)
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

    # --- pieces of a step ---
    def _flat(self, name: str, tensors: list[Tensor], ws: Workspace | None) -> Tensor:
        """``tensors`` flattened into one vector: the workspace's buffer ``name`` if given."""
        parts = [t.reshape(-1) for t in tensors]
        if ws is None:
            return torch.cat(parts)
        return torch.cat(parts, out=ws.get(name, self._numel, parts[0].dtype, parts[0].device))

    def _state_flat(self, key: str, params: list[Tensor],
                    fill: Sequence[Tensor] | None = None) -> Tensor | None:
        """The per-parameter state ``key`` as one flat vector (where a parameter has none:
        its chunk of ``fill``, else zeros), or None when no parameter has it."""
        found = [self.state[p].get(key) if p in self.state else None for p in params]
        if all(f is None for f in found):
            return None
        return torch.cat([(f.reshape(-1).to(p.dtype) if f is not None else
                           torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                           if fill is None else fill[i])
                          for i, (p, f) in enumerate(zip(params, found))])

    def _per_param(self, key: str) -> dict[int, float]:
        return {id(p): float(g[key]) for g in self.param_groups for p in g["params"]}

    def _curvature_inputs(self, args: tuple, kwargs: dict, targets: Tensor | None
                          ) -> tuple[tuple, dict, Tensor | None]:
        """The curvature subsample (see :func:`.inputs.curvature_subsample`)."""
        def warn(message: str) -> None:
            if not self._warned_subsample:
                self._warned_subsample = True
                import warnings
                warnings.warn(message, stacklevel=user_stacklevel())
        return curvature_subsample(args, kwargs, targets, self.curvature_fraction,
                                   self._batch_rows, self._generator, warn)

    def _resolve_method(self, op: Any, x0: Tensor | None) -> str:
        """``"auto"``: preconditioned CG when a preconditioner is set; else the exact
        sample-space solve when it costs fewer products than the capped Krylov solve (the cost
        rule of :func:`ngtriton.solvers.choose_method`); else CG, whose iterates from 0
        satisfy ``nᵀ(F+λI)n = nᵀg`` so that ρ needs no extra product; the solver's own
        choice where CG does not apply (an inconsistent system: the Monte-Carlo Fisher at
        λ = 0)."""
        if self.method == "dual":  # no factor b here (g is the closure's): the exact solve
            return "dual-direct"
        if self.method == "auto" and self.preconditioner is not None:
            return "pcg"
        if self.method != "auto" or x0 is not None:
            return self.method
        rhs_in_range = self.fisher != "mc" or op.damping > 0
        if choose_method(op, maxiter=self.maxiter, factor_rhs=False,
                         rhs_in_range=rhs_in_range) == "dual-direct":
            return "dual-direct"
        return "cg" if rhs_in_range else "auto"

    def _update_damping(self, rho: float) -> None:
        """The Levenberg–Marquardt rule (NaN ρ counts as a bad step)."""
        self.damping = self._rule.update(self.damping, rho)

    @staticmethod
    def _describe_inputs(args: tuple, kwargs: dict) -> str:
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
        device = self._trainable[0].device
        tx = Transaction(self, self._trainable)
        try:
            return _StepRun(self, tx, closure, targets).run()
        except BaseException:
            if not tx.done(self):  # a booked non-finite skip raised on purpose is done
                settle(lambda: tx.rollback(self))
            raise
        finally:
            settle(lambda: self._runner.restore_after_first_call(device))

    # --- state ---
    def state_dict(self) -> dict[str, Any]:
        """The torch.optim state plus NGD's own: damping, counters, generator, history and the
        last step's statistics."""
        out = super().state_dict()
        out["ngd"] = checkpoint.ngd_entry(self)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved. Everything is checked before anything is loaded:
        a malformed entry raises a ``ValueError`` that names the key and leaves this optimizer
        as it was. A damping outside this optimizer's ``[damping_floor, damping_ceiling]`` is
        moved into it (when adaptive)."""
        checkpoint.load(self, state_dict, super().load_state_dict)

    # --- copies ---
    def __getstate__(self) -> dict[str, Any]:
        """The whole optimizer, for ``copy.deepcopy`` and pickle (torch's own keeps only the
        defaults, state and groups, which would leave an NGD without its model or damping).
        As with torch's optimizers, hooks are not carried. The names keyed by ``id(parameter)``
        are rebuilt on the other side; the workspace's buffers are scratch. An LR scheduler
        wraps ``step`` on the instance, with a reference to this optimizer: the wrapper stays
        behind (the copy's ``step`` is NGD's own, and a scheduler made for the copy wraps it)."""
        state = {key: value for key, value in self.__dict__.items()
                 if not key.endswith("_hooks") and key not in _NOT_COPIED}
        state["workspace"] = Workspace()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "model" in state:
            self._names = names_by_id(self.model)

    def __repr__(self) -> str:
        curvature = (f"loss={type(self.loss).__name__}" if self.loss is not None
                     else f"likelihood={self.likelihood.name!r}")
        return (f"NGD(lr={self.param_groups[0]['lr']:g}, damping={self.damping:g}, "
                f"{curvature}, fisher={self.fisher!r}, "
                f"method={self.method!r}, steps={self.steps})")
