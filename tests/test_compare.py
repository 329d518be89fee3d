"""benchmarks/compare.py on synthetic results files: ratios to the baseline of the same run,
changes beyond the threshold and the runs' noise, and refusal to compare different devices."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ngt_compare", ROOT / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
sys.modules["ngt_compare"] = compare  # dataclasses look their module up
_spec.loader.exec_module(compare)


def _bench(group, name, median, baseline=False, ratio=None, ratio_iqr=None, iqr=0.0):
    info = {}
    if baseline:
        info["baseline"] = True
    if ratio is not None:
        info["ratio_to_baseline"] = ratio
    if ratio_iqr is not None:
        info["ratio_iqr"] = ratio_iqr
    return dict(group=group, name=name, stats=dict(median=median, iqr=iqr), extra_info=info)


def _report(benches, tag="h100"):
    return dict(machine=dict(device="NVIDIA H100 80GB HBM3"), device_tag=tag,
                benchmarks=dict(benchmarks=benches))


def _write(tmp_path, name, report):
    p = tmp_path / name
    p.write_text(json.dumps(report))
    return p


def test_machine_speed_cancels_in_the_ratios():
    """The new run is on a machine twice as slow overall: nothing changed relative to the
    baselines, so nothing is reported; a product that got 30 % slower relative to its baseline
    is, and one that got 30 % faster is an improvement."""
    old = _report([_bench("g", "train_step", 1.0, baseline=True),
                   _bench("g", "product", 1.2), _bench("g", "build", 0.5),
                   _bench("g", "solve", 10.0)])
    new = _report([_bench("g", "train_step", 2.0, baseline=True),
                   _bench("g", "product", 2.4 * 1.3), _bench("g", "build", 1.0 * 0.7),
                   _bench("g", "solve", 20.0 * 1.02)])
    changes, only_old, only_new = compare.compare(old, new, threshold=0.1)
    verdict = {c.name: c.verdict for c in changes}
    assert verdict == {"product": "regressed", "build": "improved", "solve": "unchanged"}
    product = next(c for c in changes if c.name == "product")
    assert product.change == pytest.approx(0.3)
    assert only_old == only_new == []


def test_noise_of_the_runs_raises_the_bar():
    """A 20 % move is noise when the per-round ratios of either run spread that much."""
    old = _report([_bench("g", "base", 1.0, baseline=True, ratio=1.0, ratio_iqr=0.0),
                   _bench("g", "quiet", 2.0, ratio=2.0, ratio_iqr=0.02),
                   _bench("g", "noisy", 2.0, ratio=2.0, ratio_iqr=0.8)])
    new = _report([_bench("g", "base", 1.0, baseline=True, ratio=1.0, ratio_iqr=0.0),
                   _bench("g", "quiet", 2.4, ratio=2.4, ratio_iqr=0.02),
                   _bench("g", "noisy", 2.4, ratio=2.4, ratio_iqr=0.8)])
    verdict = {c.name: c.verdict for c in compare.compare(old, new)[0]}
    assert verdict == {"quiet": "regressed", "noisy": "unchanged"}


def test_pytest_benchmark_iqr_is_the_noise_without_ratio_iqr():
    """run.py's files (pytest-benchmark stats, no per-round ratios): the relative IQRs of the
    benchmark and of its baseline stand for the noise."""
    old = _report([_bench("g", "base", 1.0, baseline=True, iqr=0.01),
                   _bench("g", "a", 1.0, iqr=0.5)])
    new = _report([_bench("g", "base", 1.0, baseline=True, iqr=0.01),
                   _bench("g", "a", 1.3, iqr=0.5)])
    (c,) = compare.compare(old, new)[0]
    assert c.verdict == "unchanged" and c.noise > 0.3


def test_cli_report_and_exit_status(tmp_path, capsys):
    old = _write(tmp_path, "h100-2026-12-01.json", _report(
        [_bench("g", "base", 1.0, baseline=True), _bench("g", "product", 1.0),
         _bench("g", "gone", 1.0)]))
    new = _write(tmp_path, "h100-2026-12-07.json", _report(
        [_bench("g", "base", 1.0, baseline=True), _bench("g", "product", 1.5),
         _bench("g", "added", 1.0)]))
    assert compare.main([str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "device h100" in out and "regressed (1)" in out and "g / product" in out
    assert "+50.0 %" in out and "only in h100-2026-12-01.json: g/gone" in out
    assert "g/added" in out
    assert compare.main([str(old), str(new), "--fail-on-regression"]) == 1
    assert compare.main([str(old), str(old), "--fail-on-regression"]) == 0


def test_different_devices_are_refused(tmp_path, capsys):
    a = _write(tmp_path, "h100-2026-12-01.json", _report([_bench("g", "b", 1.0, True)]))
    b = _write(tmp_path, "h200-2026-12-01.json",
               _report([_bench("g", "b", 1.0, True)], tag="h200"))
    assert compare.main([str(a), str(b)]) == 2
    assert "different devices" in capsys.readouterr().err
    assert compare.main([str(a), str(b), "--any-device"]) == 0


def test_device_from_the_file_name_when_not_recorded(tmp_path):
    rep = dict(benchmarks=dict(benchmarks=[]))
    assert compare.device_of(rep, Path("cpu-2026-11-23.json")) == "cpu"
    assert compare.device_of(rep, Path("rtx-4090-2026-11-23.json")) == "rtx-4090"


def test_existing_cpu_results_compare_with_themselves():
    """The committed run.py results parse, and a file compared with itself changes nothing."""
    files = sorted((ROOT / "benchmarks" / "results").glob("cpu-*.json"))
    if not files:
        pytest.skip("no committed results")
    rep = json.loads(files[0].read_text())
    changes, _, _ = compare.compare(rep, rep)
    assert changes and all(c.verdict == "unchanged" for c in changes)
