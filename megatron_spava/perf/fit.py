"""Fitting the time model's constants to the measured 1- and 2-GPU runs, and validating it
on the 4-GPU runs it was not fitted on."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

from ..algos.registry import runs_on_one_rank
from ..algos.ring import RingLayout, ring_ops
from ..algos.spava import SpavaLayout
from ..algos.spava.cost import spava_ops
from ..config import SpavaConfig, round_up
from . import inputs
from .rates import BENCH, KernelCurves, Rates, call_seconds, measured_curves
from .simulate import predict, simulate_layer
from .work import Call, Hardware, Op, Shape

PREFILL_RUNS = ("2026-11-21-h200x4-v2/prefill_7b_4gpu_merged.json",)


def load_measurements(extra_prefill: Sequence[str] = ()) -> Dict[str, object]:
    """Every measured TTFT and attention-layer time this model uses or checks, with its file.
    extra_prefill: more tools/bench_prefill.py JSON files (7B shape, TP = 1), e.g. 2-GPU
    runs; their CP rows are filed by world size ("two_gpu_prefill", "four_gpu_prefill", ...)."""
    def load(path):
        with open(path if os.path.isabs(path) else os.path.join(BENCH, path)) as f:
            return json.load(f)
    one, by_world = [], {}
    for path in PREFILL_RUNS + tuple(extra_prefill):
        prefill = load(path)
        if prefill.get("shape") != "7b" or prefill.get("tp", 1) != 1:
            raise ValueError(f"{path}: the model is fitted to 7B-shaped TP = 1 runs")
        for n, runs in prefill["runs"].items():
            for algo, r in runs.items():
                row = dict(n=int(n), algo=algo, ttft=r["ttft_median_s"], vision=r["vision_median_s"],
                           llm=r["llm_median_s"], attention_share=r.get("attention_share_of_llm"),
                           tokens=r["tokens"], local_tokens=r["local_tokens"], world=prefill["world"],
                           exposed_comm_share=r.get("exposed_comm_share"),
                           source=path if os.path.isabs(path) else f"benchmarks/{path}")
                # (keys: <variant>[+<fusions>][@fp8])
                on_one = runs_on_one_rank(algo.partition("@")[0].partition("+")[0])
                (one if on_one else by_world.setdefault(prefill["world"], [])).append(row)
    four = by_world.pop(4, [])
    two = by_world.pop(2, [])
    layers = []
    for path in ("2026-11-21-h200x2/demo_128k.json", "2026-11-21-h200x4/demo_4gpu_131072.json",
                 "2026-11-21-h200x4/demo_4gpu_262144.json"):
        d = load(path)
        gpus = max(r["ranks"] for r in d["results"])  # its args' nproc is not the torchrun size
        for r in d["results"]:
            layers.append(dict(world=r["ranks"], context=d["args"]["context_len"], query=d["args"]["query_len"],
                               algo=r["algo"], time=r["time_s"], anchor=r.get("anchor_len"),
                               passing=r.get("passing_len"), block=r.get("block_len"),
                               gpus_in_run=gpus, source=f"benchmarks/{path}"))
    ring = [dict(world=4, tokens=r["tokens"], time=r["median_ms"] / 1e3,
                 source="benchmarks/2026-11-21-h200x4-v2/ring.json")
            for r in load("2026-11-21-h200x4-v2/ring.json")["runs"] if r["impl"].startswith("megatron_spava")]
    return dict(one_gpu_prefill=one, two_gpu_prefill=two, four_gpu_prefill=four, attention_layer=layers,
                ring_layer=ring, other_prefill=by_world)


def _layer_ops_for_demo(row, shape: Shape) -> List[List[Op]]:
    """The ops of one attention_demo layer (no dense work, no weights): spava variants with
    the demo's budgets, or full attention on one rank."""
    if row["algo"].startswith("full"):
        S = row["context"] + row["query"]
        return [[Op(calls=[Call(S, S, True)])]]
    cfg = SpavaConfig(passing=False) if row["algo"].startswith("star") else SpavaConfig(
        passing_len=row["passing"] if row["passing"] != row["block"] else round_up(row["context"], 128))
    layout = SpavaLayout.plan(context_len=row["context"], query_len=row["query"], cp_size=row["world"], config=cfg)
    group = list(range(row["world"]))
    ops = [[o for o in spava_ops(layout, r, shape, 1, group, None) if not o.dense] for r in range(row["world"])]
    return ops


def demo_seconds(row, shape: Shape, rates: Rates, hw: Hardware) -> float:
    ops = _layer_ops_for_demo(row, shape)
    end, _, _, _ = simulate_layer(ops, shape, replace(rates, model_attn=1.0), hw, [0.0] * len(ops), 0.0)
    return max(end)


def _lstsq(xs, ys, weights=None):
    """Least squares y = a x + b (relative weights by default). Returns (a, b)."""
    w = weights or [1.0 / (y * y) for y in ys]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs)) / sw
    sy = sum(wi * y for wi, y in zip(w, ys)) / sw
    sxx = sum(wi * (x - sx) ** 2 for wi, x in zip(w, xs))
    sxy = sum(wi * (x - sx) * (y - sy) for wi, x, y in zip(w, xs, ys))
    a = sxy / sxx
    return a, sy - a * sx


def fit(meas: Dict[str, object], shape: Shape, hw: Hardware, *, max_gpus: int = 2,
        curves: Optional[KernelCurves] = None) -> Tuple[Rates, Dict]:
    """Fit the Rates on runs of at most `max_gpus` GPUs: the 1-GPU `full` prefill runs (vision,
    dense) and the 1- and 2-GPU attention-layer runs (in-layer factor on the kernel curves,
    merge cost); then the ratio of in-model attention to the layer model from the 1-GPU
    prefill runs. curves: the kernel rates against call size (default: the measured ones);
    they are inputs, not fitted."""
    curves = curves or measured_curves()
    one = sorted(meas["one_gpu_prefill"], key=lambda r: r["n"])
    groups = [inputs.prompt_lengths(r["n"])[0] for r in one]
    a_v, b_v = _lstsq(groups, [r["vision"] for r in one])
    dense = [r["llm"] * (1 - r["attention_share"]) for r in one]
    # Dense time = a * tokens * (GEMM slowdown at that many rows) + b: the measured GEMM rate
    # sets how the per-token cost moves with size; a and b absorb what is not GEMM.
    dense_x = [r["tokens"] * curves.gemm.slowdown(r["tokens"]) for r in one]
    a_d, b_d = _lstsq(dense_x, dense)
    layers = [r for r in meas["attention_layer"]  # (a 1-process row of the 2-GPU run is a 1-GPU run)
              if r["world"] <= max_gpus and (r["gpus_in_run"] <= max_gpus or r["gpus_in_run"] <= 2)]
    # Two parameters (in-layer factor on the kernel curves, s per merged element) by least
    # squares in relative error: the layer time is linear in both.
    base = Rates(attention=0.0, merge=0.0, curves=curves)
    rows = []
    for r in layers:
        t0 = demo_seconds(r, shape, replace(base, attention=1e-30, merge=0.0), hw)  # overheads + comm
        ta = demo_seconds(r, shape, replace(base, attention=1.0, merge=0.0), hw) - t0  # at the curves' rates
        tm = demo_seconds(r, shape, replace(base, attention=1e-30, merge=1e-12), hw) - t0
        rows.append((ta, tm / 1e-12, r["time"] - t0, r))
    # Solve min sum ((x*ta + y*tm - y0)/y0)^2 for x (factor), y (s/element).
    s11 = sum((ta / y) ** 2 for ta, tm, y, _ in rows)
    s12 = sum(ta * tm / y ** 2 for ta, tm, y, _ in rows)
    s22 = sum((tm / y) ** 2 for ta, tm, y, _ in rows)
    b1 = sum(ta / y for ta, tm, y, _ in rows)
    b2 = sum(tm / y for ta, tm, y, _ in rows)
    det = s11 * s22 - s12 * s12
    if s22 == 0 or abs(det) < 1e-12 * s11 * s22:  # no run with merges (--fit-on 1): the rate alone
        x, y = b1 / s11, Rates().merge
    else:
        x, y = (b1 * s22 - b2 * s12) / det, (s11 * b2 - s12 * b1) / det
    rates = Rates(attention=x, merge=max(y, 0.0), dense_per_token=a_d, dense_const=b_d,
                  vision_per_group=a_v, vision_const=b_v, curves=curves)
    # In-model attention / layer model, from the 1-GPU prefill runs.
    ratios = []
    for r in one:
        S = r["tokens"]
        model_t = shape.layers * call_seconds(Call(S, S, True), shape, rates, hw)
        ratios.append(r["llm"] * r["attention_share"] / model_t)
    rates.model_attn = sum(ratios) / len(ratios)
    # With 2-GPU prefill runs (none measured yet): each algorithm's in-model attention over
    # what the layer model predicts for it, averaged over lengths.
    two = [r for r in meas.get("two_gpu_prefill", []) if max_gpus >= 2 and r["attention_share"] is not None]
    per_algo: Dict[str, List[float]] = {}
    for r in two:
        name = "spava" if r["algo"] == "spava-no-frame-parallel" else r["algo"]
        p = predict(name, r["n"], 2, shape=shape, rates=rates, hw=hw,
                    frame_parallel=r["algo"] != "spava-no-frame-parallel")
        per_algo.setdefault(r["algo"], []).append(r["llm"] * r["attention_share"] / p["attention"])
    rates.algo_attn = {a: sum(v) / len(v) for a, v in per_algo.items()}
    report = dict(
        vision=dict(per_group_s=a_v, const_s=b_v, points=[dict(n=r["n"], groups=g, measured=r["vision"],
                                                                fitted=round(a_v * g + b_v, 4))
                                                           for r, g in zip(one, groups)]),
        dense=dict(per_token_s=a_d, const_s=b_d, points=[dict(n=r["n"], tokens=r["tokens"], measured=round(m, 4),
                                                               fitted=round(a_d * xd + b_d, 4))
                                                          for r, m, xd in zip(one, dense, dense_x)]),
        attention=dict(in_layer_factor=x, merge_ps_per_element=y * 1e12, points=[
            dict(algo=r["algo"], world=r["world"], context=r["context"], measured_ms=round(1e3 * r["time"], 3),
                 fitted_ms=round(1e3 * demo_seconds(r, shape, rates, hw), 3), source=r["source"])
            for *_, r in rows]),
        in_model_attention_ratio=dict(mean=rates.model_attn, per_n={r["n"]: round(q, 4) for r, q in zip(one, ratios)}),
        per_algorithm_attention_ratio=rates.algo_attn,
        fitted_on=sorted({r["source"] for r in layers} | {one[0]["source"] + " (full, 1 GPU)"}
                         | {r["source"] + " (2 GPUs)" for r in two}))
    return rates, report


def validate(meas, rates: Rates, shape: Shape, hw: Hardware) -> Dict[str, object]:
    """Predict every measured 4-GPU prefill TTFT (and the 4-GPU attention-layer times) with
    the rates fitted on 1 and 2 GPUs; return the rows and the errors."""
    rows = []
    for m in sorted(meas["four_gpu_prefill"], key=lambda r: (r["n"], r["algo"])):
        algo = m["algo"]
        fp = algo != "spava-no-frame-parallel"
        name = "spava" if algo == "spava-no-frame-parallel" else algo
        p = predict(name, m["n"], 4, shape=shape, rates=rates, hw=hw, frame_parallel=fp)
        rows.append(dict(n=m["n"], algo=algo, measured_ttft=round(m["ttft"], 4), predicted_ttft=round(p["ttft"], 4),
                         error=round(p["ttft"] / m["ttft"] - 1, 4), measured_vision=round(m["vision"], 4),
                         predicted_vision=round(p["vision"], 4), measured_llm=round(m["llm"], 4),
                         predicted_llm=round(p["llm"], 4),
                         measured_attention=round(m["llm"] * m["attention_share"], 4),
                         predicted_attention=round(p["attention"], 4), local_tokens=m["local_tokens"],
                         predicted_local_tokens=p["local_tokens"],
                         measured_exposed_comm=m["exposed_comm_share"],
                         predicted_exposed_comm=p["exposed_comm_share"]))
    layer_rows = []
    for r in meas["attention_layer"]:
        if r["gpus_in_run"] == 4 and r["world"] == 4:
            t = demo_seconds(r, shape, rates, hw)
            layer_rows.append(dict(algo=r["algo"], context=r["context"], measured_ms=round(1e3 * r["time"], 3),
                                   predicted_ms=round(1e3 * t, 3), error=round(t / r["time"] - 1, 4)))
    for r in meas["ring_layer"]:
        layout = RingLayout.plan(context_len=r["tokens"] - 1, query_len=1, cp_size=4)
        ops = [[o for o in ring_ops(layout, k, shape, 1, list(range(4)), None) if not o.dense] for k in range(4)]
        end, *_ = simulate_layer(ops, shape, replace(rates, model_attn=1.0), hw, [0.0] * 4, 0.0)
        layer_rows.append(dict(algo="ring (bench_ring)", context=r["tokens"], measured_ms=round(1e3 * r["time"], 3),
                               predicted_ms=round(1e3 * max(end), 3), error=round(max(end) / r["time"] - 1, 4)))
    errs = [abs(r["error"]) for r in rows]
    main = [abs(r["error"]) for r in rows if r["algo"] in ("spava", "apb", "star", "ring")]
    return dict(prefill=rows, attention_layer=layer_rows,
                max_abs_error=max(errs), mean_abs_error=sum(errs) / len(errs),
                max_abs_error_main_algos=max(main), within_10pct=sum(e <= 0.10 for e in errs), total=len(errs))
