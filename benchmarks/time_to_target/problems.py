"""The three problems: what is trained, on which batches, and what "training loss" means.

Every problem gives a model per seed, a batch stream per seed (the same for every contender:
fetched outside the timed step), the loss a closure computes, an untimed evaluation of the
training loss, and its targets and budgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngtriton.demo import load_digits_data, make_mlp

from .chargpt import CharGPT, sample_batch, stdlib_bytes

PROBLEMS = ("digits", "autoencoder", "chargpt")
DIGITS_BATCH = 256
# Reconstruction targets (nats per image): AdamW's best lr, measured on the 2-core CPU, passes
# 20 within ~2 s, 15 within ~10 s and is near 14.8 after 15 s (on a busy machine).
AUTOENCODER_TARGETS = (20.0, 15.0, 14.0)


@dataclass
class Problem:
    """One benchmark problem at a given size (full or ``--quick``)."""

    name: str
    description: str
    likelihood: str  # NGD's likelihood for this loss
    targets: tuple[float, ...]  # training-loss targets, descending
    budget_s: float  # optimizer seconds per run
    max_steps: int
    seeds: int  # default number of seeds
    make_model: Callable[[int], nn.Module]
    batches: Callable[[int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], float]
    lr_grids: dict[str, tuple[float, ...]]  # family -> learning rates
    steps_per_epoch: int | None = None
    checkpoints_s: tuple[float, ...] = ()  # report the loss at these optimizer times
    eval_interval_s: float = 1.0  # evaluate at least this often (optimizer seconds)
    eval_dense_steps: int = 50  # evaluate after every one of the first steps
    eval_growth: float = 1.02  # then whenever the step count grew by this factor
    meta: dict[str, Any] = field(default_factory=dict)


def _epochs(n: int, batch: int, seed: int, device: torch.device) -> Iterator[Tensor]:
    """Index batches of shuffled epochs, forever, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch):
            yield perm[start:start + batch]


def digits(quick: bool, device: torch.device) -> Problem:
    """The demo's MLP 64-128-128-10 (tanh) on sklearn's digits, batch 256, cross-entropy."""
    data = load_digits_data(device)
    x, y = data.x_train, data.y_train

    def make_model(seed: int) -> nn.Module:
        return make_mlp(seed=seed).to(device)

    def batches(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in _epochs(x.shape[0], DIGITS_BATCH, seed, device):
            yield x[idx], y[idx]

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return float(F.cross_entropy(model(x), y))

    grids = ({"adamw": (1e-2,), "muon": (0.1,), "soap": (1e-2,)} if quick else
             {"adamw": (1e-3, 3e-3, 1e-2), "muon": (0.03, 0.1), "soap": (3e-3, 1e-2)})
    return Problem(
        "digits", f"digits ({x.shape[0]} training images), MLP 64-128-128-10 tanh, batch 256, "
        "cross-entropy", "categorical", (0.05, 1e-3), 0.3 if quick else 3.0,
        10**6, 1 if quick else 3, make_model, batches, loss, evaluate, grids,
        steps_per_epoch=math.ceil(x.shape[0] / DIGITS_BATCH),
        eval_interval_s=0.1 if quick else 0.25)


def _autoencoder_model(seed: int) -> nn.Sequential:
    """64-128-64-32-8-32-64-128-64, tanh everywhere but the linear 8-unit code and the output
    (Bernoulli logits)."""
    torch.manual_seed(seed)
    sizes = (64, 128, 64, 32, 8, 32, 64, 128, 64)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if sizes[i + 1] != 8 and i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def bernoulli_loss(logits: Tensor, x: Tensor) -> Tensor:
    """BCE with logits summed over the pixels, mean over the batch: the scale of NGD's
    ``"bernoulli"`` likelihood (nats per image)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def autoencoder(quick: bool, device: torch.device) -> Problem:
    """Deep autoencoder on digits (pixels scaled to [0, 1]): the curvature-hard problem of
    Hessian-free optimisation (Martens 2010) and K-FAC, at digits' size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    xs, ys = load_digits(return_X_y=True)
    x_tr = train_test_split(xs, ys, test_size=0.2, random_state=0, stratify=ys)[0]
    x = torch.as_tensor(x_tr / 16.0, dtype=torch.float32, device=device)

    def make_model(seed: int) -> nn.Module:
        return _autoencoder_model(seed).to(device)

    def batches(seed: int) -> Iterator[Tensor]:
        for idx in _epochs(x.shape[0], DIGITS_BATCH, seed, device):
            yield x[idx]

    def loss(model: nn.Module, batch: Tensor) -> Tensor:
        return bernoulli_loss(model(batch), batch)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return float(bernoulli_loss(model(x), x))

    grids = ({"adamw": (1e-2,), "muon": (0.03,), "soap": (1e-2,)} if quick else
             {"adamw": (1e-3, 3e-3, 1e-2), "muon": (0.01, 0.03), "soap": (3e-3,)})
    return Problem(
        "autoencoder", f"digits autoencoder ({x.shape[0]} images, pixels/16), "
        "64-128-64-32-8-32-64-128-64 tanh, linear code, Bernoulli output, batch 256, "
        "BCE summed over pixels (nats per image)", "bernoulli", AUTOENCODER_TARGETS,
        0.3 if quick else 15.0, 10**6, 1 if quick else 3, make_model, batches, loss, evaluate,
        grids, steps_per_epoch=math.ceil(x.shape[0] / DIGITS_BATCH),
        eval_interval_s=0.1 if quick else 0.25, eval_dense_steps=20, eval_growth=1.03)


def chargpt(quick: bool, device: torch.device, seconds: float = 120.0) -> Problem:
    """Byte-level GPT (4 layers, d 128, 4 heads, context 64) on 16 × 64-byte windows of the
    standard library's sources; training loss = mean CE over a fixed set of training batches."""
    if quick:
        cfg = {"context": 16, "d": 32, "heads": 2, "layers": 1}
        batch, n_bytes, n_eval = 4, 1 << 16, 2
    else:
        cfg = {"context": 64, "d": 128, "heads": 4, "layers": 4}
        batch, n_bytes, n_eval = 16, 4 << 20, 8
    ctx = cfg["context"]
    data, info = stdlib_bytes(n_bytes)
    eval_gen = torch.Generator().manual_seed(12345)  # the evaluation set: seed-independent
    evals = [tuple(t.to(device) for t in sample_batch(data, batch, ctx, eval_gen))
             for _ in range(n_eval)]

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharGPT(**cfg).to(device)

    def batches(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            xb, yb = sample_batch(data, batch, ctx, gen)
            yield xb.to(device), yb.to(device)

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1].reshape(-1))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return sum(float(loss(model, b)) for b in evals) / len(evals)

    n_params = sum(p.numel() for p in make_model(0).parameters())
    checkpoints = tuple(sorted({c for c in (30.0, 60.0, 120.0) if c <= seconds} | {seconds}))
    if quick:
        checkpoints = (seconds / 2, seconds)
    grids = ({"adamw": (3e-3,), "muon": (0.01,), "soap": (3e-3,)} if quick else
             {"adamw": (1e-3, 3e-3), "muon": (0.01,), "soap": (3e-3,)})
    desc = (f"char-GPT ({n_params / 1e6:.2f} M parameters: {cfg['layers']} layers, "
            f"d {cfg['d']}, {cfg['heads']} heads, context {ctx}), batch {batch}×{ctx} bytes of "
            f"{info['bytes'] / 1e6:.2f} MB of stdlib sources; loss = mean CE over "
            f"{n_eval} fixed training batches")
    return Problem(
        "chargpt", desc, "categorical", (2.0, 1.5), seconds, 10**7, 1, make_model, batches,
        loss, evaluate, grids, checkpoints_s=checkpoints,
        eval_interval_s=seconds / 8 if quick else 2.0, eval_dense_steps=5 if quick else 10,
        eval_growth=1.25, meta={"data": info, "model": cfg, "batch": batch,
                                "parameters": n_params})


def make_problem(name: str, quick: bool, device: torch.device, gpt_seconds: float) -> Problem:
    """The problem called ``name`` (one of :data:`PROBLEMS`)."""
    if name == "digits":
        return digits(quick, device)
    if name == "autoencoder":
        return autoencoder(quick, device)
    if name == "chargpt":
        return chargpt(quick, device, gpt_seconds)
    raise ValueError(f"problems: unknown problem {name!r}, expected some of {list(PROBLEMS)}")
