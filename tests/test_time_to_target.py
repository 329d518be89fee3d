"""The time-to-target benchmark (benchmarks/time_to_target): its one command runs end to end at
CI size, and its bookkeeping (time to a target, loss at a time, medians over seeds, the batch
stream, the evaluation schedule, the command line) is right on hand-made cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a namespace package at the repository root
    sys.path.insert(0, str(ROOT))

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks.time_to_target import report  # noqa: E402
from benchmarks.time_to_target.contenders import (  # noqa: E402
    NGD_CONFIGS,
    heavyball_module,
    parse_ngd_config,
)
from benchmarks.time_to_target.problems import make_problem  # noqa: E402
from benchmarks.time_to_target.runner import _Schedule  # noqa: E402

CURVE = [[0.0, 0, 2.0], [0.1, 5, 0.5], [0.2, 10, 0.04], [0.3, 15, 5e-4], [0.41, 20, 4e-4]]


def test_quick_run_writes_every_curve(tmp_path):
    """``python -m benchmarks.time_to_target --quick``: JSON, markdown and one PNG per problem;
    every contender has a finite curve on every problem; AdamW's loss went down; a
    ``--ngd-config`` overrides the configuration of that name."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "benchmarks.time_to_target", "--quick", "--out", str(tmp_path),
           "--threads", "1", "--ngd-config", 'NGD momentum auto={"momentum": "auto", '
           '"maxiter": 5}']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("ttt-*-quick.json")
    results = json.loads(path.read_text())
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["cpu"]
    assert set(results["problems"]) == {"digits", "autoencoder", "chargpt"}
    assert results["ngd_configs"]["NGD momentum auto"] == {"momentum": "auto", "maxiter": 5}
    md = path.with_suffix(".md").read_text()
    families = {"adamw", "ngd"} | ({"muon", "soap"} if heavyball_module() else set())
    for name, problem in results["problems"].items():
        assert f"## {name}" in md
        png = tmp_path / f"{path.stem}-{name}.png"
        assert png.exists() and png.stat().st_size > 1000
        contenders = problem["contenders"]
        assert {c["family"] for c in contenders.values()} == families
        assert {n for n, c in contenders.items() if c["family"] == "ngd"} == set(NGD_CONFIGS)
        for cname, entry in contenders.items():
            assert cname in md
            for run in entry["runs"]:
                assert not run["status"].startswith("error"), (name, cname, run["status"])
                assert run["steps"] >= 1 and len(run["curve"]) >= 2
                assert all(math.isfinite(v) for point in run["curve"] for v in point)
                assert [p[1] for p in run["curve"]] == sorted(p[1] for p in run["curve"])
        assert contenders["NGD momentum auto"]["kwargs"]["maxiter"] == 5
        for entry in contenders.values():
            if entry["family"] == "adamw":
                for run in entry["runs"]:
                    assert run["curve"][-1][2] < run["curve"][0][2], name


def test_time_to_and_loss_at_on_a_known_curve():
    assert report.time_to(CURVE, 0.05) == (0.2, 10)
    assert report.time_to(CURVE, 5e-4) == (0.3, 15)
    assert report.time_to(CURVE, 1e-4) is None
    run = {"curve": CURVE, "seconds": 0.41, "status": "budget", "steps": 20}
    assert report.loss_at(run, 0.25) == 0.04
    assert report.loss_at(run, 0.3) == 5e-4
    assert report.loss_at(run, 1.0) is None  # the budget ended first: unknown, not a number
    assert report.loss_at({**run, "status": "diverged"}, 1.0) == math.inf


def test_summary_medians_over_seeds_and_ratio_to_the_fastest():
    """Three seeds, one of which misses the target: the median counts the miss as infinite, the
    table says 2/3 and the ratio is taken to the fastest median."""
    def run(curve):
        return {"curve": curve, "seconds": curve[-1][0], "status": "budget",
                "steps": curve[-1][1]}
    slow = [run([[0, 0, 1.0], [t, 10, 0.01]]) for t in (1.0, 2.0)] + [run([[0, 0, 1.0],
                                                                          [5.0, 30, 0.5]])]
    fast = [run([[0, 0, 1.0], [t, 3, 0.01]]) for t in (0.4, 0.5, 0.6)]
    problem = {"targets": [0.1], "checkpoints_s": [], "steps_per_epoch": None,
               "contenders": {"slow": {"family": "adamw", "runs": slow},
                              "fast": {"family": "ngd", "runs": fast}}}
    rows = {r["name"]: r for r in report.summarise(problem)}
    assert rows["slow"]["t0.1"] == 2.0 and rows["slow"]["n0.1"] == 2
    assert rows["fast"]["t0.1"] == 0.5 and rows["fast"]["s0.1"] == 3
    table = report.problem_table(problem)
    slow_line = next(ln for ln in table.splitlines() if ln.startswith("| slow"))
    assert "2 (2/3)" in slow_line and "| 4.00 |" in slow_line
    assert "**0.5**" in table


def test_schedule_evaluates_before_crossing_a_checkpoint():
    """Dense at first, then geometric in steps; and just before a step that would cross a mark
    of the time grid or a checkpoint."""
    prob = make_problem("digits", True, torch.device("cpu"), 1.0)
    prob.eval_dense_steps, prob.eval_growth, prob.eval_interval_s = 3, 2.0, 10.0
    prob.checkpoints_s = (2.5,)
    s = _Schedule(prob)
    assert s.due(0, 0.0, 0.0)
    s.done(0, 0.0, 0.0)
    assert s.due(1, 0.01, 0.01)  # dense
    s.done(3, 0.03, 0.01)
    assert not s.due(5, 0.05, 0.01) and s.due(6, 0.06, 0.01)  # 3 · 2
    s.done(6, 0.06, 0.01)
    assert not s.due(7, 2.3, 0.1) and s.due(7, 2.45, 0.1)  # the next step would pass 2.5 s
    s.done(7, 2.45, 0.1)
    assert not s.due(8, 2.6, 0.1)


@pytest.mark.parametrize("name", ["digits", "autoencoder", "chargpt"])
def test_every_contender_sees_the_same_batches(name):
    """The batch stream depends on the seed only: two streams of one seed agree, another seed's
    differs."""
    prob = make_problem(name, True, torch.device("cpu"), 1.0)
    a, b, c = prob.batches(0), prob.batches(0), prob.batches(1)
    for _ in range(8):  # more than an epoch of digits
        xa, xb, xc = next(a), next(b), next(c)
        xa, xb, xc = (x if isinstance(x, tuple) else (x,) for x in (xa, xb, xc))
        assert all(torch.equal(u, v) for u, v in zip(xa, xb))
    assert not all(torch.equal(u, v) for u, v in zip(xa, xc))


def test_autoencoder_loss_is_bce_summed_over_pixels():
    """Nats per image: the sum over the 64 pixels of the per-pixel BCE, averaged over images."""
    from benchmarks.time_to_target.problems import bernoulli_loss

    torch.manual_seed(0)
    z, x = torch.randn(5, 64), torch.rand(5, 64)
    p = torch.sigmoid(z)
    ref = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1).mean()
    torch.testing.assert_close(bernoulli_loss(z, x), ref)


def test_ngd_config_parsing():
    assert parse_ngd_config('NGD x={"maxiter": 3}') == ("NGD x", {"maxiter": 3})
    for bad in ("no-equals", '={"a": 1}', "x={not json", "x=[1, 2]"):
        with pytest.raises(ValueError, match=r"^--ngd-config"):
            parse_ngd_config(bad)


def test_command_line_rejects_bad_arguments(capsys):
    from benchmarks.time_to_target.__main__ import main

    for argv, name in ((["--ngd-config", "bad"], "--ngd-config"), (["--seeds", "0"], "--seeds"),
                       (["--problems", "mnist"], "--problems"),
                       (["--budget", "digits=-1"], "--budget")):
        with pytest.raises(SystemExit):
            main(argv)
        assert name in capsys.readouterr().err


def test_results_json_round_trips_with_compact_curves():
    """Curves are written one point a line; nothing else changes (strings with brackets and
    doubled spaces included)."""
    data = {"curve": [[0.0, 0, 2.5], [0.1, 3, float("inf")]], "s": ["a  [b, c]", "d"],
            "k": {"betas": [0.9, 0.99], "flag": [True, None]}, "empty": []}
    text = report._compact(json.dumps(data, indent=1))
    assert '[0.1, 3, Infinity]' in text
    assert json.loads(text) == data


def test_run_counts_warnings_and_stops_at_the_step_cap():
    """A run records (not prints) its warnings by category, and a step cap ends it with a final
    evaluation at the last step."""
    import warnings

    from benchmarks.time_to_target.contenders import Contender
    from benchmarks.time_to_target.runner import run_one

    class NoisySGD(torch.optim.SGD):
        def step(self, closure=None):
            warnings.warn("noisy", RuntimeWarning, stacklevel=2)
            return super().step(closure)

    prob = make_problem("digits", True, torch.device("cpu"), 1.0)
    prob.max_steps, prob.budget_s, prob.eval_dense_steps, prob.eval_growth = 5, 1e9, 2, 10.0
    prob.eval_interval_s = 1e9
    noisy = Contender("noisy", "sgd", {}, lambda m, p, s: NoisySGD(m.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none may escape the run
        run = run_one(prob, noisy, 0, torch.device("cpu"))
    assert run["status"] == "max_steps" and run["steps"] == 5
    assert run["warnings"] == {"RuntimeWarning": 5} and run["first_warning"] == "noisy"
    assert [p[1] for p in run["curve"]] == [0, 1, 2, 5]
