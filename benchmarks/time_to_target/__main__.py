"""``python -m benchmarks.time_to_target``: run every contender on every problem, write
``<out>/ttt-<machine>-<date>.{json,md}`` and one PNG per problem (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import report, runner
from .contenders import FAMILIES, NGD_CONFIGS, contenders, heavyball_module, parse_ngd_config
from .problems import PROBLEMS, make_problem
from .runner import machine, run_one, warm_up

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results"


def _csv(kind: str, allowed: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected some of {list(allowed)}, got {text!r}")
        return items
    parse.__name__ = kind
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_target",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=_csv("problems", PROBLEMS), default=PROBLEMS,
                   help="comma-separated subset of digits,autoencoder,chargpt (all)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per problem (default: 3 for digits and autoencoder, 1 for chargpt)")
    p.add_argument("--seconds", type=float, default=None,
                   help="optimizer seconds per chargpt run (120; --quick: 1)")
    p.add_argument("--budget", action="append", default=[], metavar="PROBLEM=SECONDS",
                   help="override another problem's budget (digits 3, autoencoder 15)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets, 1 seed (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--ngd-config", action="append", default=[], metavar="NAME=JSON",
                   help="add or override one NGD configuration, e.g. "
                        "'NGD lsmr={\"method\": \"lsmr\"}' (repeatable)")
    p.add_argument("--families", type=_csv("families", FAMILIES), default=FAMILIES,
                   help="comma-separated subset of adamw,ngd,muon,soap (all)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per contender on a throwaway model first (1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="optimizer time: wall seconds (default), or the process's CPU seconds "
                        "at one torch thread (robust to other load on the machine; implies "
                        "--threads 1; CPU devices only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the path of the JSON it wrote."""
    p = parser()
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds: expected an integer ≥ 1, got {args.seeds}")
    if args.warmup < 0:
        p.error(f"--warmup: expected an integer ≥ 0, got {args.warmup}")
    if args.clock == "cpu":
        if args.threads not in (None, 1) or args.device != "cpu":
            p.error("--clock: cpu needs --threads 1 and --device cpu")
        args.threads = 1
    runner.use_clock(args.clock)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads: expected an integer ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 120.0)
    if not seconds > 0:
        p.error(f"--seconds: expected a positive number, got {seconds}")
    budgets: dict[str, float] = {}
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            budgets[name] = float(value)
        except ValueError:
            p.error(f"--budget: expected PROBLEM=SECONDS, got {item!r}")
        if name not in PROBLEMS or not budgets[name] > 0:
            p.error(f"--budget: expected one of {list(PROBLEMS)} and seconds > 0, got {item!r}")
    if "chargpt" in budgets:  # the same as --seconds
        seconds = budgets.pop("chargpt")
    configs = dict(NGD_CONFIGS)
    for item in args.ngd_config:
        try:
            name, kwargs = parse_ngd_config(item)
        except ValueError as err:
            p.error(str(err))
        configs[name] = kwargs
    device = torch.device(args.device)
    if heavyball_module() is None:
        print("heavyball is not installed: MuonAdamW and SOAP are left out "
              "(pip install 'ngtriton[bench]')", file=sys.stderr)

    info = machine(device)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"ttt-{info['machine']}-{date}{'-quick' if args.quick else ''}.json"
    argv_list = list(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {
        "machine": info, "quick": args.quick, "warmup_steps": args.warmup,
        "ngd_configs": configs, "problems": {},
        "command": shlex.join(["python", "-m", "benchmarks.time_to_target", *argv_list])}
    for pname in args.problems:
        problem = make_problem(pname, args.quick, device, seconds)
        problem.budget_s = budgets.get(pname, problem.budget_s)
        seeds = list(range(args.seeds if args.seeds is not None else problem.seeds))
        entry: dict[str, Any] = {
            "description": problem.description, "likelihood": problem.likelihood,
            "targets": list(problem.targets), "budget_s": problem.budget_s,
            "max_steps": problem.max_steps, "seeds": seeds,
            "steps_per_epoch": problem.steps_per_epoch,
            "checkpoints_s": list(problem.checkpoints_s), "meta": problem.meta,
            "contenders": {}}
        results["problems"][pname] = entry
        for c in contenders(problem, configs, args.families):
            warm = warm_up(problem, c, device, args.warmup) if args.warmup else 0.0
            runs = []
            for seed in seeds:
                t0 = time.perf_counter()
                run = run_one(problem, c, seed, device)
                runs.append(run)
                print(f"{pname:<12}{c.name:<28} seed {seed}  {run['steps']:>6} steps "
                      f"{run['seconds']:7.2f} s  loss {run['curve'][-1][2]:.4g}  "
                      f"[{run['status']}]  ({time.perf_counter() - t0:.0f} s wall)", flush=True)
            entry["contenders"][c.name] = {"family": c.family, "kwargs": c.kwargs,
                                           "warmup_s": warm, "runs": runs, **c.meta}
        md, _ = report.write(results, json_path)  # after every problem: partial runs survive
    print(f"wrote {json_path} and {md}")
    return json_path


if __name__ == "__main__":
    main()
