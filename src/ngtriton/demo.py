"""The main demo: NGD, Adam and SGD on the digits MLP, side by side.

``python -m ngtriton.demo`` (or ``ngtriton-demo``) trains an MLP 64-128-128-10 (tanh) on
scikit-learn's 8×8 digits (standardised, 80/20 split, batch 256) with each optimizer, prints a
table (epochs, training loss, test accuracy, wall-clock) and saves a convergence plot (training
loss against epochs and against seconds) as a PNG. It needs scikit-learn and matplotlib.

The helpers (:func:`load_digits_data`, :func:`make_mlp`, :func:`train`) are shared by the tests,
the examples and the benchmarks.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .optim import NGD

SEED = 0


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Run:
    """What :func:`train` measured: per-epoch training loss (full training set), test accuracy
    and cumulative optimizer wall time (evaluation excluded); index 0 is before training."""

    name: str
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.losses) - 1


def load_digits_data(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     seed: int = SEED) -> Data:
    """sklearn's digits, standardised with the training set's statistics, 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)

    def tx(a: Any) -> Tensor:
        return torch.as_tensor(scaler.transform(a), dtype=dtype, device=device)

    def ty(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return Data(tx(x_tr), ty(y_tr), tx(x_te), ty(y_te))


def make_mlp(sizes: Sequence[int] = (64, 128, 128, 10), seed: int = SEED,
             activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """An MLP with ``activation`` between its linear layers, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """(training loss on the whole training set, test accuracy)."""
    loss = float(F.cross_entropy(model(data.x_train), data.y_train))
    acc = float((model(data.x_test).argmax(-1) == data.y_test).float().mean())
    return loss, acc


def make_optimizer(name: str, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """``"ngd"`` (defaults), ``"adam"`` (lr 3e-3) or ``"sgd"`` (lr 0.1, momentum 0.9)."""
    if name == "ngd":
        return NGD(model, **kwargs)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **{"lr": 3e-3, **kwargs})
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **{"lr": 0.1, "momentum": 0.9, **kwargs})
    raise ValueError(f"name: expected 'ngd', 'adam' or 'sgd', got {name!r}")


def train(name: str, data: Data, epochs: int = 3, batch_size: int = 256, seed: int = SEED,
          model: nn.Module | None = None, progress: Callable[[], Any] | None = None,
          stop_at: float | None = None, **opt_kwargs: Any) -> tuple[nn.Module, Run]:
    """Train the digits MLP with optimizer ``name`` for ``epochs`` (shuffled minibatches from a
    generator seeded with ``seed``). ``stop_at`` ends training once the epoch's training loss
    is at or below it; ``progress`` is called after each minibatch (e.g. a tqdm update)."""
    device = data.x_train.device
    model = make_mlp(seed=seed).to(device, data.x_train.dtype) if model is None else model
    opt = make_optimizer(name, model, **opt_kwargs)
    gen = torch.Generator().manual_seed(seed)
    run = Run(name)
    loss, acc = evaluate(model, data)
    run.losses.append(loss)
    run.accuracies.append(acc)
    run.seconds.append(0.0)
    n = data.x_train.shape[0]
    elapsed = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                opt.zero_grad()
                out = F.cross_entropy(model(xb), yb)
                out.backward()
                return out

            if name == "ngd":
                opt.step(closure)
            else:
                closure()
                opt.step()
            if progress is not None:
                progress()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        loss, acc = evaluate(model, data)
        run.losses.append(loss)
        run.accuracies.append(acc)
        run.seconds.append(elapsed)
        if stop_at is not None and loss <= stop_at:
            break
    return model, run


def plot(runs: Sequence[Run], path: str) -> None:
    """Training loss against epochs and against optimizer seconds, log scale, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        ax1.semilogy(range(len(run.losses)), run.losses, marker="o", ms=3, label=run.name)
        ax2.semilogy(run.seconds, run.losses, marker="o", ms=3, label=run.name)
    ax1.set_xlabel("epoch")
    ax2.set_xlabel("optimizer wall-clock [s]")
    for ax in (ax1, ax2):
        ax.set_ylabel("training loss (cross-entropy)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("digits, MLP 64-128-128-10 tanh, batch 256")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: Sequence[Run]) -> str:
    head = f"{'optimizer':<10}{'epochs':>7}{'train loss':>13}{'test acc':>10}{'seconds':>9}"
    rows = [head, "-" * len(head)]
    for r in runs:
        rows.append(f"{r.name:<10}{r.epochs:>7}{r.losses[-1]:>13.3e}"
                    f"{100 * r.accuracies[-1]:>9.1f}%{r.seconds[-1]:>9.2f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(prog="ngtriton-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs per optimizer (10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", default="ngtriton_demo.png", help="path of the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs: expected an integer ≥ 1")
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        parser.exit(2, f"ngtriton-demo needs scikit-learn and matplotlib ({err}): "
                       "pip install 'ngtriton[demo]'\n")
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    data = load_digits_data(device)
    batches = -(-data.x_train.shape[0] // 256)
    names = {"ngd": "NGD", "adam": "Adam", "sgd": "SGD"}
    runs = []
    with tqdm(total=len(names) * args.epochs * batches, disable=args.no_progress,
              unit="step") as bar:
        for key, label in names.items():
            bar.set_description(label)
            _, run = train(key, data, epochs=args.epochs, progress=bar.update)
            run.name = label
            runs.append(run)
    print(f"\ndigits ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), "
          f"MLP 64-128-128-10 tanh, batch 256, device {device}")
    print(table(runs))
    plot(runs, args.out)
    print(f"plot saved to {args.out}")
    return runs


if __name__ == "__main__":
    main()
