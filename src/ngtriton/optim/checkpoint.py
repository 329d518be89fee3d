"""NGD's ``state_dict`` and its loading: everything is checked before anything is loaded.

A checkpoint is data from outside (a file, another process), so :func:`load` refuses any entry
that would make a later step fail or go silently wrong, with a ``ValueError`` naming the key,
and leaves the optimizer untouched. Unpickling an NGD object (``pickle``/``torch.load`` without
``weights_only``) can run arbitrary code, as unpickling anything can; a ``state_dict`` saved with
``torch.save`` and read with ``torch.load(..., weights_only=True)`` is the safe route.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .stats import NGDStats
from .transaction import Book

if TYPE_CHECKING:
    from .ngd import NGD

_COUNTERS = ("steps", "skipped_total", "rejected_total")
_STATE_KEYS = ("warm_start", "momentum_buffer", "exp_avg_sq")
_STAT_FIELDS = {f.name: f for f in fields(NGDStats)}


def ngd_entry(opt: NGD) -> dict[str, Any]:
    """NGD's own part of a state dict."""
    return {
        "damping": opt.damping, "steps": opt.steps, "skipped_total": opt.skipped_total,
        "rejected_total": opt.rejected_total, "generator": opt._generator.get_state(),
        "history": [dict(h) for h in opt.history],
        "last_stats": None if opt.last_stats is None else dict(vars(opt.last_stats)),
    }


def _bad(key: str, why: str) -> ValueError:
    return ValueError(f"state_dict: {key} {why}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, f"must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise _bad(key, f"is too large ({value!r})") from None


def _stats(key: str, entry: Any) -> dict[str, Any]:
    """One history entry: a dict of NGDStats' fields with values of the right kinds."""
    if not isinstance(entry, dict):
        raise _bad(key, f"must be a dict, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_STAT_FIELDS))
    if unknown:
        raise _bad(key, f"has unknown fields {unknown}")
    out = dict(entry)
    try:
        NGDStats(**out)
    except TypeError as err:
        raise _bad(key, f"is malformed ({err})") from None
    for name, value in out.items():
        kind = _STAT_FIELDS[name].type
        if kind in ("int", "bool"):
            ok = isinstance(value, bool) if kind == "bool" else (
                isinstance(value, int) and not isinstance(value, bool))
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise _bad(f"{key}[{name!r}]", f"must be a {kind}, got {type(value).__name__}")
    return out


def check_ngd(ngd: Any) -> dict[str, Any]:
    """The ``"ngd"`` entry, checked and converted (nothing is loaded)."""
    if not isinstance(ngd, dict):
        raise _bad("['ngd']", f"must be a dict, got {type(ngd).__name__}")
    required = ("damping", *_COUNTERS, "generator", "history")
    missing = [key for key in required if key not in ngd]
    if missing:
        raise _bad("['ngd']", f"lacks {missing}")
    out = dict(ngd)
    out["damping"] = _number("['ngd']['damping']", ngd["damping"])
    if not math.isfinite(out["damping"]) or out["damping"] < 0:
        raise _bad("['ngd']['damping']", f"must be finite and ≥ 0, got {out['damping']}")
    for key in _COUNTERS:
        value = ngd[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(f"['ngd'][{key!r}]", f"must be an integer ≥ 0, got {value!r}")
    if out["skipped_total"] + out["rejected_total"] > out["steps"]:
        key = "rejected_total" if out["rejected_total"] > out["steps"] else "skipped_total"
        raise _bad(f"['ngd'][{key!r}]", f"counts more steps than were taken: skipped_total "
                   f"{out['skipped_total']} + rejected_total {out['rejected_total']} > steps "
                   f"{out['steps']}")
    gen = ngd["generator"]
    if not isinstance(gen, Tensor) or gen.dtype != torch.uint8 \
            or gen.shape != torch.Generator().get_state().shape:
        raise _bad("['ngd']['generator']", "is not a CPU generator's state (a uint8 tensor "
                   "from torch.Generator.get_state())")
    try:
        torch.Generator().set_state(gen.cpu())
    except (RuntimeError, TypeError, ValueError) as err:
        raise _bad("['ngd']['generator']", f"is not a valid generator state ({err})") from None
    out["generator"] = gen.cpu().clone()
    if not isinstance(ngd["history"], list):
        raise _bad("['ngd']['history']", f"must be a list, got {type(ngd['history']).__name__}")
    out["history"] = [_stats(f"['ngd']['history'][{i}]", h) for i, h in enumerate(ngd["history"])]
    last = ngd.get("last_stats")
    out["last_stats"] = None if last is None else _stats("['ngd']['last_stats']", last)
    return out


def _check_groups(opt: NGD, groups: Any) -> None:
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        have = len(groups) if isinstance(groups, list) else type(groups).__name__
        raise _bad("['param_groups']", f"must be a list of {len(opt.param_groups)} groups "
                   f"(this optimizer's), got {have}")
    seen: set[int] = set()
    for i, (saved, ours) in enumerate(zip(groups, opt.param_groups)):
        key = f"['param_groups'][{i}]"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise _bad(key, "must be a dict with a 'params' list")
        if len(saved["params"]) != len(ours["params"]):
            raise _bad(f"{key}['params']", f"has {len(saved['params'])} parameters, this "
                       f"optimizer's group {len(ours['params'])}")
        for index in saved["params"]:  # the indices the 'state' entries are keyed by
            if isinstance(index, bool) or not isinstance(index, int) or index in seen:
                raise _bad(f"{key}['params']", f"must hold distinct integer parameter indices, "
                           f"got {index!r}")
            seen.add(index)
        for name in ("lr", "weight_decay"):
            if name not in saved:
                raise _bad(key, f"lacks {name!r}")
            value = _number(f"{key}[{name!r}]", saved[name])
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                bound = "> 0" if name == "lr" else "≥ 0"
                raise _bad(f"{key}[{name!r}]", f"must be a finite number {bound}, got "
                           f"{saved[name]!r}")


def _check_state(opt: NGD, state: Any, groups: list[dict[str, Any]]) -> None:
    if not isinstance(state, dict):
        raise _bad("['state']", f"must be a dict, got {type(state).__name__}")
    by_index = {}
    for saved, ours in zip(groups, opt.param_groups):
        by_index.update(zip(saved["params"], ours["params"]))
    for index, entries in state.items():
        key = f"['state'][{index!r}]"
        if index not in by_index:
            raise _bad(key, "is for a parameter index that no param_group holds")
        if not isinstance(entries, dict):
            raise _bad(key, f"must be a dict, got {type(entries).__name__}")
        p = by_index[index]
        for name, value in entries.items():
            if name not in _STATE_KEYS:
                raise _bad(f"{key}[{name!r}]", f"is not NGD state (known: {list(_STATE_KEYS)})")
            if not isinstance(value, Tensor):
                raise _bad(f"{key}[{name!r}]", f"must be a tensor, got {type(value).__name__}")
            if value.shape != p.shape:
                pname = opt._names.get(id(p), "?")
                raise _bad(f"{key}[{name!r}]", f"has shape {tuple(value.shape)}, the parameter "
                           f"{pname} {tuple(p.shape)}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise _bad(f"{key}[{name!r}]", "must be a floating tensor of finite values")
            if name == "exp_avg_sq" and bool((value < 0).any()):
                raise _bad(f"{key}[{name!r}]", "must be ≥ 0 (a second moment)")


def load(opt: NGD, state_dict: Any, torch_load: Callable[[dict[str, Any]], None]) -> None:
    """Check the whole ``state_dict``, then load it (torch's part with ``torch_load``)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
    state_dict = dict(state_dict)
    if "ngd" not in state_dict:
        raise ValueError("state_dict: has no 'ngd' entry; it was not saved by NGD")
    ngd = check_ngd(state_dict.pop("ngd"))
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise _bad(f"[{key!r}]", "is missing")
    _check_groups(opt, state_dict["param_groups"])
    _check_state(opt, state_dict["state"], state_dict["param_groups"])
    damping = ngd["damping"]
    if opt.adaptive_damping:
        damping = min(max(damping, opt.damping_floor), opt.damping_ceiling)
    last = ngd["last_stats"] or (ngd["history"][-1] if ngd["history"] else None)
    book = Book(steps=ngd["steps"], damping=damping, skipped_total=ngd["skipped_total"],
                rejected_total=ngd["rejected_total"],
                last_stats=None if last is None else NGDStats(**last))
    torch_load(state_dict)  # checked above: torch's own checks pass, nothing fails half-way
    opt._book = book
    opt._generator.set_state(ngd["generator"])
    opt.history = ngd["history"]
