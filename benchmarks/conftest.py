"""Benchmark-wide setup: ratios to each group's baseline, printed and stored in the JSON.

A benchmark marks itself as its group's baseline with ``benchmark.extra_info["baseline"] = True``
(a training step, usually). Every other benchmark in the group gets ``ratio`` = its median over
the baseline's median, measured in the same run.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _ratios(benchmarks) -> dict[str, dict[str, float]]:
    groups: dict[str, list] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    table: dict[str, dict[str, float]] = {}
    for group, items in groups.items():
        base = [b for b in items if b.extra_info.get("baseline")]
        if not base:
            continue
        ref = base[0].stats.median
        table[group] = {b.name: b.stats.median / ref for b in items}
    return table


def pytest_benchmark_update_json(config, benchmarks, output_json):
    table = _ratios(benchmarks)
    for bench in output_json["benchmarks"]:
        ratio = table.get(bench["group"] or "", {}).get(bench["name"])
        if ratio is not None:
            bench["extra_info"]["ratio_to_baseline"] = ratio


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    table = _ratios(session.benchmarks)
    if not table:
        return
    terminalreporter.section("ratios to each group's baseline (median / median, same run)")
    for group, rows in table.items():
        terminalreporter.write_line(f"[{group}]")
        for name, ratio in sorted(rows.items(), key=lambda kv: kv[1]):
            terminalreporter.write_line(f"  {ratio:7.2f}x  {name}")
