"""Turn the results (the JSON :mod:`.runner` curves go into) into a markdown summary and one
PNG per problem. ``python -m benchmarks.time_to_target.report RESULTS.json`` redraws both."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

INF = math.inf


def time_to(curve: list[list[float]], target: float) -> tuple[float, int] | None:
    """(seconds, steps) of the first evaluation at or below ``target``; None if never."""
    for seconds, steps, loss in curve:
        if loss <= target:
            return seconds, int(steps)
    return None


def loss_at(run: dict[str, Any], t: float) -> float | None:
    """The loss of the last evaluation at or before ``t`` optimizer seconds; None when the run
    stopped earlier for its budget or step cap, inf when it diverged or failed before ``t``."""
    curve = run["curve"]
    if run["seconds"] < t:
        return None if run["status"] in ("budget", "max_steps") else INF
    before = [loss for seconds, _, loss in curve if seconds <= t]
    return before[-1] if before else None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else INF


def summarise(problem: dict[str, Any]) -> list[dict[str, Any]]:
    """Per contender: medians over seeds of the time (and steps) to each target, the loss at
    each checkpoint, the final loss and steps, and NGD's rejection rate."""
    rows = []
    for name, entry in problem["contenders"].items():
        runs = entry["runs"]
        row: dict[str, Any] = {"name": name, "family": entry["family"], "seeds": len(runs)}
        for target in problem["targets"]:
            hits = [time_to(r["curve"], target) for r in runs]
            row[f"t{target}"] = _median([h[0] if h else INF for h in hits])
            row[f"s{target}"] = _median([h[1] if h else INF for h in hits])
            row[f"n{target}"] = sum(h is not None for h in hits)
        for t in problem["checkpoints_s"]:
            vals = [loss_at(r, t) for r in runs]
            row[f"at{t}"] = None if any(v is None for v in vals) else _median(vals)
        row["final"] = _median([r["curve"][-1][2] for r in runs])
        row["steps"] = _median([r["steps"] for r in runs])
        row["status"] = sorted({r["status"] for r in runs})
        counts: dict[str, int] = {}
        for r in runs:
            for cat, n in r.get("warnings", {}).items():
                counts[cat] = counts.get(cat, 0) + n
        row["warnings"] = counts
        ngd = [r["ngd"] for r in runs if r.get("ngd")]
        if ngd and all("rejected_total" in s for s in ngd):
            row["rejected"] = _median([s["rejected_total"] / max(r["steps"], 1)
                                       for s, r in zip(ngd, runs)])
        if ngd and all("mean_iterations" in s for s in ngd):
            row["iterations"] = _median([s["mean_iterations"] for s in ngd])
        rows.append(row)
    return rows


def _fmt_s(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.3g}"


def _fmt_loss(x: float | None) -> str:
    if x is None:
        return ""
    return "diverged" if not math.isfinite(x) else f"{x:.3g}"


def problem_table(problem: dict[str, Any]) -> str:
    """The markdown table of one problem."""
    rows = summarise(problem)
    spe = problem.get("steps_per_epoch")
    head = ["contender"]
    head += [f"loss @ {t:g} s" for t in problem["checkpoints_s"]]
    for target in problem["targets"]:
        head += [f"→ {target:g}: s", "× best", "steps"] + (["epochs"] if spe else [])
    head += ["final loss", "steps", "notes"]
    best = {t: min((r[f"t{t}"] for r in rows), default=INF) for t in problem["targets"]}
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for r in rows:
        cells = [r["name"]]
        cells += [_fmt_loss(r[f"at{t}"]) for t in problem["checkpoints_s"]]
        for t in problem["targets"]:
            secs, n = r[f"t{t}"], r[f"n{t}"]
            text = _fmt_s(secs)
            if math.isfinite(secs) and secs == best[t]:
                text = f"**{text}**"
            if 0 < n < r["seeds"]:
                text += f" ({n}/{r['seeds']})"
            ratio = secs / best[t] if math.isfinite(secs) and best[t] > 0 else INF
            steps = r[f"s{t}"]
            cells += [text, "—" if not math.isfinite(ratio) else f"{ratio:.2f}",
                      f"{steps:.0f}" if math.isfinite(steps) else "—"]
            if spe:
                cells.append(_fmt_s(r[f"s{t}"] / spe))
        notes = [s for s in r["status"] if s != "budget"]
        if "rejected" in r:
            notes.append(f"{100 * r['rejected']:.0f} % rejected")
        if "iterations" in r:
            notes.append(f"{r['iterations']:.1f} iterations/step")
        notes += [f"{n} × {cat}" for cat, n in r["warnings"].items()]
        cells += [_fmt_loss(r["final"]), f"{r['steps']:.0f}", "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], pngs: dict[str, str]) -> str:
    """The whole summary: machine, method, one table (and plot) per problem."""
    m = results["machine"]
    out = [f"# Time to target ({m['machine']}, {m['date']})", "",
           f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}"
           + (f", GPU {m['gpu']}" if m.get("gpu") else "")
           + f"; Python {m['python']}, torch {m['torch']}, triton {m['triton']}, "
           f"heavyball {m['heavyball'] or 'not installed'}. Optimizer seconds: "
           f"{m.get('clock', 'wall')}.", "",
           f"Command: `{results['command']}`", "",
           "Optimizer seconds only (closure + step; batches and evaluation off the clock); the "
           "same batches for every contender of a seed. Each cell is the median over seeds "
           "(`(k/n)`: reached in k of n seeds; `—`: not reached within the budget); the time is "
           "that of the first evaluation at or below the target, so it is as fine as the "
           "evaluation schedule. `× best`: over the fastest median. `final loss`: at the end of "
           "the budget. `notes`: how runs ended if not at their budget, NGD's rejected "
           "steps and mean solver iterations, warnings raised (summed over seeds). Each "
           f"contender first took {results.get('warmup_steps', 0)} untimed step(s) on a "
           "throwaway model (one-time costs of the process). heavyball runs eagerly "
           "(`compile_mode = None`), every library with its defaults but the learning rate.",
           "",
           "NGD configurations (`ngtriton.NGD(model, likelihood=..., seed=seed, **kwargs)`):", ""]
    out += [f"- {name}: `{json.dumps(kw)}`" for name, kw in results["ngd_configs"].items()]
    for name, problem in results["problems"].items():
        out += ["", f"## {name}", "", problem["description"] + ".", "",
                f"Budget {problem['budget_s']:g} optimizer seconds per run, seeds "
                f"{problem['seeds']}; targets {', '.join(f'{t:g}' for t in problem['targets'])}.",
                "", problem_table(problem)]
        if name in pngs:
            out += ["", f"![{name}]({pngs[name]})"]
    return "\n".join(out) + "\n"


def plot(name: str, problem: dict[str, Any], path: Path) -> None:
    """Training loss against optimizer seconds (log y; linear and log time), a colour per
    contender, a line style per family, every seed (the first one labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ngd": "-", "adamw": "--", "muon": "-.", "soap": ":"}
    cmap = plt.get_cmap("tab20" if len(problem["contenders"]) > 10 else "tab10")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (label, entry) in enumerate(problem["contenders"].items()):
        for j, run in enumerate(entry["runs"]):
            pts = [(s, loss) for s, _, loss in run["curve"] if math.isfinite(loss) and loss > 0]
            if not pts:
                continue
            for ax, keep in zip(axes, (pts, [(s, loss) for s, loss in pts if s > 0])):
                if not keep:
                    continue
                xs, ys = zip(*keep)  # a log time axis drops the start (0 s)
                ax.plot(xs, ys, styles.get(entry["family"], "-"), color=cmap(i % cmap.N),
                        lw=1.8 if entry["family"] == "ngd" else 1.2,
                        alpha=1.0 if j == 0 else 0.35, label=label if j == 0 else None)
    for ax, xscale in zip(axes, ("linear", "log")):
        ax.set_yscale("log")
        ax.set_xscale(xscale)
        for t in problem["targets"]:
            ax.axhline(t, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"optimizer seconds ({xscale})")
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.25)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(problem["description"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# A flat list of numbers (or true/false/null/NaN/Infinity) that json.dumps spread over lines.
_FLAT_LIST = re.compile(r"\[\s+((?:-?[\w.+-]+,\s+)*-?[\w.+-]+)\s+\]")


def _compact(text: str) -> str:
    """Each curve point (and any other flat list of numbers) on one line."""
    return _FLAT_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def write(results: dict[str, Any], json_path: Path) -> tuple[Path, list[Path]]:
    """Write the JSON (as given), the PNGs and the markdown beside it; returns (md, pngs)."""
    json_path.write_text(_compact(json.dumps(results, indent=1)))
    stem = json_path.with_suffix("")
    pngs = {}
    for name, problem in results["problems"].items():
        png = stem.parent / f"{stem.name}-{name}.png"
        plot(name, problem, png)
        pngs[name] = png.name
    md = json_path.with_suffix(".md")
    md.write_text(markdown(results, pngs))
    return md, [stem.parent / p for p in pngs.values()]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.time_to_target.report RESULTS.json")
    src = Path(sys.argv[1])
    md_path, png_paths = write(json.loads(src.read_text()), src)
    print(md_path, *png_paths, sep="\n")
