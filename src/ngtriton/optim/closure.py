"""Running the user's closure for NGD: its first call (inputs captured, forward recorded), the
trial call at the new parameters (about one forward), and what both leave behind (random
generators, BatchNorm running statistics)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._frames import user_stacklevel
from ..linearize import ForwardRecord
from ..linearize.precision import ambient_autocast
from .atomic import settle, settle_all
from .inputs import same_tensors

# What autograd says when a closure differentiates tensors that evaluation mode froze.
_NEEDS_GRAD = re.compile(r"requires_grad|require grad|`inputs` argument to `\w+\(\)`")
# A module's forward (pre-)hooks, and the dicts torch keeps beside them under the same keys.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_EXTRAS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks_with_kwargs")


def unhook(model: nn.Module, ours: list[Any]) -> None:
    """Remove from every module of ``model`` the forward (pre-)hooks whose function is one of
    ``ours``, or a method of one of them (a :class:`ForwardRecord`'s). Found by the function, not
    by a handle, so a registration that an interrupt cut short (the hook is there, its handle
    is not) is removed too; idempotent."""
    if not ours:
        return
    ids = {id(o) for o in ours}
    # A forward record hooks the model's modules; the runner's own hooks sit on the model.
    on = model.modules() if any(isinstance(o, ForwardRecord) for o in ours) else (model,)
    for m in on:
        for name in _HOOK_DICTS:
            hooks = m.__dict__.get(name)
            if hooks:
                for key in [key for key, fn in hooks.items()
                            if id(fn) in ids or id(getattr(fn, "__self__", None)) in ids]:
                    _drop(m, hooks, key)


def _drop(m: nn.Module, hooks: dict, key: Any) -> None:
    for extra in _HOOK_EXTRAS:  # first: a rerun still finds the key in ``hooks``
        extra_dict = m.__dict__.get(extra)
        if extra_dict is not None:
            extra_dict.pop(key, None)
    hooks.pop(key, None)


def unhook_since(modules: list[nn.Module], mark: int) -> None:
    """Remove from ``modules`` every forward (pre-)hook registered since torch's hook counter
    stood at ``mark`` (hook ids only grow): whatever a failed step registered, even through a
    ``with`` block whose ``__enter__`` or ``__exit__`` an interrupt cut short. Idempotent."""
    for m in modules:
        for name in _HOOK_DICTS:
            hooks = m.__dict__.get(name)
            if hooks:
                for key in [key for key in hooks if isinstance(key, int) and key >= mark]:
                    _drop(m, hooks, key)


def _redirected(module: nn.Module) -> bool:
    """Whether this call of ``module`` is Lightning's redirection of ``training_step`` through
    the DDP wrapper (``forward`` patched on the instance for one call): not the model's own
    forward, which ``training_step`` calls inside it."""
    return getattr(module.__dict__.get("forward"), "__name__", None) == "wrapped_forward"


def _norm_buffers(model: nn.Module) -> list[Tensor]:
    """The running statistics of the model's train-mode BatchNorm-like modules (a forward in
    train mode advances them)."""
    return [b for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
            and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


class StepStart:
    """What a step may change on the model and in torch, taken when it starts, so that a step
    that fails (an interrupt included) puts it all back: the forward hooks on the model and on
    ``hooked`` (e.g. the closure's loss module), the parameters' ``requires_grad``, the
    BatchNorm running statistics, the random generators and the grad mode (a ``with`` block
    that an interrupt leaves at its last line never runs its ``__exit__``)."""

    def __init__(self, model: nn.Module, device: torch.device,
                 hooked: list[nn.Module] = ()) -> None:
        self.mark = getattr(RemovableHandle, "next_id", None)  # torch's hook counter
        self.hooked = list(hooked)
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        bufs = _norm_buffers(model)
        self.stats = (bufs, [b.clone() for b in bufs]) if bufs else None
        self.rng = ClosureRunner.rng_states(device)
        self.grad_enabled = torch.is_grad_enabled()
        self.device = device


def loss_value(loss: Any) -> float:
    """The closure's loss as a float (a scalar tensor or a number); errors name ``closure``."""
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


class FirstCall:
    """What the closure's first call of a step left: its loss, the model's inputs, the recorded
    forward, the generators' states from before the call (the trial replays them), the rows
    of the model's output (the subsample's batch size) and the dtype of the ``torch.autocast``
    the closure ran the model under (None: full precision), which the Fisher's build repeats."""

    def __init__(self, loss: Any, args: tuple, kwargs: dict, record: ForwardRecord | None,
                 rng: list[Tensor], rows: int | None,
                 autocast: torch.dtype | None = None) -> None:
        self.loss, self.args, self.kwargs, self.record = loss, args, kwargs, record
        self.rng, self.rows, self.autocast = rng, rows, autocast


class ClosureRunner:
    """Calls a closure on behalf of NGD and puts back what the calls change.

    ``full_trials`` becomes true once a closure cannot run in evaluation mode (it
    differentiates the parameters themselves); ``warned_batch`` once a trial saw other inputs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.full_trials = False
        self.warned_batch = False
        self._after: tuple[tuple[list[Tensor], list[Tensor]] | None, list[Tensor]] | None = None
        # The hook functions (and forward records) the running step put on the model: they are
        # added here before they are registered, so a failed step can always find them.
        self._hooks: list[Any] = []
        self._undo: list[Callable[[], None]] = []  # idempotent put-backs the abort runs too

    # --- the step as a whole ---
    def begin(self, device: torch.device, hooked: list[nn.Module] = ()) -> StepStart:
        """A step starts: what :meth:`abort` puts back if it fails (``hooked``: modules besides
        the model that the step may hook, e.g. the closure's loss module)."""
        self._hooks, self._undo = [], []
        return StepStart(self.model, device, hooked)

    def abort(self, start: StepStart) -> None:
        """The step failed: no hook of it stays on the model (or on ``start.hooked``; hooks the
        closure registered during the failed step go too), and ``requires_grad``, the running
        statistics, the random generators and the grad mode are as at ``start``; the ``.grad``
        tensors a trial set aside are back. Idempotent."""
        for undo in reversed(self._undo):
            undo()
        unhook(self.model, self._hooks)
        if start.mark is not None:
            unhook_since([*self.model.modules(), *start.hooked], start.mark)
        for p, flag in start.flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        if start.stats is not None:
            with torch.no_grad():
                torch._foreach_copy_(*start.stats)
        self.set_rng_states(start.rng, start.device)
        torch.set_grad_enabled(start.grad_enabled)
        self._after = None
        self._hooks, self._undo = [], []

    def end(self, device: torch.device) -> None:
        """The step is about to commit: what the first call left is put back (see
        :meth:`keep_after_first_call`); the step's hooks are gone already (each call removed its
        own, and a removal that an interrupt cut short raised into the rollback). Idempotent."""
        self.restore_after_first_call(device)
        self._hooks, self._undo = [], []

    # --- random generators ---
    @staticmethod
    def rng_states(device: torch.device) -> list[Tensor]:
        """The generators a closure draws from: the CPU one, and the model's GPU's."""
        cpu = torch.get_rng_state()
        return [cpu, torch.cuda.get_rng_state(device)] if device.type == "cuda" else [cpu]

    @staticmethod
    def set_rng_states(states: list[Tensor], device: torch.device) -> None:
        torch.set_rng_state(states[0])
        if len(states) > 1:
            torch.cuda.set_rng_state(states[1], device)

    # --- the first call ---
    def first_call(self, closure: Callable[[], Any], device: torch.device, *, record: bool,
                   want_rows: bool, check_inputs: Callable[[tuple, dict], None]) -> FirstCall:
        """Run the closure with the model's inputs captured (checked by ``check_inputs``) and,
        with ``record``, its forward recorded for the engine's build."""
        captured: dict[str, Any] = {}
        rng = self.rng_states(device)
        rec = ForwardRecord(self.model) if record else None

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if "args" not in captured and not _redirected(module):
                check_inputs(args, kwargs)
                captured["args"], captured["kwargs"] = args, dict(kwargs)
                captured["autocast"] = ambient_autocast(device.type)

        def rows(module: nn.Module, args: tuple, out: Any) -> None:  # the subsample's batch
            if "rows" not in captured and isinstance(out, Tensor) and out.ndim > 0:
                captured["rows"] = out.shape[0]

        # Known before they are registered: the clean-up finds them whatever an interrupt cut.
        ours: list[Any] = [pre_hook, *([rows] if want_rows else []),
                           *([rec] if rec is not None else [])]
        self._hooks.extend(ours)

        def remove() -> None:
            if rec is not None:
                rec.__exit__(None, None, None)
            unhook(self.model, ours)

        try:
            self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
            if want_rows:
                self.model.register_forward_hook(rows)
            if rec is not None:
                rec.__enter__()
            with torch.enable_grad():
                loss = closure()
        finally:
            settle(remove)
        if "args" not in captured:
            raise ValueError("closure: it never called the model passed to NGD, so there are no "
                             "inputs to build the Fisher at")
        return FirstCall(loss, captured["args"], captured["kwargs"], rec, rng,
                         captured.get("rows"), captured.get("autocast"))

    # --- what the first call left, put back after the step ---
    def keep_after_first_call(self, device: torch.device) -> None:
        """Remember the running statistics of the model's train-mode BatchNorm-like modules and
        the random generators as the first call left them: the build and the trial forward run
        the model again on the same batch, and would otherwise advance both once or twice more.
        """
        bufs = _norm_buffers(self.model)
        self._after = ((bufs, [b.clone() for b in bufs]) if bufs else None,
                       self.rng_states(device))

    def restore_after_first_call(self, device: torch.device) -> None:
        """Put back what :meth:`keep_after_first_call` kept (idempotent until it is done)."""
        kept = self._after
        if kept is None:
            return
        stats, rng = kept
        if stats is not None:
            with torch.no_grad():
                torch._foreach_copy_(*stats)
        self.set_rng_states(rng, device)
        self._after = None

    # --- the trial call ---
    def trial_loss(self, closure: Callable[[], Any], first: FirstCall,
                   trainable: list[Tensor], device: torch.device) -> float:
        """The closure's loss at the current parameters, at the cost of about one forward.

        The parameters stop requiring grad for the call (grad mode itself stays on, so a model
        whose forward differentiates, e.g. ``autograd.grad`` of an energy, still runs) and each
        output of the model reaches the closure as a fresh leaf, so the closure's ``backward()``
        only runs through the loss head. A closure that cannot run that way (it differentiates
        with respect to the parameters themselves, e.g. ``autograd.grad(loss, params)`` or
        ``backward(inputs=params)``) is called once more as it is, with its full backward, and
        so is every later trial of this runner.

        The random generators start from their states before the first call, so the trial sees
        the same dropout masks (and the same batch, if the closure draws it from torch's
        generator). The ``.grad`` tensors of the first call are set aside meanwhile (a closure
        that zeroes them in place must not wipe them) and put back afterwards. A trial that
        calls the model with other tensors (a closure that fetches its own batch) measures ρ
        across two batches: a warning says so, once.
        """
        seen: list[tuple] = []
        saved_grads = [p.grad for p in trainable]

        def put_grads_back() -> None:
            for p, grad in zip(trainable, saved_grads):
                p.grad = grad

        def see(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not seen and not _redirected(module):
                seen.append((args, kwargs))

        self._hooks.append(see)
        self._undo.append(put_grads_back)
        try:
            self.model.register_forward_pre_hook(see, with_kwargs=True)
            for p in trainable:
                p.grad = None
            value = self._trial(closure, first.rng, seen, trainable, device)
        finally:
            settle_all([lambda: unhook(self.model, [see]), put_grads_back])
        if seen and not self.warned_batch and not same_tensors((first.args, first.kwargs),
                                                               seen[0]):
            self.warned_batch = True
            warnings.warn("closure: the trial call ran the model on other inputs than the first "
                          "call, so ρ and the step rejection compare the losses of two different "
                          "batches; fix the batch outside the closure (as for LBFGS), or pass "
                          "adaptive_damping=False, reject_steps=False",
                          stacklevel=user_stacklevel())
        return value

    def _trial(self, closure: Callable[[], Any], rng: list[Tensor], seen: list,
               trainable: list[Tensor], device: torch.device) -> float:
        if self.full_trials:
            return self._call(closure, rng, device, leaves=False)
        try:
            return self._call(closure, rng, device, leaves=True)
        except RuntimeError as err:  # e.g. autograd.grad(loss, params) needs their grad
            if not _NEEDS_GRAD.search(str(err)):
                raise  # the closure's own error: it reaches the caller
        for p in trainable:  # whatever the failed call left
            p.grad = None
        seen.clear()
        value = self._call(closure, rng, device, leaves=False)
        self.full_trials = True  # it runs as it is: do that from now on
        return value

    def _call(self, closure: Callable[[], Any], rng: list[Tensor], device: torch.device, *,
              leaves: bool) -> float:
        """One call of the closure from the generators' states ``rng``; with ``leaves``, in the
        evaluation mode of :meth:`trial_loss`."""
        self.set_rng_states(rng, device)
        if not leaves:
            with torch.enable_grad():
                return loss_value(closure())
        flags = [(p, p.requires_grad) for p in self.model.parameters()]

        def leaf_outputs(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, Tensor) and output.is_floating_point():
                return output.detach().requires_grad_(True)
            return None

        def thaw() -> None:
            for p, flag in flags:
                p.requires_grad_(flag)

        self._hooks.append(leaf_outputs)
        try:
            self.model.register_forward_hook(leaf_outputs)
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                return loss_value(closure())
        finally:
            settle_all([lambda: unhook(self.model, [leaf_outputs]), thaw])
