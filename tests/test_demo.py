"""The demo runs end to end at one epoch (table, PNG, every optimizer at equal epochs and at equal
wall-clock, Adam at its best lr of the grid), and train()'s time budget does what it says."""

from __future__ import annotations

import math

import pytest


def test_demo_main(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from ngtriton.demo import ADAM_LRS, main

    out = tmp_path / "demo.png"
    runs = main(["--epochs", "1", "--out", str(out), "--no-progress", "--device", "cpu"])
    ngd, adam, sgd, *timed = runs
    assert [r.name for r in timed] == [f"Adam lr {lr:g}" for lr in ADAM_LRS] + ["SGD"]
    assert ngd.name == "NGD" and sgd.name == "SGD"
    # equal epochs: one each
    assert all(r.epochs == 1 and len(r.seconds) == 2 and r.steps == [0, 6]
               for r in (ngd, adam, sgd))
    # Adam's equal-epoch run uses the lr whose equal-time run ended lowest
    best = min(range(len(ADAM_LRS)), key=lambda i: timed[i].losses[-1])
    assert adam.name == f"Adam lr {ADAM_LRS[best]:g}"
    # equal wall-clock: every timed run spent at least NGD's optimizer time, and stopped at
    # the first step that began past it (so its last step began before the budget was spent)
    budget = ngd.seconds[-1]
    assert all(r.seconds[-1] >= budget and r.budget == f"{budget:.2f} s" for r in timed)
    assert all(math.isfinite(loss) for r in runs for loss in r.losses)
    assert out.exists() and out.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "Equal epochs" in text and "Equal wall-clock" in text
    assert "train loss" in text and "NGD" in text and "Adam lr" in text and "to 0.05" in text


def test_demo_rejects_bad_epochs():
    from ngtriton.demo import main

    with pytest.raises(SystemExit):
        main(["--epochs", "0", "--no-progress"])


def test_train_time_budget_and_epoch_bookkeeping():
    """Without ``seconds`` train() is as before (one evaluation per epoch, 6 steps each); with
    it, training ends once the budget is spent, however many epochs were allowed."""
    pytest.importorskip("sklearn")
    from ngtriton.demo import load_digits_data, train

    data = load_digits_data()
    _, run = train("adam", data, epochs=2)
    assert run.epochs == 2 and run.steps == [0, 6, 12] and run.epochs_trained == 2.0
    _, run = train("sgd", data, epochs=10**9, seconds=0.05)
    assert run.seconds[-1] >= 0.05 and run.steps[-1] >= 1
    assert run.steps == sorted(run.steps) and len(run.steps) == len(run.losses)
    assert run.epochs_trained == run.steps[-1] / 6
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^seconds"):
            train("sgd", data, epochs=1, seconds=bad)
    for bad in (True, "1"):
        with pytest.raises(TypeError, match=r"^seconds"):
            train("sgd", data, epochs=1, seconds=bad)


def test_run_time_to_target():
    from ngtriton.demo import Run

    run = Run("x", losses=[2.0, 0.5, 0.04, 0.01], seconds=[0.0, 0.1, 0.2, 0.3])
    assert run.time_to(0.05) == (0.2, 2)
    assert run.time_to(0.01) == (0.3, 3)
    assert run.time_to(1e-3) is None
