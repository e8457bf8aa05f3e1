#!/usr/bin/env python3
"""A scaling model of video-prefill time to first token (TTFT) on clusters: what each GPU
computes and sends, per layer and algorithm, fitted to the measured 1- and 2-GPU runs and
checked against the 4-GPU runs it was not fitted on; then predicted for 8-64 GPUs.

    python tools/scaling_model.py                        # validation table + predictions
    python tools/scaling_model.py --json scaling.json --plot scaling.png
    python tools/scaling_model.py --bytes --gpus 16 --tokens 131072   # per-layer traffic table

What is counted (per rank, per layer, from megatron_spava's own layout classes: the token
counts, blocks, passing blocks and chunks are `SpavaLayout` / `RingLayout` values, and the
attention calls are the ones `spava_attn_func` / `ring_attn_func` make):
  compute   vision encoder (frame groups of this rank), dense layers (local tokens),
            attention (every `attend` call: rows x keys, causal halved), LSE merges (float32
            elements merged);
  traffic   every collective's payload, split by where the peer is: NVLink (same node) or
            the network (another node); with TP, the Megatron TP all-reduces.
Algorithms: spava, apb, star, ring (ours, ZigZag P2P); megatron-p2p (Transformer Engine's
ring: the same chunks and bytes as ring, its output corrections taken as free, since TE
fuses them; never measured here, so it bounds a lean ring from below), megatron-a2a (Ulysses all-to-all: needs the heads
divisible by CP), megatron-a2a+p2p (all-to-all inside groups of 4, ring across them),
megatron-allgather (K/V all-gathered, then local attention); spava-scaled-passing (the
passing budget scaled by 8 / W: the W = 8 default's share, see below).

Time model (documented in BENCHMARKS.md section 9): one layer is simulated as a compute
stream and one NCCL stream in FIFO order, so an asynchronous collective costs only what
the compute issued before its wait does not cover; a collective starts when the last rank
launches it.
Measured kernel rates (inputs, never fitted to a prefill run; `measured_curves`): each
attention call runs at the rate tools/bench_attention.py and tools/bench_layers.py measured
on one H200 for a call of its FLOPs and mask (causal squares 2K-128K tokens, unmasked
rows x keys 512 x 1536 to 16K x 48K; log rate linear in log FLOPs between points; smaller
calls cost the smallest measured call's time), and the dense GEMMs' rate follows
bench_layers' GEMM floors at 32K and 128K rows (--constant-rates replaces either by one
fitted rate).
Fitted constants (--fit-on, printed with their residuals):
  vision s/frame group and dense s/token: the 1-GPU `full` prefill runs (32K-256K);
  in-layer factor on the kernel curves and float32 merge cost per element: the 1-GPU full
  and 2-GPU attention-layer runs (BENCHMARKS section 2), then the ratio of in-model
  attention time to the layer model from the 1-GPU prefill runs.
Measured hardware: NVLink all-gather (265 GB/s bus bandwidth at 16 MB per rank, 326 GB/s at
256 MB on 4 H200: a latency and a bandwidth fitted through the two). Assumed (not measured
here): 400 Gb/s per GPU between nodes at 90% efficiency, 10 us per network step, P2P over
NVLink at the all-gather bus bandwidth, ring collectives across nodes using every NIC of
the node (NCCL's rail-aligned rings), 5 us per merge kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, replace
from typing import Dict, List

from ..algos.spava import SpavaLayout
from ..config import SpavaConfig
from . import inputs
from .fit import fit, load_measurements, validate
from .layer import ALGOS, layer_traffic
from .rates import Rates, measured_curves
from .simulate import predict, rank_compute
from .work import Hardware, Shape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
BENCH = os.path.join(ROOT, "benchmarks")
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------
# Predictions, findings, output
# ---------------------------------------------------------------------------------------
PRED_GPUS = (8, 16, 32, 64)
PRED_TOKENS = (131072, 262144, 524288, 1048576, 2097152)


def predictions(rates: Rates, shape: Shape, hw: Hardware, gpus=PRED_GPUS, tokens=PRED_TOKENS,
                algos=ALGOS, shard_weights: bool = False) -> List[Dict[str, object]]:
    rows = []
    for W in gpus:
        for n in tokens:
            for algo in algos:
                try:
                    p = predict(algo, n, W, shape=shape, rates=rates, hw=hw, shard_weights=shard_weights)
                except ValueError as err:
                    rows.append(dict(algo=algo, gpus=W, n=n, feasible=False, reason=str(err)))
                    continue
                traffic = layer_traffic(algo, n, W, 1, shape, hw, shard_weights=shard_weights)
                worst = max(traffic, key=lambda t: t["net_recv"] + t["nvlink_recv"])
                p.update(n=n, feasible=True, bytes_per_layer={k: worst[k] for k in
                                                              ("nvlink_send", "nvlink_recv", "net_send", "net_recv")})
                rows.append(p)
    full = {n: predict("full", n, 1, shape=shape, rates=rates, hw=hw)["ttft"] for n in tokens}
    for r in rows:
        if r.get("feasible"):
            r["speedup_vs_full_1gpu"] = round(full[r["n"]] / r["ttft"], 3)
    for r in rows:
        if r.get("feasible"):
            same = {q["algo"]: q for q in rows if q.get("feasible") and q["gpus"] == r["gpus"] and q["n"] == r["n"]}
            for base in ("ring", "apb"):
                if base in same:
                    r[f"speedup_vs_{base}"] = round(same[base]["ttft"] / r["ttft"], 3)
    return rows, full


def _tok(n: int) -> str:
    return f"{n // 2 ** 20}M" if n >= 2 ** 20 else f"{n // 1024}K"


def findings(rows, shape: Shape, rates: Rates, hw: Hardware) -> List[str]:
    """Plain statements the predictions support (stalls, where replication dominates)."""
    out = []
    by = {(r["algo"], r["gpus"], r["n"]): r for r in rows if r.get("feasible")}
    rings = ("ring", "megatron-p2p", "megatron-a2a+p2p", "megatron-allgather")
    exposed = {}
    for algo in ("spava", "spava-scaled-passing", "apb") + rings:
        exposed[algo] = [(W, n, by[(algo, W, n)]["exposed_comm_share"]) for W in PRED_GPUS for n in PRED_TOKENS
                         if (algo, W, n) in by and by[(algo, W, n)]["exposed_comm_share"] > 0.05]
        if exposed[algo]:
            out.append(f"{algo}: communication exposed > 5% of TTFT at " + ", ".join(
                f"{W} GPUs/{_tok(n)} ({100 * e:.0f}%)" for W, n, e in exposed[algo]))
        else:
            out.append(f"{algo}: exposed communication stays under 5% of TTFT at every predicted size")
    spava_stalls = {(W, n) for W, n, _ in exposed["spava"]}
    ring_only = sorted({(W, n) for a in rings for W, n, _ in exposed[a]} - spava_stalls)
    out.append("sizes where a ring / all-gather / all-to-all exposes > 5% and spava does not: "
               + (", ".join(f"{W} GPUs/{_tok(n)}" for W, n in ring_only) or "none"))
    spava = [(W, n, by[("spava", W, n)]["exposed_comm_share"]) for W in PRED_GPUS for n in PRED_TOKENS
             if ("spava", W, n) in by]
    worst = max(spava, key=lambda x: x[2])
    out.append(f"spava: exposed communication at most {100 * worst[2]:.1f}% of TTFT "
               f"({worst[0]} GPUs, {_tok(worst[1])})")
    for W in (16, 64):  # what the measured small-call rates do to the per-rank attention
        parts = []
        for algo in ("spava", "ring"):
            c = rank_compute(algo, 131072, W, shape, rates, hw)
            parts.append(f"{algo} {c['calls']} calls per layer at {c['kernel_tflops']:.0f} TFLOP/s")
        out.append(f"per-rank attention kernels at {W} GPUs / 128K (FLOP-weighted rate on the measured "
                   f"curves): " + ", ".join(parts))
    for alpha in (5e-6, 20e-6):  # sensitivity to the assumed per-step network latency
        h = replace(hw, net_alpha_step=alpha)
        parts = []
        for algo in ("spava", "ring", "megatron-allgather"):
            q = predict(algo, 131072, 64, shape=shape, rates=rates, hw=h, shard_weights=False)
            parts.append(f"{algo} {100 * q['exposed_comm_share']:.0f}%")
        out.append(f"at {alpha * 1e6:.0f} us per network step instead of {hw.net_alpha_step * 1e6:.0f}, "
                   f"64 GPUs / 128K exposed: " + ", ".join(parts))
    for W in (16, 64):
        on = predict("spava", 131072, W, shape=shape, rates=rates, hw=hw, shard_weights=True)
        off = predict("spava", 131072, W, shape=shape, rates=rates, hw=hw, shard_weights=False)
        out.append(f"weights sharded over all {W} CP ranks (bench_prefill's default) would cost "
                   f"{100 * (on['ttft'] / off['ttft'] - 1):.0f}% at 128K ({on['ttft']:.3f} s vs "
                   f"{off['ttft']:.3f} s): each layer's {shape.layer_params * shape.weight_bytes / 1e6:.0f} MB is gathered across nodes; 7B fits "
                   f"unsharded, so predictions keep whole weights")
    for algo in ("spava", "spava-scaled-passing"):
        parts = [f"{W} GPUs {100 * rank_compute(algo, n, W, shape, rates, hw)['replicated_share']:.0f}% at "
                 f"{_tok(n)}" for W in PRED_GPUS for n in (131072, 1048576)]
        out.append(f"{algo}: share of the busiest rank's compute spent on replicated work (anchor and "
                   f"query attention, their rows' dense work): " + ", ".join(parts))
    for W in PRED_GPUS:
        n = 1048576
        cfg = SpavaConfig()
        _, ctx, q = inputs.prompt_lengths(n)
        lay = SpavaLayout.plan(context_len=ctx, query_len=q, cp_size=W, config=cfg)
        own = 2 * lay.block_len
        repl = lay.anchor_len + lay.query_len
        passing_keys = (2 * W - 1) * lay.passing_len
        out.append(f"spava defaults at {W} GPUs, 1M tokens: per rank {own} own tokens + {repl} replicated "
                   f"(anchor + query: {100 * repl / (own + repl):.0f}% of its dense work); passing block "
                   f"{lay.passing_len} of a {lay.block_len}-token block ({100 * lay.passing_len / lay.block_len:.0f}%), "
                   f"{passing_keys} passing keys across its two blocks")
    return out


def _fmt_table(rows, cols, header) -> str:
    widths = [max(len(h), *(len(str(r.get(c, ""))) for r in rows)) for c, h in zip(cols, header)]
    lines = [" ".join(h.rjust(w) for h, w in zip(header, widths))]
    for r in rows:
        lines.append(" ".join(str(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


def plot(rows, full, path: str) -> None:
    """TTFT vs tokens per GPU count (one panel each), log-log, with PIL (no matplotlib here)."""
    from PIL import Image, ImageDraw
    algos = [a for a in ("spava", "spava-scaled-passing", "apb", "star", "ring", "megatron-a2a+p2p",
                         "megatron-allgather") if any(r["algo"] == a for r in rows)]
    colors = {"spava": (214, 39, 40), "spava-scaled-passing": (255, 127, 14), "apb": (31, 119, 180),
              "star": (148, 103, 189), "ring": (44, 160, 44), "megatron-a2a+p2p": (140, 86, 75),
              "megatron-allgather": (127, 127, 127), "full (1 GPU)": (0, 0, 0)}
    pw, ph, margin = 420, 330, 60
    img = Image.new("RGB", (2 * pw + 40, 2 * ph + 150), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 8), f"Predicted TTFT, Qwen2.5-VL-7B shape (model fitted on 1-2 H200s, checked on 4); "
                    f"8 GPUs/node, NVLink in, 400 Gb/s/GPU between", fill="black")
    feasible = [r for r in rows if r.get("feasible")]
    ymin = min(r["ttft"] for r in feasible) / 1.5
    ymax = max(max(r["ttft"] for r in feasible), max(full.values())) * 1.5
    xs = sorted({r["n"] for r in feasible})
    for i, W in enumerate(PRED_GPUS):
        ox, oy = 20 + (i % 2) * (pw + 10), 30 + (i // 2) * (ph + 10)
        x0, y0, x1, y1 = ox + margin, oy + 20, ox + pw - 10, oy + ph - 40
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, oy + 4), f"{W} GPUs ({-(-W // 8)} node{'s' if W > 8 else ''})", fill="black")
        X = lambda n: x0 + (math.log(n) - math.log(xs[0])) / (math.log(xs[-1]) - math.log(xs[0])) * (x1 - x0)  # noqa
        Y = lambda t: y1 - (math.log(t) - math.log(ymin)) / (math.log(ymax) - math.log(ymin)) * (y1 - y0)  # noqa
        for n in xs:
            d.line([X(n), y1, X(n), y1 + 4], fill="black")
            d.text((X(n) - 14, y1 + 6), f"{n // 1024}K" if n < 2 ** 20 else f"{n // 2 ** 20}M", fill="black")
        t = 10 ** math.floor(math.log10(ymin))
        while t <= ymax:
            if t >= ymin:
                d.line([x0 - 4, Y(t), x0, Y(t)], fill="black")
                d.text((ox + 2, Y(t) - 6), f"{t:g} s", fill="black")
                d.line([x0, Y(t), x1, Y(t)], fill=(225, 225, 225))
            t *= 10
        series = {a: [(r["n"], r["ttft"]) for r in feasible if r["gpus"] == W and r["algo"] == a] for a in algos}
        series["full (1 GPU)"] = sorted(full.items())
        for a, pts in series.items():
            pts = sorted(pts)
            if len(pts) > 1:
                d.line([(X(n), Y(t)) for n, t in pts], fill=colors[a], width=2)
            for n, t in pts:
                d.ellipse([X(n) - 3, Y(t) - 3, X(n) + 3, Y(t) + 3], fill=colors[a])
    ly = 2 * ph + 50
    for j, a in enumerate(list(algos) + ["full (1 GPU)"]):
        lx = 30 + (j % 4) * 210
        yy = ly + (j // 4) * 18
        d.line([lx, yy + 6, lx + 24, yy + 6], fill=colors[a], width=3)
        d.text((lx + 30, yy), a, fill="black")
    d.text((30, ly + 60), "x: prompt tokens (log); y: TTFT in seconds (log). Predictions, not measurements.",
           fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["3b", "7b"], default="7b", help="(default: %(default)s)")
    p.add_argument("--json", help="write fit, validation, predictions and findings here")
    p.add_argument("--plot", help="write a PNG of the predicted TTFTs here")
    p.add_argument("--bytes", action="store_true", help="print the per-layer traffic table of --gpus/--tokens")
    p.add_argument("--gpus", type=int, default=16, help="for --bytes (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=131072, help="for --bytes (default: %(default)s)")
    p.add_argument("--shard-weights", action="store_true",
                   help="predict (and count bytes) with the LLM weights sharded over the CP group "
                        "(bench_prefill's default; the 4-GPU validation always uses it, as measured)")
    p.add_argument("--prefill-json", nargs="+", default=[], metavar="JSON",
                   help="more tools/bench_prefill.py results (7B, TP = 1) to fit on or check "
                        "against: 2-GPU runs refine each algorithm's attention time")
    p.add_argument("--fit-on", type=int, default=2, choices=[1, 2, 4],
                   help="fit on runs of at most this many GPUs (default: %(default)s; 4 uses the "
                        "4-GPU attention layers too, then validation is no longer out of sample)")
    p.add_argument("--constant-rates", nargs="+", default=[], choices=["attention", "gemm"],
                   help="ablation: replace the measured rate-vs-size curve of these kernels by one "
                        "constant rate (the fit then scales it), to show what the curves change")
    args = p.parse_args(argv)
    shape, hw = Shape.of(args.shape), Hardware()
    if args.bytes:
        rows = []
        for algo in ALGOS:
            try:
                t = layer_traffic(algo, args.tokens, args.gpus, 1, shape, hw, shard_weights=args.shard_weights)
            except ValueError as err:
                print(f"{algo}: {err}")
                continue
            worst = max(t, key=lambda x: x["net_recv"] + x["nvlink_recv"])
            rows.append(dict(algo=algo, rank=worst["rank"], local=worst["local_tokens"],
                             **{k: f"{worst[k] / 2 ** 20:.1f}" for k in ("nvlink_send", "nvlink_recv", "net_send", "net_recv")}))
        print(f"per layer, the busiest CP rank, MiB ({args.gpus} GPUs, {args.tokens} tokens, "
              f"{hw.gpus_per_node} per node, TP=1, weights {'sharded over CP' if args.shard_weights else 'whole'}):")
        print(_fmt_table(rows, ["algo", "rank", "local", "nvlink_send", "nvlink_recv", "net_send", "net_recv"],
                         ["algo", "rank", "tokens", "NVLink out", "NVLink in", "net out", "net in"]))
        return 0
    meas = load_measurements(args.prefill_json)
    curves = measured_curves(tuple(sorted(args.constant_rates)))
    print("kernel rates against call size (measured on one H200, not fitted):")
    for c in (curves.causal, curves.full, curves.gemm):
        unit = "rows" if c is curves.gemm else "GFLOP"
        print(f"  {c.name}: " + ", ".join(
            f"{x:.0f} {unit} {r / 1e12:.0f}" if unit == "rows" else f"{x / 1e9:.3g} {unit} {r / 1e12:.0f}"
            for x, r in c.points) + " TFLOP/s")
    rates, fit_report = fit(meas, shape, hw, max_gpus=args.fit_on, curves=curves)
    val = validate(meas, rates, shape, hw)
    print(f"fit (runs of <= {args.fit_on} GPUs): attention x{rates.attention:.3f} of the kernel curves, "
          f"merge {fit_report['attention']['merge_ps_per_element']:.2f} ps/element, in-model attention x"
          f"{rates.model_attn:.3f}, dense {1e6 * rates.dense_per_token:.2f} us/token ("
          + (f"GEMMs of <= {curves.gemm.points[0][0]:.0f} rows" if len(curves.gemm.points) > 1
             else "constant GEMM rate")
          + f") + {rates.dense_const:.3f} s, "
          f"vision {1e3 * rates.vision_per_group:.3f} ms/group + {rates.vision_const:.3f} s")
    for pt in fit_report["attention"]["points"]:
        print(f"  layer fit: {pt['algo']:<22} W={pt['world']} n={pt['context']:>7}: measured {pt['measured_ms']:8.2f} ms, "
              f"fitted {pt['fitted_ms']:8.2f} ms")
    print("\nvalidation: 4-GPU prefill TTFT (s), predicted from the fit above")
    print(_fmt_table(val["prefill"], ["n", "algo", "measured_ttft", "predicted_ttft", "error",
                                      "measured_attention", "predicted_attention"],
                     ["n", "algo", "measured", "predicted", "error", "attn meas", "attn pred"]))
    print(_fmt_table(val["attention_layer"], ["algo", "context", "measured_ms", "predicted_ms", "error"],
                     ["4-GPU layer", "n", "measured ms", "predicted ms", "error"]))
    print(f"max |error| {100 * val['max_abs_error']:.1f}% (spava/apb/star/ring: "
          f"{100 * val['max_abs_error_main_algos']:.1f}%), mean {100 * val['mean_abs_error']:.1f}%, "
          f"{val['within_10pct']}/{val['total']} within 10%")
    rows, full = predictions(rates, shape, hw, shard_weights=args.shard_weights)
    print("\npredictions (TTFT s; exposed comm share of TTFT):")
    table = [dict(gpus=r["gpus"], n=r["n"], algo=r["algo"],
                  ttft=f"{r['ttft']:.3f}" if r.get("feasible") else "n/a",
                  exposed=f"{100 * r['exposed_comm_share']:.1f}%" if r.get("feasible") else "",
                  vs_ring=r.get("speedup_vs_ring", ""), vs_full=r.get("speedup_vs_full_1gpu", ""))
             for r in rows]
    print(_fmt_table(table, ["gpus", "n", "algo", "ttft", "exposed", "vs_ring", "vs_full"],
                     ["GPUs", "tokens", "algo", "TTFT", "exposed", "vs ring", "vs full"]))
    notes = findings(rows, shape, rates, hw)
    print("\n" + "\n".join(f"- {s}" for s in notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=asdict(shape), hardware=asdict(hw), rates=asdict(rates), fit=fit_report,
                           validation=val, full_1gpu_ttft=full, predictions=rows, findings=notes,
                           note="validation and fit rows are measured (with their source files); "
                                "everything under predictions is predicted"), f, indent=1)
    if args.plot:
        plot(rows, full, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
