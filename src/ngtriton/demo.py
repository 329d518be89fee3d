"""The main demo: NGD, Adam and SGD on the digits MLP, at equal epochs and at equal wall-clock.

``python -m ngtriton.demo`` (or ``ngtriton-demo``) trains an MLP 64-128-128-10 (tanh) on
scikit-learn's 8×8 digits (standardised, 80/20 split, batch 256). NGD trains for ``--epochs``
(10) epochs; its optimizer time T is then the budget of everyone else: Adam at each learning
rate of a small grid (1e-3, 3e-3, 1e-2; the best training loss at T is "Adam's best lr") and SGD
each get T seconds. Adam (best lr) and SGD also train for the same epochs as NGD. The table shows
both views (epochs, training loss, test accuracy, optimizer seconds, time to a training loss of
0.05) and the PNG plots loss against epochs and against seconds, so a user sees where NGD wins
(per epoch) and where it does not (per second, on a model this small). It needs scikit-learn
and matplotlib.

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
ADAM_LRS = (1e-3, 3e-3, 1e-2)  # the grid Adam's best learning rate is chosen from
TARGET = 0.05  # the training loss whose time and epoch the table reports


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Run:
    """What :func:`train` measured: per-epoch training loss (full training set), test accuracy,
    cumulative optimizer wall time (evaluation excluded) and optimizer steps; index 0 is before
    training. A run stopped by its time budget ends with a partial epoch."""

    name: str
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    steps_per_epoch: int = 0
    budget: str = ""  # what the run was given ("10 epochs", "1.52 s"), for the table

    @property
    def epochs(self) -> int:
        """Evaluations after the start: the epochs trained, a last partial one included."""
        return len(self.losses) - 1

    @property
    def epochs_trained(self) -> float:
        """Optimizer steps over steps per epoch (fractional when the budget ended an epoch)."""
        if not self.steps or not self.steps_per_epoch:
            return float(self.epochs)
        return self.steps[-1] / self.steps_per_epoch

    def time_to(self, target: float) -> tuple[float, int] | None:
        """(optimizer seconds, epoch) of the first evaluation at or below ``target``, or None."""
        return next(((s, i) for i, (s, loss) in enumerate(zip(self.seconds, self.losses))
                     if loss <= target), None)


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
          stop_at: float | None = None, seconds: float | None = None,
          **opt_kwargs: Any) -> tuple[nn.Module, Run]:
    """Train the digits MLP with optimizer ``name`` for ``epochs`` (shuffled minibatches from a
    generator seeded with ``seed``). ``stop_at`` ends training once the epoch's training loss
    is at or below it; ``seconds`` ends it at the first step that starts with that much
    optimizer time spent (then the last epoch is partial, and evaluated where it stopped);
    ``progress`` is called after each minibatch (e.g. a tqdm update)."""
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"seconds: expected a number or None, got {type(seconds).__name__}")
        if not 0 < seconds < float("inf"):
            raise ValueError(f"seconds: expected a finite number > 0, got {seconds!r}")
    device = data.x_train.device
    model = make_mlp(seed=seed).to(device, data.x_train.dtype) if model is None else model
    opt = make_optimizer(name, model, **opt_kwargs)
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    run = Run(name, steps_per_epoch=-(-n // batch_size))
    loss, acc = evaluate(model, data)
    run.losses.append(loss)
    run.accuracies.append(acc)
    run.seconds.append(0.0)
    run.steps.append(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    elapsed, steps, out_of_time = 0.0, 0, False
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            if seconds is not None:
                sync()
                if elapsed + time.perf_counter() - t0 >= seconds:
                    out_of_time = True
                    break
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
            steps += 1
            if progress is not None:
                progress()
        sync()
        elapsed += time.perf_counter() - t0
        if steps > run.steps[-1]:
            loss, acc = evaluate(model, data)
            run.losses.append(loss)
            run.accuracies.append(acc)
            run.seconds.append(elapsed)
            run.steps.append(steps)
        if out_of_time or (stop_at is not None and loss <= stop_at):
            break
    return model, run


def plot(runs: Sequence[Run], path: str, timed: Sequence[Run] | None = None,
         budget: float | None = None) -> None:
    """Training loss (log scale) of ``runs`` against epochs and of ``timed`` (default:
    ``runs``) against optimizer seconds, with the equal-time ``budget`` marked; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = runs if timed is None else timed
    names = list(dict.fromkeys(r.name for r in [*runs, *timed]))
    color = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per name
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        ax1.semilogy(range(len(run.losses)), run.losses, marker="o", ms=3, label=run.name,
                     color=color[run.name])
    for run in timed:
        ax2.semilogy(run.seconds, run.losses, marker="o", ms=2, label=run.name,
                     color=color[run.name])
    if budget is not None:
        ax2.axvline(budget, color="grey", lw=0.8, ls="--", label=f"NGD's time ({budget:.2f} s)")
    ax1.set_xlabel("epoch (equal epochs)")
    ax2.set_xlabel("optimizer wall-clock [s] (equal time)")
    for ax in (ax1, ax2):
        ax.axhline(TARGET, color="grey", lw=0.6, ls=":")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("digits, MLP 64-128-128-10 tanh, batch 256")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: Sequence[Run], target: float = TARGET) -> str:
    """One row per run: its budget, epochs, steps, final training loss, test accuracy,
    optimizer seconds, and the seconds (epoch) at which it first reached ``target``."""
    to = f"to {target:g}"
    head = (f"{'optimizer':<15}{'budget':>11}{'epochs':>8}{'steps':>7}{'train loss':>12}"
            f"{'test acc':>10}{'seconds':>9}{to:>16}")
    rows = [head, "-" * len(head)]
    for r in runs:
        hit = r.time_to(target)
        reached = f"{hit[0]:.3f} s ({hit[1]})" if hit else "not reached"
        steps = r.steps[-1] if r.steps else 0
        rows.append(f"{r.name:<15}{r.budget:>11}{r.epochs_trained:>8.1f}{steps:>7}"
                    f"{r.losses[-1]:>12.3e}{100 * r.accuracies[-1]:>9.1f}%"
                    f"{r.seconds[-1]:>9.3f}{reached:>16}")
    return "\n".join(rows)


def _warm_up(data: Data) -> None:
    """One untimed epoch per optimizer on a throwaway model, so the process's one-time costs
    (lazy initialisation, first calls) land on none of the timed runs."""
    for name in ("ngd", "adam", "sgd"):
        train(name, data, epochs=1)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    """Run the demo; returns the equal-epoch runs (NGD, Adam at its best lr, SGD), then the
    equal-time runs (Adam at every lr of :data:`ADAM_LRS`, SGD) given NGD's optimizer time."""
    parser = argparse.ArgumentParser(prog="ngtriton-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10,
                        help="NGD's epochs; its time is everyone's budget (10)")
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
    many = 10**9  # epochs of a time-budgeted run: the budget ends it
    with tqdm(total=4 + len(ADAM_LRS), disable=args.no_progress, unit="run") as bar:
        bar.set_description("warm-up")
        _warm_up(data)

        def go(name: str, label: str, epochs: int, seconds: float | None = None,
               **kwargs: Any) -> Run:
            bar.set_description(label)
            run = train(name, data, epochs=epochs, seconds=seconds, **kwargs)[1]
            run.name = label
            run.budget = f"{args.epochs} epochs" if seconds is None else f"{seconds:.2f} s"
            bar.update()
            return run

        ngd = go("ngd", "NGD", args.epochs)
        budget = ngd.seconds[-1]
        adams = [go("adam", f"Adam lr {lr:g}", many, budget, lr=lr) for lr in ADAM_LRS]
        best = min(range(len(ADAM_LRS)), key=lambda i: adams[i].losses[-1])
        sgd_timed = go("sgd", "SGD", many, budget)
        adam = go("adam", f"Adam lr {ADAM_LRS[best]:g}", args.epochs, lr=ADAM_LRS[best])
        sgd = go("sgd", "SGD", args.epochs)
    print(f"\ndigits ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test), "
          f"MLP 64-128-128-10 tanh, batch 256, device {device}")
    print(f"\nEqual epochs ({args.epochs}); Adam at its best lr, {ADAM_LRS[best]:g}, of "
          f"{', '.join(f'{lr:g}' for lr in ADAM_LRS)} (by training loss at NGD's time):")
    print(table([ngd, adam, sgd]))
    print(f"\nEqual wall-clock: everyone gets NGD's optimizer time, {budget:.3f} s "
          f"(epoch counts differ; the last epoch of a timed run may be partial):")
    print(table([ngd, *adams, sgd_timed]))
    plot([ngd, adam, sgd], args.out, timed=[ngd, *adams, sgd_timed], budget=budget)
    print(f"plot saved to {args.out}")
    return [ngd, adam, sgd, *adams, sgd_timed]


if __name__ == "__main__":
    main()
