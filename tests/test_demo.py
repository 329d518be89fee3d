"""The demo runs end to end at one epoch: table, PNG, all three optimizers."""

from __future__ import annotations

import pytest


def test_demo_main(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from ngtriton.demo import main

    out = tmp_path / "demo.png"
    runs = main(["--epochs", "1", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert [r.name for r in runs] == ["NGD", "Adam", "SGD"]
    assert all(r.epochs == 1 and len(r.seconds) == 2 for r in runs)
    assert out.exists() and out.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "train loss" in text and "NGD" in text and "Adam" in text


def test_demo_rejects_bad_epochs():
    from ngtriton.demo import main

    with pytest.raises(SystemExit):
        main(["--epochs", "0", "--no-progress"])
