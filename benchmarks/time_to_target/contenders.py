"""The contenders: AdamW over a learning-rate grid, NGD in the configurations of
:data:`NGD_CONFIGS`, and heavyball's MuonAdamW and SOAP (eager) when heavyball is installed
(``pip install 'ngtriton[bench]'``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ngtriton

from .problems import Problem

# NGD's configurations: name -> keyword arguments of ``ngtriton.NGD(model, **kwargs)``. The
# problem's likelihood and the run's seed are added unless a configuration sets them. Add new
# options here (or with ``--ngd-config name=json``); every problem runs every entry.
NGD_CONFIGS: dict[str, dict[str, Any]] = {
    "NGD": {},
    "NGD momentum auto": {"momentum": "auto"},
    "NGD large-model settings": dict(ngtriton.optim.LARGE_MODEL_SETTINGS),
}

FAMILIES = ("adamw", "ngd", "muon", "soap")


@dataclass
class Contender:
    """One optimizer setting: ``build(model, problem, seed)`` returns the optimizer;
    ``closure_step``: the optimizer takes ``step(closure)`` (NGD) rather than a step after
    ``backward``."""

    name: str
    family: str
    kwargs: dict[str, Any]
    build: Callable[[nn.Module, Problem, int], torch.optim.Optimizer]
    closure_step: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def parse_ngd_config(text: str) -> tuple[str, dict[str, Any]]:
    """``name=json`` (e.g. ``'NGD lsmr={"method": "lsmr"}'``) -> (name, kwargs)."""
    name, sep, blob = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--ngd-config: expected name=json, got {text!r}")
    try:
        kwargs = json.loads(blob)
    except json.JSONDecodeError as err:
        raise ValueError(f"--ngd-config: {name.strip()!r} has invalid JSON ({err})") from err
    if not isinstance(kwargs, dict):
        raise ValueError(f"--ngd-config: {name.strip()!r} must map to a JSON object, "
                         f"got {type(kwargs).__name__}")
    return name.strip(), kwargs


def heavyball_module() -> Any | None:
    """heavyball set to run eagerly (``compile_mode = None``: torch.compile costs tens of
    seconds per optimizer on a CPU), or None when it is not installed."""
    try:
        import heavyball
    except ImportError:
        return None
    heavyball.utils.compile_mode = None
    return heavyball


def _adamw(lr: float) -> Contender:
    def build(model: nn.Module, problem: Problem, seed: int) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr)
    return Contender(f"AdamW lr {lr:g}", "adamw", {"lr": lr}, build)


def _ngd(name: str, kwargs: dict[str, Any]) -> Contender:
    def build(model: nn.Module, problem: Problem, seed: int) -> torch.optim.Optimizer:
        full = {"likelihood": problem.likelihood, "seed": seed, **kwargs}
        return ngtriton.NGD(model, **full)
    return Contender(name, "ngd", dict(kwargs), build, closure_step=True)


def _heavyball(family: str, cls_name: str, lr: float) -> Contender:
    def build(model: nn.Module, problem: Problem, seed: int) -> torch.optim.Optimizer:
        hb = heavyball_module()
        assert hb is not None
        return getattr(hb, cls_name)(model.parameters(), lr=lr)
    return Contender(f"{cls_name} lr {lr:g}", family, {"lr": lr}, build,
                     meta={"library": "heavyball"})


def contenders(problem: Problem, ngd_configs: dict[str, dict[str, Any]],
               families: tuple[str, ...] = FAMILIES) -> list[Contender]:
    """Every contender of ``problem`` in ``families``; heavyball's only when it imports."""
    out: list[Contender] = []
    if "adamw" in families:
        out += [_adamw(lr) for lr in problem.lr_grids["adamw"]]
    if "ngd" in families:
        out += [_ngd(name, kw) for name, kw in ngd_configs.items()]
    if heavyball_module() is not None:
        if "muon" in families:
            out += [_heavyball("muon", "MuonAdamW", lr) for lr in problem.lr_grids["muon"]]
        if "soap" in families:
            out += [_heavyball("soap", "SOAP", lr) for lr in problem.lr_grids["soap"]]
    return out
