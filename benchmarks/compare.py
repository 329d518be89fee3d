"""Compare two benchmark results files of the same device by their ratios.

    python benchmarks/compare.py benchmarks/results/h100-2026-12-01.json \\
        benchmarks/results/h100-2026-12-07.json [--threshold 0.1] [--fail-on-regression]

Both files are ``<device>-<date>.json`` as written by ``benchmarks/run.py`` or
``benchmarks/gpu_check.py`` (pytest-benchmark's layout: ``benchmarks.benchmarks[*]`` with
``group``, ``name``, ``stats.median`` and ``extra_info``). Each benchmark is compared by its
ratio to its group's baseline, measured in the same run (``extra_info.ratio_to_baseline``, else
its median over the median of the group's member marked ``extra_info.baseline``), so that a
slower or busier machine on one day does not read as a regression. A change counts when the
ratio moved by more than ``--threshold`` (relative) *and* by more than three times the noise of
the two runs: the spread of the ratio within each run (``extra_info.ratio_iqr``, the
interquartile range of the per-round ratios of round-robin timing; else the relative IQRs of the
benchmark and of its baseline), as a standard deviation (IQR / 1.349), combined over the runs.

Absolute times are printed only beside the device they were measured on. Files of different
devices are refused (``--any-device`` overrides). Exit status: 0, or 1 with
``--fail-on-regression`` when anything regressed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

IQR_TO_SIGMA = 1.349


@dataclass
class Entry:
    group: str
    name: str
    median: float
    ratio: float | None  # to the group's baseline, same run
    spread: float  # relative standard deviation of the ratio within the run
    baseline: bool


def device_of(report: dict, path: Path) -> str:
    """The device tag of a results file: its ``device_tag``, else its name's prefix."""
    tag = report.get("device_tag")
    if tag:
        return str(tag)
    stem = path.stem
    parts = stem.split("-")
    return "-".join(parts[:-3]) if len(parts) > 3 else stem


def _rel_iqr(stats: dict) -> float:
    med = stats.get("median") or 0.0
    iqr = stats.get("iqr") or 0.0
    return iqr / med if med and math.isfinite(med) else 0.0


def entries(report: dict) -> dict[tuple[str, str], Entry]:
    """Every benchmark of a report by (group, name), with its ratio to its group's baseline."""
    benches = report.get("benchmarks", {})
    if isinstance(benches, dict):
        benches = benches.get("benchmarks", [])
    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    out: dict[tuple[str, str], Entry] = {}
    for group, items in groups.items():
        base = next((b for b in items if b.get("extra_info", {}).get("baseline")), None)
        for b in items:
            info = b.get("extra_info", {}) or {}
            stats = b.get("stats", {}) or {}
            median = float(stats.get("median", math.nan))
            ratio = info.get("ratio_to_baseline")
            if ratio is None and base is not None:
                bm = float(base.get("stats", {}).get("median", math.nan))
                ratio = median / bm if bm and math.isfinite(bm) else None
            if info.get("ratio_iqr") is not None and ratio:
                spread = float(info["ratio_iqr"]) / abs(ratio) / IQR_TO_SIGMA
            else:
                rel = [_rel_iqr(stats)] + ([_rel_iqr(base.get("stats", {}))] if base else [])
                spread = math.sqrt(sum(r * r for r in rel)) / IQR_TO_SIGMA
            if ratio is not None and not math.isfinite(float(ratio)):
                ratio = None
            out[(group, b.get("name", "?"))] = Entry(
                group, b.get("name", "?"), median, None if ratio is None else float(ratio),
                spread, bool(info.get("baseline")))
    return out


@dataclass
class Change:
    group: str
    name: str
    old: float
    new: float
    change: float  # new / old - 1 (ratios to the baseline; > 0: slower)
    noise: float  # relative noise of the comparison (one sigma)
    verdict: str  # "regressed", "improved", "unchanged"


def compare(old: dict, new: dict, threshold: float = 0.10, sigmas: float = 3.0
            ) -> tuple[list[Change], list[tuple[str, str]], list[tuple[str, str]]]:
    """Changes of every benchmark present in both (baselines, and those without a ratio,
    excluded), plus the keys only in ``old`` and only in ``new``."""
    a, b = entries(old), entries(new)
    changes = []
    for key in sorted(a.keys() & b.keys()):
        ea, eb = a[key], b[key]
        if ea.baseline or eb.baseline or not ea.ratio or not eb.ratio:
            continue
        rel = eb.ratio / ea.ratio - 1.0
        noise = math.sqrt(ea.spread ** 2 + eb.spread ** 2)
        moved = abs(math.log(eb.ratio / ea.ratio))
        if moved > math.log1p(threshold) and moved > sigmas * noise:
            verdict = "regressed" if rel > 0 else "improved"
        else:
            verdict = "unchanged"
        changes.append(Change(key[0], key[1], ea.ratio, eb.ratio, rel, noise, verdict))
    only_old = sorted(a.keys() - b.keys())
    only_new = sorted(b.keys() - a.keys())
    return changes, only_old, only_new


def format_report(changes: list[Change], only_old, only_new, old_name: str, new_name: str,
                  device: str, show_all: bool = False) -> str:
    lines = [f"device {device}: {old_name} -> {new_name} (ratios to each group's baseline, "
             "same run; > 1 is slower than the baseline)"]
    for verdict in ("regressed", "improved"):
        rows = [c for c in changes if c.verdict == verdict]
        lines.append(f"\n{verdict} ({len(rows)}):")
        for c in sorted(rows, key=lambda c: -abs(c.change)):
            lines.append(f"  {c.group} / {c.name}: {c.old:.3f} -> {c.new:.3f} "
                         f"({100 * c.change:+.1f} %, noise ±{100 * c.noise:.1f} %)")
    same = [c for c in changes if c.verdict == "unchanged"]
    lines.append(f"\nwithin noise: {len(same)}")
    if show_all:
        for c in same:
            lines.append(f"  {c.group} / {c.name}: {c.old:.3f} -> {c.new:.3f} "
                         f"({100 * c.change:+.1f} %, noise ±{100 * c.noise:.1f} %)")
    if only_old:
        lines.append(f"only in {old_name}: " + ", ".join(f"{g}/{n}" for g, n in only_old))
    if only_new:
        lines.append(f"only in {new_name}: " + ", ".join(f"{g}/{n}" for g, n in only_new))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--threshold", type=float, default=0.10,
                   help="smallest relative change of a ratio that counts (default 0.10)")
    p.add_argument("--sigmas", type=float, default=3.0,
                   help="a change must also exceed this many sigmas of the runs' noise")
    p.add_argument("--all", action="store_true", help="list the unchanged ones too")
    p.add_argument("--any-device", action="store_true",
                   help="compare files of different devices (ratios only)")
    p.add_argument("--fail-on-regression", action="store_true")
    args = p.parse_args(argv)
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    dev_old, dev_new = device_of(old, args.old), device_of(new, args.new)
    if dev_old != dev_new and not args.any_device:
        print(f"different devices: {dev_old} ({args.old.name}) and {dev_new} ({args.new.name}); "
              "ratios of different devices are not comparable (--any-device to compare anyway)",
              file=sys.stderr)
        return 2
    changes, only_old, only_new = compare(old, new, args.threshold, args.sigmas)
    device = dev_new if dev_old == dev_new else f"{dev_old} vs {dev_new}"
    print(format_report(changes, only_old, only_new, args.old.name, args.new.name, device,
                        args.all))
    regressed = any(c.verdict == "regressed" for c in changes)
    return 1 if (regressed and args.fail_on_regression) else 0


if __name__ == "__main__":
    sys.exit(main())
