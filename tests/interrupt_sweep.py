"""An interrupt sweep over one NGD step: a ``KeyboardInterrupt`` raised at the k-th traced line,
for every k until a step runs to its end without reaching k (used by test_interrupts.py).

After each interrupted step the model and the optimizer must be exactly as before the call or
exactly as after an uninterrupted step (the reference: a deep copy of the optimizer stepped from
the same model state and random state); one more step must then match the reference's
continuation, and a plain ``torch.optim.Adam`` step must still move every parameter.

One model object serves every point of a sweep (its parameters, buffers, flags and gradients are
put back before each, and any hook removed), so its fx trace stays cached: a fresh deep copy of
the model would be traced again at every point, 30× the cost.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import ngtriton

_PKG = os.path.dirname(os.path.abspath(ngtriton.__file__)) + os.sep
OPTIM_FILES = (os.path.join(_PKG, "optim") + os.sep,)
# The files a step calls besides the optimizer's own: the Fisher operator, the solvers, the
# guard's helpers and the forward record (the hooks it registers).
DEEP_FILES = (*OPTIM_FILES, os.path.join(_PKG, "solvers") + os.sep,
              os.path.join(_PKG, "fisher.py"), os.path.join(_PKG, "natgrad.py"),
              os.path.join(_PKG, "linearize", "record.py"))


CLOSURE_NAME = "user_closure"  # the name of every closure a Case makes


class Interrupter:
    """Raises ``KeyboardInterrupt`` at the ``k``-th 'line' event in files under ``prefixes``
    (then the trace is gone: Python drops a trace function that raises). ``count`` is how many
    line events it saw; with ``k`` None it only counts."""

    def __init__(self, k: int | None, prefixes: tuple[str, ...]) -> None:
        self.k, self.prefixes = k, prefixes
        self.count = 0
        self.fired_at: str | None = None
        self.in_closure = False  # it fired inside the user's closure (a function of that name)
        self.events: list[tuple[str, int]] | None = None  # (file, line) of each event, if asked
        self._files: dict[str, bool] = {}

    def _wanted(self, filename: str) -> bool:
        hit = self._files.get(filename)
        if hit is None:
            hit = self._files[filename] = filename.startswith(self.prefixes)
        return hit

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        return self._local if self._wanted(frame.f_code.co_filename) else None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            if self.count == self.k:
                code = frame.f_code
                self.fired_at = (f"{os.path.relpath(code.co_filename, _PKG)}:{frame.f_lineno} "
                                 f"({code.co_name})")
                outer = frame.f_back
                while outer is not None and not self.in_closure:
                    self.in_closure = outer.f_code.co_name == CLOSURE_NAME
                    outer = outer.f_back
                raise KeyboardInterrupt(f"injected at line event {self.k}")
            if self.events is not None:
                self.events.append((frame.f_code.co_filename, frame.f_lineno))
            self.count += 1
        return self._local

    def __enter__(self) -> Interrupter:
        self._old = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._old)


# --- what "exactly as" means ------------------------------------------------------------------

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same(a: Any, b: Any, path: str = "") -> str | None:
    """None when ``a`` and ``b`` are equal bit for bit (tensors), NaN matching NaN (floats),
    recursively; else where they first differ. ``time`` entries are skipped."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_floating_point():
            view = _INT_VIEW[a.element_size()]
            a, b = a.detach().contiguous().view(view), b.detach().contiguous().view(view)
        return None if torch.equal(a, b) else f"{path}: values differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            if key == "time":
                continue
            diff = same(a[key], b[key], f"{path}[{key!r}]")
            if diff:
                return diff
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{path}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]"
        for i, (u, v) in enumerate(zip(a, b)):
            diff = same(u, v, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if type(a) is not type(b) or a != b:
        return f"{path}: {a!r} vs {b!r}"
    return None


def grads(model: nn.Module) -> list[Tensor | None]:
    """The ``.grad`` tensors (the closure's own doing: a step leaves the first call's)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def snapshot(model: nn.Module, opt: ngtriton.NGD) -> dict[str, Any]:
    """Everything a step may change, as plain data (parameters and buffers by position), but
    the ``.grad`` tensors (see :func:`grads`)."""
    hooks = {}
    for name, m in model.named_modules():
        found = {kind: len(getattr(m, kind)) for kind in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
            "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")}
        hooks[name] = found
    params = list(model.parameters())
    loss = getattr(opt, "loss", None)  # NGD(loss=...): the closure's loss module, hooked too
    if isinstance(loss, nn.Module):
        hooks["<loss=>"] = {kind: len(getattr(loss, kind)) for kind in (
            "_forward_hooks", "_forward_pre_hooks")}
    return {
        "params": [p.detach().clone() for p in params],
        "requires_grad": [p.requires_grad for p in params],
        "tensor_hooks": [bool(getattr(p, "_backward_hooks", None)) for p in params],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "hooks": hooks,
        "global_hooks": [len(getattr(nn.modules.module, k)) for k in (
            "_global_forward_hooks", "_global_forward_pre_hooks")],
        "training": [m.training for m in model.modules()],
        "grad_enabled": torch.is_grad_enabled(),
        "state_dict": copy.deepcopy(opt.state_dict()),  # torch shares the state dicts
        "history_len": len(opt.history),
        "last_stats": None if opt.last_stats is None else dict(vars(opt.last_stats)),
        "generator": opt._generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "pending_restore": opt._runner._after is not None,
    }


# --- the sweep ----------------------------------------------------------------------------------

@dataclass
class Case:
    """One configuration: ``make()`` returns ``(model, opt_kwargs, batch)``; ``closure(opt,
    model, batch)`` the step's closure; ``expect`` the exception an uninterrupted step raises
    (NonFiniteError for ``nonfinite="raise"``); ``warmup`` steps run before the swept one."""

    name: str
    make: Callable[[], tuple[nn.Module, dict[str, Any], Any]]
    closure: Callable[[ngtriton.NGD, nn.Module, Any], Callable[[], Any]]
    expect: type[BaseException] | None = None
    warmup: int = 1
    check: Callable[[ngtriton.NGD], None] | None = None  # asserts about the reference step


@dataclass
class Report:
    points: int = 0
    before: int = 0
    after: int = 0
    failures: list[str] = field(default_factory=list)


def _step(opt: ngtriton.NGD, closure: Callable[[], Any], expect: type[BaseException] | None
          ) -> None:
    if expect is None:
        opt.step(closure)
        return
    try:
        opt.step(closure)
    except expect:
        return
    raise AssertionError(f"the step did not raise {expect.__name__}")


def _adam_moves_everything(model: nn.Module, case: Case, batch: Any) -> str | None:
    """A plain Adam step after NGD must move every parameter (no detached-leaf hook left)."""
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.enable_grad():
        adam.step(case.closure(adam, model, batch))
    stuck = [name for (name, p), b in zip(model.named_parameters(), before)
             if torch.equal(p.detach(), b)]
    return f"Adam left {stuck} unmoved" if stuck else None


class ModelState:
    """The model's parameters, buffers, flags and gradients, to put back between sweep points
    (the model object itself is shared: its fx trace stays cached)."""

    def __init__(self, model: nn.Module, also: list[nn.Module] = ()) -> None:
        self.hooked = [*model.modules(), *also]  # ``also``: e.g. the closure's loss module
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in self.hooked)
        self.model = model
        self.params = [p.detach().clone() for p in model.parameters()]
        self.flags = [p.requires_grad for p in model.parameters()]
        self.buffers = [b.detach().clone() for b in model.buffers()]
        self.grads = grads(model)

    def restore(self) -> None:
        model = self.model
        for m in self.hooked:
            for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                getattr(m, name, {}).clear()
        torch.set_grad_enabled(True)
        with torch.no_grad():
            for p, v, flag, g in zip(model.parameters(), self.params, self.flags, self.grads):
                p.copy_(v)
                p.requires_grad_(flag)
                p.grad = None if g is None else g.clone()
            for b, v in zip(model.buffers(), self.buffers):
                b.copy_(v)


def _copy(opt: ngtriton.NGD, model: nn.Module) -> ngtriton.NGD:
    """A deep copy of ``opt`` that shares ``model`` (its modules, parameters and buffers) and
    the loss module the closure calls (``NGD(loss=...)``)."""
    memo: dict[int, Any] = {id(model): model}
    loss = getattr(opt, "loss", None)
    for t in [*model.modules(), *model.parameters(), *model.buffers(),
              *([loss] if isinstance(loss, nn.Module) else [])]:
        memo[id(t)] = t
    return copy.deepcopy(opt, memo)


def sweep(case: Case, prefixes: tuple[str, ...] = OPTIM_FILES, stride: int = 1,
          start: int = 0, limit: int | None = None) -> Report:
    """Interrupt the step of ``case`` at line event k = start, start + stride, ... (every line
    event of an uninterrupted step, or ``limit`` points)."""
    model, kwargs, batch = case.make()
    opt = ngtriton.NGD(model, **kwargs)
    for _ in range(case.warmup):
        _step(opt, case.closure(opt, model, batch), case.expect)
    loss = getattr(opt, "loss", None)
    base = ModelState(model, [loss] if isinstance(loss, nn.Module) else [])
    torch.manual_seed(1234)
    rng = torch.get_rng_state()

    def run(o: ngtriton.NGD, k: int | None = None) -> Interrupter:
        """One step of ``o`` from the base state (interrupted at line event ``k``)."""
        base.restore()
        torch.set_rng_state(rng)
        trace = Interrupter(k, prefixes)
        closure = case.closure(o, model, batch)
        try:
            with trace:
                _step(o, closure, case.expect)
        except KeyboardInterrupt:
            if k is None:
                raise
        return trace

    # The reference: the step and the one after it; the step again (it must be repeatable).
    origin = snapshot(model, opt)
    start_grads = grads(model)
    ref = _copy(opt, model)
    run(ref)
    if case.check is not None:
        case.check(ref)
    after_one, after_grads = snapshot(model, ref), grads(model)
    _step(ref, case.closure(ref, model, batch), case.expect)
    after_two = snapshot(model, ref)
    again = _copy(opt, model)
    total = run(again).count
    diff = same(snapshot(model, again), after_one)
    assert diff is None, f"the step is not repeatable: {diff}"

    report = Report()
    for k in range(start, total, stride):
        if limit is not None and report.points >= limit:
            break
        o = _copy(opt, model)
        trace = run(o, k)
        assert trace.fired_at is not None, (k, total)
        report.points += 1
        where = f"{case.name} k={k} at {trace.fired_at}"
        now = snapshot(model, o)
        g_now = grads(model)
        # Cut inside the user's closure (opt.zero_grad, the model's hooks), the .grad tensors
        # are whatever the closure had done by then.
        if not trace.in_closure and same(g_now, start_grads) is not None \
                and same(g_now, after_grads) is not None:
            report.failures.append(f"{where}: .grad is neither as before nor as after")
        diff_before, diff_after = same(now, origin), same(now, after_one)
        if diff_before is None:
            report.before += 1
            target = after_one
        elif diff_after is None:
            report.after += 1
            target = after_two
        else:
            report.failures.append(f"{where}: neither as before ({diff_before}) nor as after "
                                   f"({diff_after})")
            continue
        # One more step must continue exactly like the reference, and Adam must still work.
        try:
            _step(o, case.closure(o, model, batch), case.expect)
        except Exception as err:  # reported, the sweep goes on
            report.failures.append(f"{where}: the next step raised {err!r}")
            continue
        diff = same(snapshot(model, o), target)
        if diff is not None:
            report.failures.append(f"{where}: the next step differs from the reference ({diff})")
        bad = _adam_moves_everything(model, case, batch)
        if bad:
            report.failures.append(f"{where}: {bad}")
    base.restore()
    return report
