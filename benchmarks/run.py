"""Run the benchmark suites and write their results under ``benchmarks/results/``.

``python benchmarks/run.py`` (or ``bash benchmarks/run.sh``, which sets up the venv first) runs
every ``bench_*.py`` with pytest-benchmark, then writes ``<device>-<date>.json`` (the raw
pytest-benchmark JSON plus the machine's description) and ``<device>-<date>.md`` (one table per
group: median time and ratio to the group's baseline, all measured in the same run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, str]:
    """What the numbers were measured on: GPU, driver, CPU, library versions, date."""
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(torch.get_num_threads()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown"
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = f"CPU ({info['cpu_count']} threads)"
    return info


def device_tag(name: str | None = None) -> str:
    """Short name of the device the numbers were measured on, for file names: ``"h100"`` for
    ``torch.cuda.get_device_name()`` = ``"NVIDIA H100 80GB HBM3"`` (``"h200"``, ``"a100"``,
    ``"rtx4090"``, ...), ``"cpu"`` without CUDA; so that two cards never overwrite each other."""
    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name()
    vendor = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon"}
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in vendor]
    for w in words:  # the model: letters then digits (h100, a100, l40s, rtx4090, mi300x)
        if re.fullmatch(r"[a-z]+\d+[a-z]*", w):
            return w
    return "-".join(words) or "gpu"


def results_stem(tag: str | None = None, date: dt.date | None = None) -> str:
    """``<device>-<date>``, e.g. ``h100-2026-12-07``."""
    return f"{tag or device_tag()}-{(date or dt.date.today()).isoformat()}"


def render(report: dict) -> str:
    """A markdown page: the machine, then one table per benchmark group."""
    lines = ["# ngtriton benchmark results", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["machine"].items()]
    groups: dict[str, list[dict]] = {}
    for bench in report["benchmarks"]["benchmarks"]:
        groups.setdefault(bench["group"] or "(no group)", []).append(bench)
    for group, items in groups.items():
        lines += ["", f"## {group}", "", "| benchmark | median (ms) | × baseline | notes |",
                  "|---|---:|---:|---|"]
        items.sort(key=lambda b: b["stats"]["median"])
        for b in items:
            info = dict(b.get("extra_info", {}))
            ratio = info.pop("ratio_to_baseline", None)
            base = " (baseline)" if info.pop("baseline", False) else ""
            notes = ", ".join(f"{k}={v}" for k, v in info.items() if v is not None)
            ratio_s = f"{ratio:.2f}" if ratio is not None else ""
            lines.append(f"| {b['name']}{base} | {1e3 * b['stats']['median']:.3f} | "
                         f"{ratio_s} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", help="bench_*.py files (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args, extra = parser.parse_known_args(argv)
    suites = args.suites or sorted(str(p) for p in HERE.glob("bench_*.py"))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites,
               f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds", *extra]
        code = subprocess.call(cmd, cwd=HERE.parent)
        if not raw.exists():
            print("no benchmark results were written", file=sys.stderr)
            return code or 1
        report = {"machine": machine(), "benchmarks": json.loads(raw.read_text())}
    stem = results_stem()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(render(report))
    print(f"wrote {args.out / stem}.json and .md")
    return code


if __name__ == "__main__":
    sys.exit(main())
