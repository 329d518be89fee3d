"""benchmarks/bench_flops.py in its CI size (issue 18): the FLOP counts of one Fisher product of
a small GPT block, attributed to the Triton-eligible ops calls and the rest, are consistent."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_flops as B  # noqa: E402


@pytest.fixture(scope="module")
def result():
    res = B.measure("nano", quick=True)
    res["checks"] = B.checks(res)
    return res


def test_checks(result):
    assert all(result["checks"].values()), result["checks"]
    assert not result["fallbacks"]
    assert result["attention"] == [dict(causal=True, mask=False)]
    assert result["attention_vjp_via_ops"]  # ops.attention_vjp, not torch's SDPA backward
    # nothing went uncounted: every op is FlopCounterMode's, analytic, estimated or no-FLOP
    assert not result["ops_by_method"].get("unknown")
    assert "addmm_" in result["ops_by_method"]["analytic"]  # FlopCounterMode misses it


def test_linear_flops_analytic(result):
    d, T = result["d"], result["T"]
    linear = sum(r["mm"] for r in result["regions"]
                 if r.get("op") in ("linear_jvp", "linear_vjp"))
    # 4 Linear layers, Σ in·out = 12 d²; two matmuls each in the JVP and in the VJP
    assert linear == 4 * 2 * T * 12 * d * d


def test_attention_vjp_analytic(result):
    """The attention VJP is an ops call (the region the Triton kernels take), its matmuls
    FlopCounterMode's count of the reference, 5 products of 2·D per score; the Step itself
    runs nothing (no SDPA backward)."""
    d, T = result["d"], result["T"]
    (vjp,) = [r for r in result["regions"] if r.get("op") == "attention_vjp"]
    assert (vjp["step"], vjp["dir"]) == ("AttentionStep", "vjp")
    a = vjp["attn"]
    assert a["kind"] == "vjp" and a["need"] == [True, True, True]
    assert vjp["mm"] == vjp["mm_counter"] == a["expected_mm"] > 0
    # at this size one chunk of queries holds every key: the reference forms all T×T scores
    assert a["ref_pairs"] == a["B"] * a["H"] * T * T
    # torch's formula for its SDPA backward: 5 matmuls over the T×T scores, H·D = d
    assert a["torch_sdpa_bwd_dense"] == 5 * 2 * T * T * d == vjp["mm"]
    assert vjp["ew"] > 0
    mm_dense, _ = B.flops_of(vjp, "dense")
    mm_causal, _ = B.flops_of(vjp, "causal")
    assert mm_dense == a["torch_sdpa_bwd_dense"]
    assert mm_causal == pytest.approx(mm_dense * (T + 1) / (2 * T))
    (step,) = [r for r in result["regions"] if r.get("step") == "AttentionStep"
               and r.get("dir") == "vjp" and not r.get("op")]
    assert step["mm"] == step["ew"] == 0 and "attn" not in step
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" not in str(
        result["ops_by_method"])
    # GPT's causal attention at D = d/heads = 16 ≤ every head limit: the VJP kernels take it
    assert vjp["decisions"] == {s: "triton" for s, *_ in B.SCENARIOS}


def test_shares(result):
    for conv, s in result["summary"].items():
        assert math.isclose(sum(b["share"] for b in s["buckets"].values()), 1.0, rel_tol=1e-9)
        assert s["total"] == pytest.approx(s["matmul"] + s["elementwise"])
        for sc in s["scenarios"].values():
            assert 0.5 < sc["share"] <= s["in_ops_calls"] / s["total"] <= 1.0
        # the causal count drops only attention pairs
        assert s["total"] <= result["summary"]["dense"]["total"] * (1 + 1e-12), conv
    for r in result["regions"]:  # every ops call launches a kernel at these shapes on a GPU
        if r.get("op"):
            assert set(r["decisions"].values()) == {"triton"}, r


def test_decisions():
    """The dispatch decisions follow kernels/ops.py: fp64 stays on torch; an fp32 head of
    128 columns goes to the JVP kernel with tf32 only."""
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    call = dict(op="linear_jvp", args=(x, x.clone(), w, w.clone(), None, None), kwargs={})
    assert B.decide(call, torch.float32, "ieee") == "triton"
    assert B.decide(call, torch.bfloat16, "ieee") == "triton"
    call64 = dict(op="linear_jvp", args=tuple(None if a is None else a.double()
                                               for a in call["args"]), kwargs={})
    assert B.decide(call64, torch.float32, "ieee") == "torch"
    q = torch.randn(1, 2, 8, 128)
    lse = torch.randn(1, 2, 8)
    att = dict(op="attention_jvp", args=(q, q, q, q, lse, q, q, q),
               kwargs=dict(scale=None, causal=True, mask=None))
    assert B.decide(att, torch.float32, "ieee") == "torch"
    assert B.decide(att, torch.float32, "tf32") == "triton"
    assert B.decide(att, torch.bfloat16, "ieee") == "triton"
    # the VJP kernels: the same head limits (64 fp32 ieee, 128 tf32); lse stays fp32 in bf16;
    # no kernel (ops.attention_vjp returns None) is torch's SDPA backward
    vjp = dict(op="attention_vjp", args=(q, q, q, q, lse, q),
               kwargs=dict(scale=None, causal=True, mask=None, need=(True, True, True)))
    assert B.decide(vjp, torch.float32, "ieee") == "torch"
    assert B.decide(vjp, torch.float32, "tf32") == "triton"
    assert B.decide(vjp, torch.bfloat16, "ieee") == "triton"
    q64 = torch.randn(1, 2, 8, 64)
    vjp64 = dict(op="attention_vjp", args=(q64, q64, q64, q64, lse, q64), kwargs=dict(
        causal=True))
    assert B.decide(vjp64, torch.float32, "ieee") == "triton"  # GPT-2's heads
    vjp_f64 = dict(op="attention_vjp", args=tuple(a.double() for a in vjp64["args"]),
                   kwargs=dict(causal=True))
    assert B.decide(vjp_f64, torch.float32, "ieee") == "torch"


def test_files(result, tmp_path):
    path = B.write([result], tmp_path)
    assert path.name.startswith("flops-cpu-") and path.suffix == ".json"
    report = json.loads(path.read_text())
    assert report["results"][0]["summary"]["causal"]["total"] == pytest.approx(
        result["summary"]["causal"]["total"])
    md = path.with_suffix(".md").read_text()
    assert "share in Triton" in md and "AttentionStep.vjp" in md
