"""NGD inside PyTorch Lightning: ``configure_optimizers`` returns ``ngtriton.NGD(self)``.

Lightning's automatic optimisation calls ``optimizer.step(closure=...)`` with a closure that runs
``training_step``, zeroes the gradients and calls ``backward``: exactly what NGD needs (it calls
the closure once more at the trial point, as LBFGS may). NGD's per-step diagnostics are logged
with ``self.log``; checkpoints carry NGD's state (damping, counters, warm start) and resume.

    python examples/lightning_ngd.py                                # one process, CPU
    python examples/lightning_ngd.py --devices 2 --strategy ddp     # two processes, gloo

Needs ``pip install 'ngtriton[lightning]'``.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ngtriton

# NGD's statistics logged at every step (see ngtriton.NGDStats).
LOGGED = ("loss", "trial_loss", "damping", "rho", "iterations", "step_norm", "alpha",
          "momentum")


class NGDClassifier(L.LightningModule):
    """A small MLP classifier trained with NGD."""

    def __init__(self, features: int = 16, classes: int = 4, hidden: int = 32,
                 lr: float = 1.0, damping: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)  # NGD builds its Fisher at the inputs of self(x)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        opt = self.optimizers().optimizer  # Lightning wraps it in a LightningOptimizer
        stats = opt.last_stats
        if stats is None:
            return
        for key in LOGGED:
            value = float(getattr(stats, key))
            if value == value:  # NaN (e.g. no trial this step) is not logged
                self.log(f"ngd/{key}", value, on_step=True, prog_bar=key == "loss",
                         batch_size=len(batch[0]), sync_dist=False)
        self.log("ngd/accepted", float(stats.accepted), on_step=True, batch_size=len(batch[0]))

    def configure_optimizers(self) -> ngtriton.NGD:
        return ngtriton.NGD(self, lr=self.hparams.lr, damping=self.hparams.damping,
                            method="cg", maxiter=20, warm_start=True, momentum="auto")


def dataset(n: int = 512, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian blobs, one per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    return TensorDataset(x, y)


def train(root: str, epochs: int, devices: int = 1, strategy: str = "auto",
          resume: str | None = None, batch_size: int = 64) -> L.Trainer:
    torch.manual_seed(0)
    model = NGDClassifier()
    loader = DataLoader(dataset(), batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices,
                        strategy=strategy, default_root_dir=root, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(root, name="ngd"))
    trainer.fit(model, loader, ckpt_path=resume)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("runs", "lightning_ngd"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = train(args.root, args.epochs, args.devices, args.strategy, args.resume)
    if trainer.is_global_zero:
        opt = trainer.optimizers[0]
        print(f"steps {opt.steps}, damping {opt.damping:.3g}, last loss "
              f"{opt.last_stats.loss:.4f}, rejected {opt.rejected_total}, "
              f"checkpoint {trainer.checkpoint_callback.best_model_path or 'none'}")
        if opt.communication is not None:
            c = opt.communication
            print(f"last step's communication: {c.calls} collectives ({c.products} products), "
                  f"{c.bytes / 1e3:.1f} kB, {c.seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
