"""benchmarks/gpu_check.py --dry-run: the GPU check's script runs end to end on the CPU (tiny
shapes, Triton's interpreter) and writes its results files, so it cannot rot before a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (js,) = tmp_path.glob("cpu-*.json")
    assert js.with_suffix(".md").exists()
    report = json.loads(js.read_text())
    assert [s["name"] for s in report["steps"]] == ["tests", "kernels", "models", "launches",
                                                    "optim"]
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["tests"]["returncode"] == 0
    benches = report["benchmarks"]["benchmarks"]
    groups = {b["group"] for b in benches}
    for prefix in ("gemm-", "linear-jvp-", "linear-vjp-", "layernorm-", "output-fisher-",
                   "krylov-", "mlp-", "gpt-", "optim-"):
        assert any(g.startswith(prefix) for g in groups), (prefix, sorted(groups))
    # each timed group has one baseline, and every member a ratio to it
    for g in groups:
        members = [b for b in benches if b["group"] == g]
        if g.endswith("-first-call"):
            continue
        assert sum(bool(b["extra_info"].get("baseline")) for b in members) == 1, g
        assert all("ratio_to_baseline" in b["extra_info"] for b in members), g
    # the interpreter's Triton backend ran the MLP product, and the product is a ratio
    mlp = [b for b in benches if b["group"].startswith("mlp-") and b["name"] == "product_triton"]
    assert mlp and mlp[0]["extra_info"]["ratio_to_baseline"] > 0
    # the launch counts of the MLP's product, Triton's launches among them
    rows = {(r["backend"], r["what"]): r for r in report["launches"]}
    assert rows[("triton", "product")]["triton_launches"] > 0
    assert rows[("torch", "product")]["aten_compute"] > 0
    assert "## launch counts" in js.with_suffix(".md").read_text()
