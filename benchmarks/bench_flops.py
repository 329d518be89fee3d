"""FLOPs in Triton (issue 18): the share of one Fisher-vector product's FLOPs of a GPT-2-small
block that the Triton backend would run in its own kernels, counted.

The block (d = 768, 12 heads, MLP 4d, two LayerNorms, causal SDPA, batch 1, T = 1024, float32)
is linearized on the CPU with ``build_engine(model, (x,), torch_ops_with_vjp())``: the engine
builds the same Steps, with the same ``ops`` call sites, as the Triton backend, only its ``ops``
module holds the torch references the kernels are tested against
(:mod:`ngtriton.linearize.ops_torch`, plus ``attention_vjp`` =
:func:`ngtriton.kernels.attention_reference.attention_vjp_reference`, which ops_torch lacks).
With ``attention_vjp`` in its ops module, ``AttentionStep`` takes the Triton backend's path:
its forward is ``ops.attention_forward`` (not torch's CPU flash kernel) and its VJP
``ops.attention_vjp`` (not torch's SDPA backward through an autograd graph).
One product ``lin.vjp(lin.jvp(v))`` is run under ``torch.utils.flop_counter.FlopCounterMode``
and a second dispatch mode of ours, and every FLOP is attributed to the region that issued it:

* an ``ops`` call (``linear_jvp``, ``linear_jvp_fvp``, ``linear_vjp``, ``layernorm_jvp``,
  ``layernorm_vjp``, ``attention_forward``, ``attention_jvp``, ``attention_vjp``), which the
  Triton backend (:mod:`ngtriton.kernels.ops`) sends to a Triton kernel when its dispatch
  conditions hold;
* the rest of a Step (its own torch code: the residual adds, the GELU's elementwise steps,
  reshapes), by Step type and direction;
* the engine between Steps (cotangent accumulation, the final copies).

Whether an ops call would launch a kernel is decided by running :mod:`ngtriton.kernels.ops`'s
own dispatch code on the recorded arguments, with the kernels and the torch fallbacks replaced
by stubs that only say which one was chosen, and ``can_launch`` answering as on a CUDA device
(same dtype and device for all tensors, float32/float16/bfloat16): scenarios ``cuda-fp32-ieee``
(torch's default fp32 matmul precision), ``cuda-fp32-tf32`` and ``cuda-bf16`` (the floating
arguments cast to bfloat16, ``lse``/``rstd`` kept fp32 as a bf16 model has them). Calls that
fall back count as torch; for ``attention_vjp`` that is a ``None`` return (no kernel: the
step then runs torch's SDPA backward, on a GPU a fused kernel forming the same five products
per score). The attention kernels' head limits (``attention.jvp_head_limit``,
``attention_backward.vjp_head_limit``) answer as on a GPU, their interpreter branch switched
off: fp32 heads up to 64 columns (``ieee``) / 128 (``tf32``), 256 for bf16.

What is counted, and how:

* matmuls (``mm``, ``addmm``, ``bmm``, ...): ``FlopCounterMode`` (2 FLOPs per multiply-add);
  checked against the analytic ``2·rows·in·out`` per Linear matmul;
* everything ``FlopCounterMode`` counts as 0 (it only knows matmuls, convolutions and SDPA):
  elementwise ops are estimated at 1 FLOP per output element (``addcmul``/``addcdiv`` 2;
  ``logsumexp``/softmax 3), reductions at 1 per input element, copies/views/allocations/
  selections (``masked_fill``, ``where``, ``cat``, ``clone``, ...) at 0 (:data:`ELEMENTWISE`);
  ops that match no rule are estimated at 1 FLOP per element and listed as ``unknown``;
* in-place matmuls (``addmm_``, which ops_torch.linear_jvp uses for its second product, and
  ``baddbmm_``/``addbmm_``): ``FlopCounterMode``'s registry has only the out-of-place ops, so
  it counts them as 0; added analytically by its own formula (``2·M·K·N``);
* the attention VJP: the reference's matmuls, counted by ``FlopCounterMode`` (``bmm``) and
  checked against 5 products of 2·D FLOPs per score it forms (recomputed ``s = q kᵀ``,
  ``dp = g vᵀ``, ``dv = pᵀ g``, ``dq = ds k``, ``dk = dsᵀ q``; fewer where ``need`` drops
  one), which over the full score matrix is torch's own count for its SDPA backward
  (``flop_counter.sdpa_backward_flop_count``); its elementwise steps (scale, ``− lse``,
  ``exp``, ``− Δ``, ``⊙ p``: 5 per score) by the estimate above;
* torch's CPU flash-attention backward (``_scaled_dot_product_flash_attention_for_cpu_backward``),
  reached only by an attention step whose ops module has no ``attention_vjp`` (not here),
  which ``FlopCounterMode`` does not count at all (its registry has the CUDA SDPA backwards
  only): added analytically with ``sdpa_backward_flop_count``, plus
  :data:`SDPA_BWD_EW_PER_PAIR` elementwise FLOPs per score.

Attention is reported in two conventions: ``dense`` counts every (query, key) pair of the T×S
score matrix (torch's convention for SDPA, causal mask ignored), ``causal`` only the pairs a
causal mask keeps (T(T+1)/2 per head), which is about what block-skipping GPU kernels (the
Triton JVP and VJP kernels, cuDNN/flash/efficient SDPA backward) execute. The torch
references of the attention JVP and VJP skip the masked keys by chunk of queries, so their
measured count lies between: it is reported as ``measured``; the ``dense`` and ``causal``
columns rescale it (matmuls by the per-score formula, the elementwise part in proportion) to
the stated pair counts.

Result (``flops-cpu-2026-12-07``): with the attention VJP in Triton, every ``ops`` call of
the product launches a kernel in all three scenarios, 99.99 % of the FLOPs (``causal`` and
``dense`` alike; Hugging Face's block 99.988 %, the nanoGPT block 99.998 %). What stays on
torch is elementwise Step code: the residual adds' tangents and the engine's final copies
(1.6 MFLOP), and for Hugging Face's block its GELU (one collapsed ``ElementwiseStep``,
6.3 MFLOP with its VJP).

Run: ``python benchmarks/bench_flops.py [--quick] [--out DIR] [--threads N] [--model M]``
writes ``benchmarks/results/flops-<device>-<date>.{json,md}`` (``--quick``: d = 64, T = 64,
to a temporary folder unless ``--out``); tests/test_bench_flops.py runs the quick path in CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from flops_count import (  # noqa: E402
    ELEMENTWISE,
    SDPA_BWD_EW_PER_PAIR,
    Meter,
    instrumented,
    kept_pairs,
)
from flops_dispatch import decide  # noqa: E402

from ngtriton.kernels.attention_reference import attention_vjp_reference  # noqa: E402
from ngtriton.linearize import ops_torch  # noqa: E402
from ngtriton.linearize.engine import build_engine  # noqa: E402

SCENARIOS = (("cuda-fp32-ieee", torch.float32, "ieee"), ("cuda-fp32-tf32", torch.float32, "tf32"),
             ("cuda-bf16", torch.bfloat16, "tf32"))
HEADLINE_SCENARIO = "cuda-fp32-ieee"
CONVENTIONS = ("measured", "dense", "causal")
HEADLINE_CONVENTION = "causal"
TARGET = 0.95
def torch_ops_with_vjp() -> types.ModuleType:
    """The torch backend's ops plus ``attention_vjp`` (its torch reference): with it,
    ``AttentionStep`` takes the Triton backend's path (forward by ``ops.attention_forward``, VJP
    by ``ops.attention_vjp``) instead of torch's CPU flash kernel and its SDPA backward."""
    mod = types.ModuleType("ops_torch_with_attention_vjp")
    for name in ops_torch.__all__:
        setattr(mod, name, getattr(ops_torch, name))
    mod.attention_vjp = attention_vjp_reference
    mod.__all__ = [*ops_torch.__all__, "attention_vjp"]
    return mod


# --- the models -------------------------------------------------------------------------------

class Block(nn.Module):
    """A GPT-2 block written out (nanoGPT's layout): pre-LN, causal SDPA, tanh-GELU MLP 4d."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class HFBlock(nn.Module):
    """Hugging Face's ``GPT2Block`` (Conv1D layers, NewGELU, SDPA) returning its hidden states."""

    def __init__(self, d: int, heads: int, positions: int) -> None:
        super().__init__()
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        cfg = GPT2Config(n_embd=d, n_head=heads, n_layer=1, n_positions=positions,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg._attn_implementation = "sdpa"
        self.block = GPT2Block(cfg, layer_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out


def build_model(kind: str, d: int, heads: int, T: int) -> nn.Module:
    torch.manual_seed(0)
    model = HFBlock(d, heads, T) if kind == "hf" else Block(d, heads)
    return model.eval()


def sizes(quick: bool) -> tuple[int, int, int]:
    """(d, heads, T): GPT-2 small's block at T = 1024, or a CI-sized one."""
    return (64, 4, 64) if quick else (768, 12, 1024)


# --- one model --------------------------------------------------------------------------------

def flops_of(rec: dict[str, Any], convention: str) -> tuple[float, float]:
    """(matmul, elementwise) FLOPs of a region record in ``convention``."""
    attn = rec.get("attn")
    if attn is None or convention == "measured":
        return rec["mm"], rec["ew"]
    B, H, T, S = attn["B"], attn["H"], attn["T"], attn["S"]
    pairs = B * H * (kept_pairs(T, S, attn["causal"]) if convention == "causal" else T * S)
    if attn["kind"] in ("jvp", "vjp"):  # rescale the reference's scores to the convention's
        mm_attn = attn["per_pair_mm"] * pairs
        ratio = pairs / attn["ref_pairs"]
        return rec["mm"] - attn["expected_mm"] + mm_attn, rec["ew"] * ratio
    dense = B * H * T * S  # sdpa_vjp: the analytic dense count, scaled to the pairs
    ratio = pairs / dense
    return (rec["mm"] - attn["mm_dense"] + attn["mm_dense"] * ratio,
            rec["ew"] - attn["ew_dense"] + attn["ew_dense"] * ratio)


def measure(kind: str, quick: bool) -> dict[str, Any]:
    d, heads, T = sizes(quick)
    model = build_model(kind, d, heads, T)
    x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    lin = build_engine(model, (x,), torch_ops_with_vjp())
    build_s = time.perf_counter() - t0
    if not hasattr(lin, "steps"):
        raise RuntimeError(f"the engine fell back to {type(lin).__name__}")
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g) for p in lin.params]
    meter = Meter()
    t0 = time.perf_counter()
    with instrumented(lin, meter) as calls, meter.counting():
        out = lin.vjp(lin.jvp(v))
    product_s = time.perf_counter() - t0
    assert len(out) == len(lin.params)
    decisions = {s: [decide(c, dt_, p) for c in calls] for s, dt_, p in SCENARIOS}
    regions = []
    for rec in meter.records:
        r = {k: v for k, v in rec.items() if k not in ("call",)}
        if rec.get("op"):
            r["decisions"] = {s: decisions[s][rec["call"]] for s in decisions}
        regions.append(r)
    _attach_parents(meter.records, regions)
    steps = Counter(type(st).__name__ for st in lin.steps)
    attn_steps = [st for st in lin.steps if type(st).__name__ == "AttentionStep"]
    # the VJP went through ops.attention_vjp (no torch graph built) in every attention step
    vjp_via_ops = all(st.graph_out is None for st in attn_steps)
    return dict(
        model=kind, d=d, heads=heads, T=T, batch=1, dtype="float32",
        params=sum(p.numel() for p in lin.params), steps=dict(steps),
        fallbacks=list(getattr(lin, "fallbacks", [])),
        attention=[dict(causal=st.causal, mask=st.mask is not None) for st in attn_steps],
        attention_vjp_via_ops=vjp_via_ops,
        build_s=round(build_s, 3), product_s=round(product_s, 3), regions=regions,
        flop_counter_by_op={str(k): v for k, v in meter.fc.get_flop_counts()["Global"].items()},
        estimated_by_op=dict(meter.ew.op_flops.most_common()),
        ops_by_method={how: dict(c.most_common()) for how, c in meter.ew.ops.items()},
        summary=summarize(regions))


def _attach_parents(records: list[dict], regions: list[dict]) -> None:
    """Each ops region gets its Step's type, label and direction (records are appended when a
    region closes, so an ops call's Step is the next step record after it)."""
    for i, r in enumerate(regions):
        if r.get("op"):
            parent = next((p for p in regions[i + 1:] if p.get("step")), None)
            r["step"] = parent["step"] if parent else "engine"
            r["label"] = parent.get("label", "") if parent else ""
            r["dir"] = parent.get("dir", "") if parent else ""


def bucket(r: dict[str, Any]) -> str:
    """Breakdown key: ``Step type.direction[: ops function]``."""
    key = f"{r['step']}.{r['dir']}"
    return f"{key}: {r['op']}" if r.get("op") else key


def summarize(regions: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for conv in CONVENTIONS:
        per: dict[str, Any] = {}
        total = sum(sum(flops_of(r, conv)) for r in regions)
        for s, *_ in SCENARIOS:
            tri = sum(sum(flops_of(r, conv)) for r in regions
                      if r.get("op") and r["decisions"][s] == "triton")
            eligible = sum(sum(flops_of(r, conv)) for r in regions if r.get("op"))
            per[s] = dict(triton=tri, share=tri / total if total else 0.0)
        buckets: dict[str, dict[str, Any]] = {}
        for r in regions:
            mm, ew = flops_of(r, conv)
            b = buckets.setdefault(bucket(r), dict(mm=0, ew=0, calls=0, decisions=Counter()))
            b["mm"] += mm
            b["ew"] += ew
            b["calls"] += 1
            if r.get("op"):
                b["decisions"][r["decisions"][HEADLINE_SCENARIO]] += 1
        for b in buckets.values():
            b["flops"] = b["mm"] + b["ew"]
            b["share"] = b["flops"] / total if total else 0.0
            b["decisions"] = dict(b["decisions"])
        out[conv] = dict(total=total, in_ops_calls=eligible,
                         matmul=sum(flops_of(r, conv)[0] for r in regions),
                         elementwise=sum(flops_of(r, conv)[1] for r in regions),
                         scenarios=per, buckets=dict(sorted(
                             buckets.items(), key=lambda kv: -kv[1]["flops"])),
                         to_target=to_target(regions, conv, total))
    return out


def to_target(regions: list[dict[str, Any]], conv: str, total: float) -> dict[str, Any]:
    """The torch-side buckets (headline scenario), largest first, and the share after moving
    each into Triton in turn, until the target is reached."""
    torch_side: Counter[str] = Counter()
    tri = 0.0
    for r in regions:
        f = sum(flops_of(r, conv))
        if r.get("op") and r["decisions"][HEADLINE_SCENARIO] == "triton":
            tri += f
        elif f:
            torch_side[bucket(r)] += f
    moves, share = [], tri / total if total else 0.0
    for key, f in torch_side.most_common():
        if share >= TARGET:
            break
        tri += f
        share = tri / total
        moves.append(dict(bucket=key, flops=f, share_after=share))
    return dict(reached=share >= TARGET, moves=moves, torch_side=dict(torch_side.most_common()))


# --- checks, report ---------------------------------------------------------------------------

def checks(result: dict[str, Any]) -> dict[str, Any]:
    """Consistency: FlopCounterMode's Linear counts equal the analytic ones, the attention
    JVP and VJP references' equal their per-score formulas (the VJP's, over the full score
    matrix, also torch's count for its SDPA backward), the buckets sum to the total."""
    lin_ok = all(r["mm"] == r["expected_mm"] for r in result["regions"]
                 if r.get("op", "") and r["op"].startswith("linear"))
    attn_ok = all(r["mm"] == r["attn"]["expected_mm"] for r in result["regions"]
                  if r.get("op") == "attention_jvp")
    vjps = [r for r in result["regions"] if r.get("op") == "attention_vjp"]
    vjp_ok = bool(vjps) and all(
        r["mm"] == r["attn"]["expected_mm"]
        and (not all(r["attn"]["need"]) or r["attn"]["per_pair_mm"] * r["attn"]["B"]
             * r["attn"]["H"] * r["attn"]["T"] * r["attn"]["S"]
             == r["attn"]["torch_sdpa_bwd_dense"]) for r in vjps)
    sums_ok = all(math.isclose(sum(b["flops"] for b in s["buckets"].values()), s["total"],
                               rel_tol=1e-9) for s in result["summary"].values())
    return dict(linear_matmuls_match_analytic=lin_ok, attention_jvp_matches_formula=attn_ok,
                attention_vjp_matches_formula=vjp_ok, buckets_sum_to_total=sums_ok)


def _g(f: float) -> str:
    return f"{f / 1e9:.3f}"


def render(report: dict[str, Any]) -> str:
    lines = ["# FLOPs of one Fisher-vector product in Triton kernels (issue 18)", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["machine"].items()]
    lines += [f"- **target**: {TARGET:.0%} of the product's FLOPs in Triton kernels; headline "
              f"scenario `{HEADLINE_SCENARIO}`, attention convention `{HEADLINE_CONVENTION}`",
              "", "Product: `lin.vjp(lin.jvp(v))` of the block's linearization (the Triton "
              "backend's Steps and ops call sites, the torch references inside: "
              "`ops_torch` plus `attention_vjp_reference` as `ops.attention_vjp`). GFLOP = 1e9 "
              "FLOPs; a multiply-add is 2 FLOPs. See the module "
              "docstring of benchmarks/bench_flops.py for what is counted and how.", ""]
    for res in report["results"]:
        if "error" in res:
            lines += [f"## {res['model']}: error", "", res["error"], ""]
            continue
        lines += [f"## {res['model']} block: d={res['d']}, heads={res['heads']}, T={res['T']}, "
                  f"batch 1, fp32 ({res['params']:,} parameters)", "",
                  f"Steps: {', '.join(f'{k} ×{v}' for k, v in res['steps'].items())}; "
                  f"per-node fallbacks: {res['fallbacks'] or 'none'}; attention: "
                  f"{res['attention']}, VJP through `ops.attention_vjp`: "
                  f"{res.get('attention_vjp_via_ops', False)}; product {res['product_s']} s on "
                  "the CPU (counting on).", "",
                  "| attention convention | total GFLOP | matmul | elementwise | "
                  + " | ".join(f"share in Triton, {s}" for s, *_ in SCENARIOS) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(SCENARIOS)]
        for conv, s in res["summary"].items():
            lines.append(f"| {conv} | {_g(s['total'])} | {_g(s['matmul'])} | "
                         f"{_g(s['elementwise'])} | "
                         + " | ".join(f"{s['scenarios'][n]['share']:.3%}"
                                      for n, *_ in SCENARIOS) + " |")
        head = res["summary"][HEADLINE_CONVENTION]
        share = head["scenarios"][HEADLINE_SCENARIO]["share"]
        dense_share = res["summary"]["dense"]["scenarios"][HEADLINE_SCENARIO]["share"]
        missed = {k: res["estimated_by_op"].get(k, 0)
                  for k in res["ops_by_method"].get("analytic", {})}
        lines += ["", f"**Share in Triton kernels: {share:.3%}** (`{HEADLINE_CONVENTION}`, "
                  f"`{HEADLINE_SCENARIO}`; {dense_share:.3%} with `dense` attention): the "
                  f"{TARGET:.0%} target is {'met' if share >= TARGET else 'not met'}. "
                  "FLOPs FlopCounterMode did not count, added analytically: "
                  + ", ".join(f"`{k}` {_g(v)} GFLOP" + (" (dense)" if "attention" in k else "")
                              for k, v in missed.items())
                  + "."]
        lines += ["", f"Breakdown (`{HEADLINE_CONVENTION}`; Triton = the `{HEADLINE_SCENARIO}`"
                  " dispatch launches a kernel for these calls):", "",
                  "| Step.direction: ops call | calls | GFLOP | matmul | elementwise | share "
                  "| runs in |", "|---|---:|---:|---:|---:|---:|---|"]
        for key, b in head["buckets"].items():
            if not b["flops"]:
                continue
            where = (", ".join(f"{k} ×{v}" for k, v in b["decisions"].items())
                     if b["decisions"] else "torch")
            lines.append(f"| {key} | {b['calls']} | {_g(b['flops'])} | {_g(b['mm'])} | "
                         f"{_g(b['ew'])} | {b['share']:.2%} | {where} |")
        tt = head["to_target"]
        left = ", ".join(f"`{k}` {v / 1e6:.3f} MFLOP" for k, v in tt["torch_side"].items())
        lines += ["", f"Left on torch (`{HEADLINE_CONVENTION}`, `{HEADLINE_SCENARIO}`): "
                  f"{left or 'nothing'}.", "",
                  f"To reach {TARGET:.0%} (`{HEADLINE_CONVENTION}`, "
                  f"`{HEADLINE_SCENARIO}`): "
                  + ("already reached." if not tt["moves"] else
                     "; ".join(f"move `{m['bucket']}` ({_g(m['flops'])} GFLOP) → "
                               f"{m['share_after']:.2%}" for m in tt["moves"])
                     + ("" if tt["reached"] else " (not reached even then)")), ""]
        dense = res["summary"]["dense"]["to_target"]
        lines += ["Same with `dense` attention: "
                  + ("already reached." if not dense["moves"] else
                     "; ".join(f"move `{m['bucket']}` ({_g(m['flops'])} GFLOP) → "
                               f"{m['share_after']:.2%}" for m in dense["moves"])), ""]
        unknown = res["ops_by_method"].get("unknown", {})
        lines += [f"Checks: {res['checks']}. Ops FlopCounterMode counted: "
                  f"{res['ops_by_method'].get('flop_counter', {})}; added analytically: "
                  f"{res['ops_by_method'].get('analytic', {})}; ops without an estimate rule "
                  f"(1 FLOP/element): {unknown or 'none'}.", ""]
    return "\n".join(lines) + "\n"


def collect(quick: bool, models: tuple[str, ...] = ("hf", "nano")) -> list[dict[str, Any]]:
    results = []
    for kind in models:
        try:
            res = measure(kind, quick)
        except ImportError as e:  # transformers missing: the hand-written block still runs
            results.append(dict(model=kind, error=f"{type(e).__name__}: {e}"))
            continue
        res["checks"] = checks(res)
        head = res["summary"][HEADLINE_CONVENTION]
        print(f"  [{kind}] T={res['T']} total {_g(head['total'])} GFLOP ({HEADLINE_CONVENTION}), "
              + ", ".join(f"{c}: {res['summary'][c]['scenarios'][HEADLINE_SCENARIO]['share']:.2%}"
                          for c in CONVENTIONS)
              + f" in Triton ({HEADLINE_SCENARIO}); checks {res['checks']}", flush=True)
        results.append(res)
    return results


def write(results: list[dict[str, Any]], out: Path) -> Path:
    from run import device_tag, machine, results_stem

    tag = device_tag() if torch.cuda.is_available() else "cpu"
    report = dict(machine=machine(), device_tag=tag, target=TARGET,
                  headline=dict(scenario=HEADLINE_SCENARIO, convention=HEADLINE_CONVENTION),
                  elementwise_rules=ELEMENTWISE, sdpa_bwd_ew_per_pair=SDPA_BWD_EW_PER_PAIR,
                  results=results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"flops-{results_stem(tag, dt.date.today())}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(report))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d = 64, T = 64 (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temporary one for "
                        "--quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--model", choices=("hf", "nano", "both"), default="both",
                   help="Hugging Face's GPT2Block, the hand-written block, or both")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (Path(tempfile.mkdtemp(prefix="flops_")) if args.quick
                       else HERE / "results")
    models = ("hf", "nano") if args.model == "both" else (args.model,)
    path = write(collect(args.quick, models), out)
    print(f"wrote {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
