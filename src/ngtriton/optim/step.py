"""One NGD step, from the closure's first call to the commit (see :class:`_StepRun`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..fisher import FisherOperator
from ..solvers import Workspace, solve
from ..solvers._vecops import acc_dtype, all_finite, norm
from ..solvers.pcg import pcg
from . import distributed
from .closure import FirstCall, loss_value
from .config import group_value, resolve_check_every
from .guard import GuardedOperator
from .inputs import BoundKwargs, as_positional
from .loss import ClosureLoss
from .quadratic import decay_quadratic, minimise_on_plane
from .stats import NGDStats, NonFiniteError
from .transaction import Book, Transaction, restorer

if TYPE_CHECKING:
    from .ngd import NGD


class _Skip(Exception):
    """A non-finite value: the step is booked as skipped (``reason``, ``what``, ``detail``)."""

    def __init__(self, reason: str, what: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.what, self.detail = reason, what, detail


class _StepRun:
    """The state of one step while it runs; nothing here outlives it.

    Order: the closure's first call (inputs captured, forward recorded) → the gradient g → the
    preconditioner's second moment → the Fisher at the batch (or its subsample) → the solve
    ``(F + λI) n = g`` → the step ``δ`` (``−lr·n``, plus momentum, or the minimiser of the
    quadratic model over ``n`` and the previous step) → θ + δ → the trial loss, ρ, rejection and
    the damping → the commit. A non-finite value anywhere books the step as skipped.
    """

    def __init__(self, opt: NGD, tx: Transaction, closure: Callable[[], Any],
                 targets: Tensor | None) -> None:
        self.opt, self.tx, self.closure, self.targets = opt, tx, closure, targets
        self.t0 = time.perf_counter()
        self.params = opt._trainable
        self.device = self.params[0].device
        self.updates: dict[Tensor, dict[str, Tensor]] = {}
        self.stats: dict[str, Any] = {}
        self.op: GuardedOperator | None = None
        self.comm = distributed.context(opt)  # None in one process
        self.model_note = ""  # set when the step's quadratic model was evaluated
        # The trial forward (ρ, rejection): every step when rejecting, else every trial_every.
        self.trial = opt.reject_steps or (opt.adaptive_damping
                                          and (opt.steps + 1) % opt.trial_every == 0)

    # --- booking ---
    def _finish(self, book: Book) -> None:
        self.stats.setdefault("next_damping", book.damping)
        self.stats["time"] = time.perf_counter() - self.t0
        self.stats["skipped_total"] = book.skipped_total
        self.stats["rejected_total"] = book.rejected_total
        stats = NGDStats(**self.stats)
        book = Book(**{**vars(book), "last_stats": stats})
        self.tx.commit(self.opt, book, stats, list(self.updates.items()))

    def _book(self, *, damping: float, rejected: int = 0, skipped: int = 0) -> Book:
        old = self.opt._book
        return Book(steps=old.steps + 1, damping=damping,
                    skipped_total=old.skipped_total + skipped,
                    rejected_total=old.rejected_total + rejected)

    def _skip(self, skip: _Skip) -> None:
        opt = self.opt
        self.stats["reason"] = skip.reason
        self.updates = {}  # nothing of a skipped step is kept
        book = self._book(damping=opt._rule.bump(opt.damping), skipped=1)
        self._finish(book)
        if opt.nonfinite == "raise":
            raise NonFiniteError(
                f"{skip.what}: {skip.detail} at NGD step {book.steps}; the step was skipped and "
                f"the parameters are unchanged (damping is now {book.damping:g})",
                reason=skip.reason, what=skip.what, step=book.steps)

    def _put(self, p: Tensor, key: str, value: Tensor) -> None:
        self.updates.setdefault(p, {})[key] = value

    # --- the step ---
    def run(self) -> Any:
        opt = self.opt
        runner = opt._runner
        watch = ClosureLoss(opt.loss, opt.model, opt.output) if opt.loss is not None else None
        with watch if watch is not None else contextlib.nullcontext():
            first = runner.first_call(
                self.closure, self.device,
                record=opt.curvature_fraction >= 1.0 and opt.backend != "autograd",
                want_rows=opt.curvature_fraction < 1.0, check_inputs=opt._check_inputs)
        if watch is not None:
            self.targets = watch.targets()
        opt._batch_rows = first.rows
        runner.keep_after_first_call(self.device)  # put back by NGD.step when the step is over
        value = loss_value(first.loss)
        if self.comm is not None:  # the ranks' mean loss; their state is checked to agree
            value = self.comm.start(opt, value)
        if all(p.grad is None for p in self.params):
            raise ValueError("closure: no parameter has a .grad after it ran; it must call "
                             "loss.backward() before returning the loss")
        for i, group in enumerate(opt.param_groups):  # a scheduler or the user may set them
            for key in ("lr", "weight_decay"):
                group_value(i, group, key)
        self.stats = {
            "step": opt.steps + 1, "loss": value, "trial_loss": math.nan, "accepted": False,
            "reason": "", "iterations": 0, "residual": math.nan, "converged": False,
            "method": opt.method, "damping": opt.damping, "rho": math.nan,
            "predicted_reduction": math.nan, "actual_reduction": math.nan,
            "grad_norm": math.nan, "step_norm": 0.0, "alpha": math.nan, "momentum": 0.0}
        try:
            self._solve_and_move(first, value)
        except _Skip as skip:
            self._skip(skip)
        finally:
            if self.comm is not None:
                opt.communication = self.comm.stats
        return first.loss

    def _gradient(self, ws: Workspace | None, decay: dict[int, float]) -> Tensor:
        """g = the .grads (+ weight decay), flat: one copy of them."""
        params = self.params
        with torch.no_grad():
            g = self.opt._flat("g", [torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                                     if p.grad is None else p.grad.detach() for p in params], ws)
            if any(decay.values()):
                for p, chunk in zip(params, g.split(self.opt._sizes)):
                    if decay.get(id(p)):
                        chunk.add_(p.detach().reshape(-1), alpha=decay[id(p)])
            if self.comm is not None:  # the ranks' mean (DDP's backward did it already)
                self.comm.gradient(g)
            # A finite ‖g‖ means a finite g (NaN and Inf propagate): one pass for both. A norm
            # that overflowed from finite values is no use either.
            grad_norm = float(norm(g))
        self.stats["grad_norm"] = grad_norm
        if not math.isfinite(grad_norm):
            bad = [self.opt._names.get(id(p), "?") for p in params
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                detail = f"NaN or Inf in the .grad of {', '.join(bad)}"
            elif not bool(torch.isfinite(g).all()):
                detail = "NaN or Inf after weight decay"
            else:
                detail = (f"‖g‖ overflows {g.dtype} (|g| up to {float(g.abs().max()):.3g}); "
                          "the solvers cannot use it")
            raise _Skip("nonfinite_grad", "gradient", detail)
        return g

    def _preconditioner(self, g: Tensor) -> Tensor | None:
        """The diagonal for PCG from the running second moment (updated with this g)."""
        opt = self.opt
        if opt.preconditioner is None:
            return None
        rule, sizes = opt._precond_rule, opt._sizes
        with torch.no_grad():
            g2 = g.square()  # a parameter without history (ungrouped, new) starts from its g²
            v_old = opt._state_flat("exp_avg_sq", self.params, fill=g2.split(sizes))
            v = rule.advance(v_old, g)
            d = rule.diagonal(v)
        in_group = {id(p) for group in opt.param_groups for p in group["params"]}
        for p, chunk in zip(self.params, v.split(sizes)):
            if id(p) in in_group:  # torch's state_dict maps grouped parameters only
                self._put(p, "exp_avg_sq", chunk.view(p.shape))
        return d

    def _operator(self, first: FirstCall) -> GuardedOperator:
        opt = self.opt
        c_args, c_kwargs, c_targets = opt._curvature_inputs(first.args, first.kwargs,
                                                            self.targets)
        c_args, c_kwargs = as_positional(opt.model, c_args, c_kwargs)
        fisher_model = BoundKwargs(opt.model, c_kwargs) if c_kwargs else opt.model
        op = FisherOperator(
            fisher_model, c_args, opt.likelihood, loss=opt.loss, targets=c_targets,
            output=opt.output, fisher=opt.fisher, damping=opt.damping, backend=opt.backend,
            mc_samples=opt.mc_samples, generator=opt._generator, record=first.record,
            autocast=first.autocast or False)  # the precision the closure ran the model in
        if self.comm is not None:  # every product averaged over the ranks' examples
            op = distributed.DistributedOperator(op, self.comm)
        return GuardedOperator(op)

    def _solve_and_move(self, first: FirstCall, value: float) -> None:
        opt, params, stats = self.opt, self.params, self.stats
        if not math.isfinite(value):
            raise _Skip("nonfinite_loss", "loss", f"the closure returned {value}"
                        + opt._describe_inputs(first.args, first.kwargs))
        decay = opt._per_param("weight_decay")
        lr = opt._per_param("lr")
        # On the CPU the step's flat vectors (g, CG's x, r, p, the restore point) live in a
        # workspace kept between steps: fresh ones would page-fault on every step.
        ws = (opt.workspace if self.device.type == "cpu"
              and all(p.dtype == params[0].dtype and p.device == self.device for p in params)
              else None)
        g = self._gradient(ws, decay)
        d = self._preconditioner(g)
        op = self.op = self._operator(first)
        first.record = None
        damping = opt.damping
        x0 = None
        if opt.warm_start and damping > 0:
            prev = opt._state_flat("warm_start", params)
            if prev is not None:
                x0 = prev.mul_(opt.warm_start_decay).to(g.dtype)
        method = opt._resolve_method(op, x0)
        if self.comm is not None:
            method = distributed.resolve_method(method, op, opt)
        # (an NGD unpickled from before check_every has none: None)
        check_every = resolve_check_every(getattr(opt, "check_every", None), op.device)
        # CG's and PCG's host loops stop at the first non-finite product; the device-side
        # loops (check_every > 1) go on with frozen iterates, so every product is watched.
        op.watch.last_only = (method in ("cg", "pcg") and op.device.type == "cpu"
                              and check_every == 1)
        An = None
        try:
            with torch.no_grad():
                if method == "pcg":
                    result = pcg(op.damped_matvec, g, precond=d, x0=x0, tol=opt.tol,
                                 maxiter=opt.maxiter or 2 * op.num_params + 10,
                                 progress_tol=opt.progress_tol, check_every=check_every)
                    An = result.Ax
                else:
                    # NGD's solves are truncated on purpose: converged is in its stats.
                    result = solve(op, g, method=method, tol=opt.tol, maxiter=opt.maxiter,
                                   x0=x0, check_every=check_every, workspace=ws,
                                   on_unconverged="ignore")
        except torch.linalg.LinAlgError:  # e.g. eigh of a kernel matrix holding NaN
            if not op.any_bad():
                raise
            stats["method"] = method
            raise _Skip("nonfinite_curvature", "Fisher product",
                        "NaN or Inf from a Fisher product (the solver failed on it)") from None
        n = result.x.detach()
        stats.update(iterations=int(result.iterations), residual=float(result.residual),
                     converged=bool(result.converged), method=str(result.method))
        if op.any_bad():
            raise _Skip("nonfinite_curvature", "Fisher product",
                        f"NaN or Inf from a Fisher product during the {result.method} solve")
        with torch.no_grad():
            # ‖n‖² and nᵀg in one host read; a finite ‖n‖² means a finite n (one pass fewer).
            ng, nn_ = (float(t) for t in torch.stack([n.dot(g), n.dot(n)]).tolist())
        if not math.isfinite(nn_) and not bool(all_finite(n)):
            raise _Skip("nonfinite_solution", "solution",
                        f"NaN or Inf in the natural gradient returned by {result.method}")
        in_group = {id(p) for group in opt.param_groups for p in group["params"]}
        if opt.warm_start:  # kept for grouped parameters only: torch's state_dict maps those
            for p, chunk in zip(params, n.split(opt._sizes)):
                if id(p) in in_group:
                    self._put(p, "warm_start", chunk.view(p.shape).clone())
        rates = [lr[id(p)] if id(p) in in_group else 0.0 for p in params]
        delta, predicted = self._direction(op, g, n, An, ng, rates, decay,
                                           galerkin=x0 is None and result.method in (
                                               "cg", "pcg", "dual-direct"))
        self._move(delta, predicted, first, value, decay, in_group)

    def _direction(self, op: GuardedOperator, g: Tensor, n: Tensor, An: Tensor | None,
                   ng: float, rates: list[float], decay: dict[int, float], *, galerkin: bool
                   ) -> tuple[Tensor, float]:
        """The step δ and the quadratic model's predicted change ``m(δ)`` (NaN when it is not
        needed and would cost a product).

        ``δ = a·Δ₁ + b·Δ₂`` with ``Δ₁ = −(rates/lr)·n`` (lr: the largest group rate) and
        ``Δ₂`` the previous step: ``(a, b) = (lr, μ)`` for a fixed momentum μ, or the minimiser
        of ``m`` on the plane for ``momentum="auto"``."""
        opt, params, sizes = self.opt, self.params, self.opt._sizes
        scale = max(rates)
        if scale <= 0:
            return torch.zeros_like(n), math.nan
        uniform = len(set(rates)) == 1
        with torch.no_grad():
            d1 = -n if uniform else torch.cat(
                [c * (-r / scale) for c, r in zip(n.split(sizes), rates)])
            decay_vec = None
            if any(decay.values()):
                decay_vec = torch.cat([torch.full((s,), decay.get(id(p), 0.0), dtype=n.dtype,
                                                  device=n.device) for p, s in zip(params, sizes)])
        momentum = opt.momentum
        d2 = opt._state_flat("momentum_buffer", params) if momentum != 0.0 else None
        if d2 is not None:
            d2 = d2.to(n.dtype)
        need_model = self.trial or momentum == "auto"
        c1 = g11 = math.nan
        if need_model:
            with torch.no_grad():
                c1 = float(g.dot(d1))
                if uniform and An is not None:
                    g11 = float(n.dot(An))
                elif uniform and galerkin:
                    g11 = ng  # CG from 0 (and the exact solve): nᵀ(F+λI)n = nᵀg
                else:
                    g11 = float(d1.dot(op.damped_matvec(d1)))
                g11 += decay_quadratic(decay_vec, d1, d1)
        use_d2 = d2 is not None and bool(d2.abs().max() > 0)
        c2 = g12 = g22 = 0.0
        if use_d2:
            with torch.no_grad():
                Ad2 = op.damped_matvec(d2)
                c2 = float(g.dot(d2))
                g12 = float(d1.dot(Ad2)) + decay_quadratic(decay_vec, d1, d2)
                g22 = float(d2.dot(Ad2)) + decay_quadratic(decay_vec, d2, d2)
            if op.any_bad():
                raise _Skip("nonfinite_curvature", "Fisher product",
                            "NaN or Inf from the Fisher product of the previous step")
        if momentum == "auto":
            plane = minimise_on_plane(c1, c2, g11, g12, g22, scale)
            if plane is None:
                if not all(math.isfinite(v) for v in (c1, c2, g11, g12, g22)):
                    raise _Skip("nonfinite_curvature", "Fisher product",
                                f"NaN or Inf in the quadratic model (dᵀAd = {g11:g})")
                a, b = scale, 0.0  # no descent in the plane: the plain step, judged by ρ
            else:
                a, b = plane.a, plane.b
        else:
            a, b = scale, (float(momentum) if use_d2 else 0.0)
        predicted = math.nan
        if need_model:  # checked in _move, after the step's own overflow check
            predicted = a * c1 + b * c2 + 0.5 * (a * a * g11 + 2 * a * b * g12 + b * b * g22)
            self.model_note = f"NaN or Inf in the quadratic model (dᵀAd = {g11:g})"
        self.stats.update(alpha=a, momentum=b)
        with torch.no_grad():
            delta = d1 * a if b == 0.0 else torch.add(d1 * a, d2, alpha=b)
        return delta, predicted

    def _move(self, delta: Tensor, predicted: float, first: FirstCall, value: float,
              decay: dict[int, float], in_group: set[int]) -> None:
        """θ ← θ + δ, the trial, ρ, rejection and the damping; then the commit."""
        opt, params, stats = self.opt, self.params, self.stats
        sizes = opt._sizes
        with torch.no_grad():
            step_sq = float(delta.dot(delta))
        step_norm = math.sqrt(step_sq) if step_sq >= 0 else math.nan
        stats["step_norm"] = step_norm
        stats["predicted_reduction"] = predicted
        if not math.isfinite(step_norm) or step_norm > torch.finfo(delta.dtype).max:
            raise _Skip("nonfinite_step", "step", f"the step overflowed (step norm "
                        f"{step_norm:g}, lr {max(g['lr'] for g in opt.param_groups):g})")
        if self.model_note and (not math.isfinite(predicted) or self.op.any_bad()):
            raise _Skip("nonfinite_curvature", "Fisher product", self.model_note)
        momentum_kept = opt.momentum != 0.0
        chunks = delta.split(sizes)
        if step_norm == 0.0:  # zero gradient (or lr 0): nothing to try, nothing learned
            stats.update(accepted=True, reason="accepted")
            self._finish(self._book(damping=opt.damping))
            return
        ws = (opt.workspace if self.device.type == "cpu"
              and all(p.dtype == params[0].dtype and p.device == self.device for p in params)
              else None)
        with torch.no_grad():  # a bit-exact restore point: one flat copy
            old_flat = opt._flat("restore", [p.detach() for p in params], ws)
            old = [o.view(p.shape) for o, p in zip(old_flat.split(sizes), params)]
        self.tx.unmove = restorer(params, old)
        with torch.no_grad():
            torch._foreach_add_(params, [c.view(p.shape) for c, p in zip(chunks, params)])
            # One summing pass per parameter (NaN and Inf propagate, see all_finite); the exact
            # test only when a sum is not finite.
            finite = (bool(torch.isfinite(torch.stack(
                [p.sum(dtype=acc_dtype(p.dtype)) for p in params])).all())
                      or all(bool(torch.isfinite(p).all()) for p in params))
        if not finite:
            self.tx.unmove()
            stats["step_norm"] = 0.0
            raise _Skip("nonfinite_step", "step", f"θ + δ overflowed (step norm {step_norm:g})")
        if momentum_kept:
            for p, c in zip(params, chunks):
                if id(p) in in_group:
                    self._put(p, "momentum_buffer", c.view(p.shape).clone())
        if not self.trial:
            stats.update(accepted=True, reason="accepted")
            self._finish(self._book(damping=opt.damping))
            return
        if self.comm is None:
            trial = opt._runner.trial_loss(self.closure, first, params, self.device)
        else:
            with self.comm.no_sync():
                trial = opt._runner.trial_loss(self.closure, first, params, self.device)
            trial = self.comm.scalar_mean(trial)
        if not math.isfinite(trial):
            self.tx.unmove()
            stats.update(trial_loss=trial, step_norm=0.0)
            raise _Skip("nonfinite_trial_loss", "trial loss",
                        f"the loss at the trial point θ + δ is {trial}; the step was undone")
        with torch.no_grad():
            reg_change = (sum(0.5 * decay[id(p)] * (float(p.pow(2).sum()) - float(o.pow(2).sum()))
                              for p, o in zip(params, old) if decay.get(id(p)))
                          if any(decay.values()) else 0.0)
        actual = trial - value + reg_change
        rho = actual / predicted if predicted < 0 else -math.inf
        if not math.isfinite(actual):
            rho = math.nan
        stats.update(trial_loss=trial, actual_reduction=actual, rho=rho)
        if opt.reject_steps and not actual <= 0:
            self.tx.unmove()
            for entries in self.updates.values():
                entries.pop("momentum_buffer", None)  # the previous step stays the last one
            stats.update(reason="rejected", step_norm=0.0)
            self._finish(self._book(damping=opt._rule.update(opt.damping, -math.inf),
                                    rejected=1))
            return
        stats.update(accepted=True, reason="accepted")
        self._finish(self._book(damping=opt._rule.update(opt.damping, rho)))
