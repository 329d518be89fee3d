"""benchmarks/bench_launches.py in its CI size: the counts of one Fisher product and one CG
iteration on the tiny MLP, and the files it writes (issue 17)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_launches as L  # noqa: E402


@pytest.fixture(scope="module")
def records():
    return L.collect(dry=True, mlp_only=True)


def _rows(records):
    return {(r["backend"], r["what"]): r for r in records}


def test_product_counts(records):
    rows = _rows(records)
    torch_product = rows[("torch", "product")]
    assert torch_product["aten_compute"] > 0 and torch_product["triton_launches"] == 0
    assert torch_product["host_reads"] == 0  # a product never waits for the host
    if ("triton", "product") in rows:  # Triton importable (the interpreter off CUDA)
        triton_product = rows[("triton", "product")]
        assert triton_product["triton_launches"] >= 3  # at least one per Linear layer
        assert triton_product["host_reads"] == 0
        # the fused kernels replace most of the torch engine's ops
        assert triton_product["aten_compute"] < torch_product["aten_compute"]


def test_cg_iteration_counts(records):
    rows = _rows(records)
    for backend in {b for b, _ in rows}:
        host = rows[(backend, "cg iteration (cpu host loop, check_every=1)")]
        gpu1 = rows[(backend, "cg iteration (gpu loop, check_every=1)")]
        gpu4 = rows[(backend, "cg iteration (gpu loop, check_every=4)")]
        product = rows[(backend, "product")]
        assert host["host_reads"] == 2  # pᵀAp and rᵀr
        assert gpu1["host_reads"] == 1 and gpu4["host_reads"] == 0.25  # one per check
        # the iteration's product, plus its vector work (and the device-side bookkeeping)
        assert gpu1["aten_compute"] + gpu1["triton_launches"] > (
            product["aten_compute"] + product["triton_launches"])
        pcg_host = rows[(backend, "pcg iteration (cpu host loop, check_every=1)")]
        pcg_gpu = rows[(backend, "pcg iteration (gpu loop, check_every=4)")]
        assert pcg_host["host_reads"] == 4  # pᵀAp, rᵀr, φ and rᵀz
        assert pcg_gpu["host_reads"] == 0.25  # φ's history stays on the device
        if backend == "torch" and ("triton", "product") in rows:
            # Triton there: the GPU loop's vector work is the two fused Krylov kernels
            assert gpu1["triton_launches"] == gpu4["triton_launches"] == 2


def test_files(records, tmp_path):
    path = L.write(records, tmp_path)
    assert path.name.startswith("launches-cpu-") and path.suffix == ".json"
    report = json.loads(path.read_text())
    assert report["device_tag"] == "cpu" and report["records"] == json.loads(
        json.dumps(records))
    md = path.with_suffix(".md").read_text()
    assert "| mlp-" in md and "triton_launches" in md
