"""NGD inside PyTorch Lightning (examples/lightning_ngd.py at a small size): trained by
``Trainer`` on the CPU, its diagnostics logged, checkpointed and resumed with its state, and
(two processes) under ``strategy="ddp"``. Skipped without the ``lightning`` extra."""

from __future__ import annotations

import csv
import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_ngd.py"


def _example():
    spec = importlib.util.spec_from_file_location("example_lightning_ngd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_logs_checkpoints_and_resumes(tmp_path):
    ex = _example()
    trainer = ex.train(str(tmp_path), epochs=1, batch_size=128)  # 512 rows: 4 steps an epoch
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == "NGD" and opt.steps == 4
    first_loss = opt.history[0]["loss"]
    assert opt.last_stats.loss < first_loss
    # the diagnostics reached the logger through self.log
    with open(glob.glob(str(tmp_path / "ngd" / "version_0" / "metrics.csv"))[0]) as f:
        rows = list(csv.DictReader(f))
    assert {"ngd/damping", "ngd/rho", "ngd/iterations", "ngd/loss"} <= set(rows[0])
    assert len([r for r in rows if r["ngd/damping"]]) == 4
    # the checkpoint holds NGD's own state
    (ckpt,) = glob.glob(str(tmp_path / "ngd" / "version_0" / "checkpoints" / "*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert saved["ngd"]["steps"] == 4
    assert saved["ngd"]["damping"] == opt.damping
    assert any("warm_start" in s for s in saved["state"].values())
    # resumed, it goes on from there: 4 more steps, not 4 from scratch
    trainer = ex.train(str(tmp_path), epochs=2, batch_size=128, resume=ckpt)
    opt = trainer.optimizers[0]
    assert opt.steps == 8
    assert len(opt.history) == 8  # the history came back with the state


def test_ddp_two_processes(tmp_path):
    """``strategy="ddp"``: Lightning relaunches the script once more per rank (gloo, CPU)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MASTER_PORT=str(32000 + os.getpid() % 1000))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--root", str(tmp_path), "--epochs", "1",
         "--devices", "2", "--strategy", "ddp"],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 512 rows, batch 64, 2 ranks: 4 steps; the product all-reduces happened
    assert "steps 4," in proc.stdout, proc.stdout
    assert "collectives" in proc.stdout and "products" in proc.stdout, proc.stdout
