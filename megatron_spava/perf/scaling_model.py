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
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from ..algos.ring import RingLayout, ring_ops
from ..algos.spava import SpavaLayout
from ..algos.spava.cost import spava_ops
from ..config import SpavaConfig, round_up
from . import inputs
from .work import Call, Comm, Hardware, LayerRequest, Op, Plan, Shape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
BENCH = os.path.join(ROOT, "benchmarks")
GIB = 2 ** 30


def cp_ranks(world: int, tp: int) -> List[List[int]]:
    """Global ranks of every CP group, in Megatron's order (megatron_spava.placement)."""
    from megatron_spava.placement import megatron_groups
    return megatron_groups(world, tp, world // tp, "cp")


ALGOS = ["spava", "apb", "star", "ring", "megatron-p2p", "megatron-a2a", "megatron-a2a+p2p",
         "megatron-allgather", "spava-scaled-passing"]
MEASURED_VARIANTS = {"spava-no-overlap": dict(overlap=False), "spava-no-zigzag": dict(zigzag=False),
                     "spava-no-shard-anchor": dict(shard_anchor=False)}


def spava_config(algo: str, n: int, W: int) -> SpavaConfig:
    """The SpavaConfig of a named variant (bench_prefill's names, plus the scaled budget)."""
    if algo in MEASURED_VARIANTS:
        return SpavaConfig(**MEASURED_VARIANTS[algo])
    if algo == "spava-scaled-passing":  # the W = 8 default's passing share at any W
        default = round_up(n // 128, 128)
        return SpavaConfig(passing_len=max(128, round_up(default * 8 // max(W, 8), 128)))
    return SpavaConfig()


def _algorithm_of(algo: str) -> Tuple[str, Optional[str]]:
    """A scaling-model name -> (registry name, option): 'megatron-a2a' -> ('megatron', 'a2a');
    the Spava config variants (MEASURED_VARIANTS, spava-scaled-passing) -> ('spava', None)."""
    if algo in MEASURED_VARIANTS or algo == "spava-scaled-passing":
        return "spava", None
    name, _, option = algo.partition("-")
    return name, option or None


def layer_ops(algo: str, n_tokens: int, W: int, tp: int, shape: Shape, *,
              shard_weights: bool = True, lengths: Optional[Tuple[int, int, int]] = None,
              config: Optional[SpavaConfig] = None) -> Tuple[Plan, List[List[Op]]]:
    """Per CP rank, the ops of one layer of `algo` on a bench_prefill-style prompt of about
    n_tokens tokens over W GPUs (TP x CP). algo: a registry name, optionally with an option
    (megatron-a2a), or a config variant of spava (ALGOS, MEASURED_VARIANTS); its ops come
    from the registry entry's cost model (`algos.registry.cost_of`). lengths: (frame groups,
    context, query) of the prompt (default: bench_prefill's Qwen2.5-VL prompt of n_tokens);
    config: the config (default: the variant's). Returns (plan, ops per CP rank of CP group 0)."""
    from ..algos.registry import cost_of
    cp = W // tp
    groups_total, context, query = lengths or inputs.prompt_lengths(n_tokens)
    S = context + query
    group = cp_ranks(W, tp)[0]
    weights = None
    if shard_weights and cp > 1:
        weights = Comm("all_gather", group, int(shape.layer_params / tp / cp * shape.weight_bytes), 0,
                       name="weights")
    split = [round(i * groups_total / cp) for i in range(cp + 1)]
    fgroups = tuple(split[i + 1] - split[i] for i in range(cp))
    name, option = _algorithm_of(algo)
    work = cost_of(name)(LayerRequest(name, context, query, cp, tp, shape, tuple(group), weights,
                                      config or spava_config(algo, n_tokens, cp), option))
    one_rank = len(work.ops) == 1 and cp > 1  # an algorithm without CP: every frame group on it
    plan = Plan(algo, W, tp, cp, S, work.local_tokens, (groups_total,) if one_rank else fgroups, work.layout)
    return plan, work.ops


def tp_comms(plan: Plan, r: int, shape: Shape, W: int) -> List[Comm]:
    """Megatron's TP all-reduces of one layer (after attention and after the MLP) on CP rank r."""
    if plan.tp == 1:
        return []
    g = r * plan.tp  # CP rank r of TP rank 0 is global rank r * tp; its TP group follows it
    ranks = list(range(g, g + plan.tp))
    size = plan.local_tokens[r] * shape.hidden * shape.act_bytes
    return [Comm("all_reduce", ranks, size, g, name="tp_attn"), Comm("all_reduce", ranks, size, g, name="tp_mlp")]


def layer_traffic(algo: str, n_tokens: int, W: int, tp: int = 1, shape: Optional[Shape] = None,
                  hw: Optional[Hardware] = None, *, shard_weights: bool = True) -> List[Dict[str, object]]:
    """Bytes each CP rank (of CP group 0) sends and receives in one layer, by link, and per
    collective. Returns one dict per CP rank."""
    shape, hw = shape or Shape.of("7b"), hw or Hardware()
    plan, ops = layer_ops(algo, n_tokens, W, tp, shape, shard_weights=shard_weights)
    rows = []
    for r, rank_ops in enumerate(ops):
        comms = [o.comm for o in rank_ops if o.comm is not None] + tp_comms(plan, r, shape, W)
        total = {"nvlink_send": 0, "nvlink_recv": 0, "net_send": 0, "net_recv": 0}
        per = {}
        for c in comms:
            b = c.bytes_by_link(hw.gpus_per_node)
            per[c.name] = {k: per.get(c.name, {}).get(k, 0) + v for k, v in b.items()}
            for k, v in b.items():
                total[k] += v
        rows.append(dict(rank=r, local_tokens=plan.local_tokens[r], **total, by_collective=per))
    return rows


# ---------------------------------------------------------------------------------------
# Measured kernel rates against call size
# ---------------------------------------------------------------------------------------
ATTENTION_BENCH = tuple(f"2026-12-01-h200/bench_attention_{s}.json" for s in (2048, 4096, 8192, 16384)) + (
    "2026-11-21-h200x2/bench_attention.json",)
LAYER_BENCH = "2026-12-01-h200/bench_layers.json"


@dataclass(frozen=True)
class RateCurve:
    """A rate measured against the size of one kernel call. points: (size, rate) pairs,
    sizes increasing (attention: FLOPs of the call and FLOP/s; GEMMs: rows M, i.e. tokens,
    and FLOP/s). Between points log(rate) is linear in log(size) (a power law per interval),
    so the curve passes through every point, is monotone on every interval between two of
    them (it never overshoots the data), and a call's time (size / rate) grows with its size
    wherever the measured times do. Above the largest size the last rate holds. Below the smallest: with `floor`,
    the smallest call's *time* holds (a call is never cheaper than the smallest measured one;
    the measured attention times flatten there), else its rate holds.
    sources: the files the points come from, one per point."""

    name: str
    points: Tuple[Tuple[float, float], ...]
    floor: bool = True
    sources: Tuple[str, ...] = ()

    def __post_init__(self):
        sizes = [s for s, _ in self.points]
        if not self.points or any(b <= a for a, b in zip(sizes, sizes[1:])) or min(r for _, r in self.points) <= 0:
            raise ValueError(f"rate curve {self.name!r}: needs points of increasing size and positive rate, "
                             f"got {self.points}")

    def rate(self, size: float) -> float:
        """The rate at `size` (clamped to the measured range)."""
        pts = self.points
        if size <= pts[0][0]:
            return pts[0][1]
        for (s0, r0), (s1, r1) in zip(pts, pts[1:]):
            if size <= s1:
                f = math.log(size / s0) / math.log(s1 / s0)
                return r0 * (r1 / r0) ** f
        return pts[-1][1]

    def seconds(self, work: float) -> float:
        """Time of one call of `work` (size units x rate units = s); 0 for no work."""
        if work <= 0:
            return 0.0
        s0, r0 = self.points[0]
        if self.floor and work < s0:
            return s0 / r0
        return work / self.rate(work)

    def slowdown(self, size: float) -> float:
        """Time per unit of work at `size` over that at the smallest measured size."""
        return self.points[0][1] / self.rate(size)


def constant_curve(name: str, rate: float) -> RateCurve:
    """A size-independent rate (the `--constant-rates` ablation: the fit scales it)."""
    return RateCurve(name, ((1.0, rate),), floor=False, sources=("constant",))


@dataclass(frozen=True)
class KernelCurves:
    """Measured single-kernel rates on one H200 (never fitted to a prefill run):
    causal: one causal square (cuDNN through `attend`, 28/4 heads of 128, bf16) against its
    FLOPs (4 hq d sq sk / 2); full: unmasked rows x keys (the benchmark's "prefix" shape, S/4
    rows over 3S/4 keys) against its FLOPs; gemm: one 7B layer's four GEMMs against their rows."""

    causal: RateCurve
    full: RateCurve
    gemm: RateCurve


def _load_bench(path: str):
    with open(path if os.path.isabs(path) else os.path.join(BENCH, path)) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def measured_curves(constant: Tuple[str, ...] = ()) -> KernelCurves:
    """The KernelCurves from tools/bench_attention.py (--kernels cudnn: 2K-16K on
    2026-12-01, 64K on 2026-11-21) and tools/bench_layers.py (its attention and GEMM floors at
    32K and 128K). `constant`: names ("attention", "gemm") to replace by a constant rate."""
    points = {True: {}, False: {}}
    for path in ATTENTION_BENCH:
        d = _load_bench(path)
        a = d["args"]
        if (a["q_heads"], a["kv_heads"], a["head_dim"]) != (28, 4, 128):
            raise ValueError(f"{path}: the curves are of the 7B attention shape (28/4 heads of 128)")
        for r in d["results"]:
            if r["kernel"] == "cudnn" and "median_ms" in r:  # Spava's attend (not the MHA baseline)
                flops = 4 * a["q_heads"] * r["sq"] * r["sk"] * a["head_dim"] / (2 if r["causal"] else 1)
                points[r["causal"]][flops] = (flops / (r["median_ms"] / 1e3), f"benchmarks/{path}")
    layers = _load_bench(LAYER_BENCH)
    gemm = {}
    for S, f in layers["floor"].items():
        S = int(S)
        flops = 4 * 28 * S * S * 128 / 2
        # bench_layers' "sdpa_cudnn" is `attend(kernel="cudnn")`, GQA 28/4: the same call
        points[True].setdefault(flops, (flops / (f["attention_ms"]["sdpa_cudnn"] / 1e3), f"benchmarks/{LAYER_BENCH}"))
        gemm[S] = (f["gemm_tflops"] * 1e12, f"benchmarks/{LAYER_BENCH}")

    def curve(name, pts, floor):
        keys = sorted(pts)
        return RateCurve(name, tuple((k, pts[k][0]) for k in keys), floor, tuple(pts[k][1] for k in keys))

    causal = curve("attention, causal", points[True], True)
    full = curve("attention, unmasked", points[False], True)
    g = curve("dense GEMMs", gemm, False)
    if "attention" in constant:  # the 128K causal rate, a size the fit's layer runs have
        causal = full = constant_curve("attention, constant", causal.rate(4 * 28 * 131072 ** 2 * 128 / 2))
    if "gemm" in constant:
        g = constant_curve("dense GEMMs, constant", g.points[0][1])
    return KernelCurves(causal, full, g)


# ---------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------
@dataclass
class Rates:
    """Time constants (see fit()). curves: the measured single-kernel rates against call size
    (not fitted); attention: in-layer attention call time over the kernel curves' (fitted on
    the 1-2 GPU attention-layer runs); merge: s per float32 element merged; model_attn:
    in-model attention over the layer model (1-GPU prefill runs); dense_per_token: s per token
    for all layers at the GEMM rate of the GEMM curve's smallest measured size (larger GEMMs
    scale with the curve), plus a per-forward constant; vision: s per frame group and a
    constant."""

    attention: float = 1.0
    merge: float = 7.6e-12
    model_attn: float = 1.0
    algo_attn: Dict[str, float] = field(default_factory=dict)  # per algorithm, from 2-GPU prefill runs
    dense_per_token: float = 25e-6
    dense_const: float = 0.0
    vision_per_group: float = 3.7e-3
    vision_const: float = 0.0
    curves: KernelCurves = field(default_factory=measured_curves)


def call_seconds(c: Call, shape: Shape, rates: Rates, hw: Hardware) -> float:
    """One attention call: its FLOPs at the measured kernel rate for a call of that many
    FLOPs and that mask (causal / unmasked), times the fitted in-layer factor. The measured
    times include each call's fixed cost (launch, small-size inefficiency, wave fill), so
    nothing is added per call."""
    if c.rows == 0 or c.keys == 0:
        return 0.0
    flops = c.pairs() * shape.flop_per_pair
    curve = rates.curves.causal if c.causal else rates.curves.full
    return rates.attention * curve.seconds(flops)


def compute_seconds(op: Op, shape: Shape, rates: Rates, hw: Hardware, layers: int) -> float:
    attn = sum(call_seconds(c, shape, rates, hw) for c in op.calls)
    merge = op.merged * rates.merge + (hw.call_overhead if op.merged else 0.0)
    dense = op.dense * rates.dense_per_token * rates.curves.gemm.slowdown(op.gemm_rows) / layers
    return rates.model_attn * (attn + merge) + dense


@dataclass
class Timing:
    ttft: float
    vision: float
    llm: float
    attention: float
    compute_only_llm: float
    exposed_comm: float
    per_layer: float

    def as_dict(self):
        return {k: round(v, 6) for k, v in asdict(self).items()}


def simulate_layer(ops_per_rank: List[List[Op]], shape: Shape, rates: Rates, hw: Hardware,
                   start: Sequence[float], comm_free: float) -> Tuple[List[float], float, List[float]]:
    """One layer on every CP rank: compute in program order per rank; collectives on one
    FIFO stream, each starting when the last rank has launched it (and the stream is free).
    Returns (end time per rank, comm stream free time, attention compute per rank)."""
    R = len(ops_per_rank)
    n_comm = max(sum(1 for o in ops if o.comm is not None) for ops in ops_per_rank)
    launch = [[None] * n_comm for _ in range(R)]
    done = [None] * n_comm
    clock = list(start)
    attn = [0.0] * R
    idx = [0] * R
    comm_count = [0] * R
    durations = [None] * n_comm
    free = comm_free
    finished = 0
    # Advance ranks until each blocks on a wait whose collective is not yet done.
    while finished < R:
        progressed = False
        for r in range(R):
            ops = ops_per_rank[r]
            while idx[r] < len(ops):
                o = ops[idx[r]]
                if o.comm is not None:
                    k = comm_count[r]
                    launch[r][k] = clock[r]
                    durations[k] = max(durations[k] or 0.0, o.comm.seconds(hw))
                    comm_count[r] += 1
                elif o.wait is not None:
                    if done[o.wait] is None:
                        break
                    clock[r] = max(clock[r], done[o.wait])
                else:
                    t = compute_seconds(o, shape, rates, hw, shape.layers)
                    clock[r] += t
                    if o.calls or o.merged:
                        attn[r] += t
                idx[r] += 1
                progressed = True
        # Schedule collectives in order once every rank launched them.
        for k in range(n_comm):
            if done[k] is not None:
                continue
            if all(launch[r][k] is not None for r in range(R)):
                begin = max(free, max(launch[r][k] for r in range(R)))
                done[k] = begin + durations[k]
                free = done[k]
                progressed = True
            else:
                break
        finished = sum(1 for r in range(R) if idx[r] == len(ops_per_rank[r]))
        if not progressed and finished < R:
            raise RuntimeError("simulation deadlock: a wait on a collective some rank never launches")
    return clock, free, attn, done


def predict(algo: str, n_tokens: int, W: int, *, tp: int = 1, shape: Optional[Shape] = None,
            rates: Optional[Rates] = None, hw: Optional[Hardware] = None, shard_weights: bool = True,
            frame_parallel: bool = True) -> Dict[str, object]:
    """Predicted TTFT of `algo` for a bench_prefill prompt of about n_tokens on W GPUs."""
    shape, rates, hw = shape or Shape.of("7b"), rates or Rates(), hw or Hardware()
    if algo in rates.algo_attn:
        rates = replace(rates, model_attn=rates.model_attn * rates.algo_attn[algo])
    plan, ops = layer_ops(algo, n_tokens, W, tp, shape, shard_weights=shard_weights)
    cp = plan.cp
    group = cp_ranks(W, tp)[0]
    # Vision: frame groups of the busiest rank (TP splits the encoder), then the embeddings'
    # all-gather over CP (blocking).
    groups = max(plan.frame_groups) if frame_parallel else sum(plan.frame_groups)
    vision = rates.vision_const + rates.vision_per_group * groups / tp
    n_video = sum(plan.frame_groups) * shape.tokens_per_group
    emb_s = 0.0
    if frame_parallel and cp > 1:
        emb = Comm("all_gather", group, int(-(-n_video // cp) * shape.hidden * shape.act_bytes), 0)
        emb_s = emb.seconds(hw)
        vision += emb_s
    # LLM: layer by layer (the weight gather of the next layer runs under this one).
    start, free, t = [0.0] * cp, 0.0, 0.0
    attn_total, durations = 0.0, []
    tp_extra = sum(c.seconds(hw) for c in tp_comms(plan, 0, shape, W))  # not overlapped
    for layer in range(shape.layers):
        if len(durations) >= 2 and abs(durations[-1] - durations[-2]) < 1e-12:
            t += durations[-1] * (shape.layers - layer)  # steady state: every layer alike
            attn_total += attn_layer * (shape.layers - layer)
            break
        end, free, attn, done = simulate_layer(ops, shape, rates, hw, start, free)
        nxt = max(end) + tp_extra
        if ops[0] and ops[0][0].comm is not None and ops[0][0].comm.name == "weights":
            nxt = max(nxt, done[0])  # the next layer needs its weights
        durations.append(nxt - t)
        t, start = nxt, [nxt] * cp
        attn_layer = max(attn)
        attn_total += attn_layer
    llm = t + rates.dense_const
    compute_only = max(
        sum(compute_seconds(o, shape, rates, hw, shape.layers) for o in rank_ops if o.comm is None and o.wait is None)
        for rank_ops in ops) * shape.layers + rates.dense_const
    exposed = max(0.0, llm - compute_only) + emb_s  # the embeddings' all-gather blocks
    timing = Timing(ttft=vision + llm, vision=vision, llm=llm, attention=attn_total,
                    compute_only_llm=compute_only, exposed_comm=exposed,
                    per_layer=(llm - rates.dense_const) / shape.layers)
    return dict(algo=algo, tokens=plan.tokens, gpus=W, tp=tp, cp=cp, nodes=-(-W // hw.gpus_per_node),
                local_tokens=max(plan.local_tokens), **timing.as_dict(),
                exposed_comm_share=round(exposed / (vision + llm), 4))


# ---------------------------------------------------------------------------------------
# Fit and validation
# ---------------------------------------------------------------------------------------
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
                (one if algo == "full" else by_world.setdefault(prefill["world"], [])).append(row)
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


def rank_compute(algo: str, n_tokens: int, W: int, shape: Shape, rates: Rates, hw: Hardware) -> Dict[str, float]:
    """One layer's compute on the busiest CP rank (TP = 1, whole weights), in seconds, split
    into dense work, attention calls and merges; for Spava-family layouts also the share spent
    on what every rank repeats (the anchor's causal attention, the query's calls and the dense
    work of the anchor and query rows). kernel_tflops: the FLOP-weighted rate of its
    attention calls on the measured kernel curves (before the fitted factors)."""
    plan, ops = layer_ops(algo, n_tokens, W, 1, shape, shard_weights=False)
    layout = plan.layout
    best = None
    for r, rank_ops in enumerate(ops):
        dense = sum(compute_seconds(replace(o, calls=[], merged=0.0), shape, rates, hw, shape.layers)
                    for o in rank_ops if o.comm is None and o.wait is None)
        calls = [c for o in rank_ops for c in o.calls]
        attn = {}
        for c in calls:
            role = c.role or "other"
            attn[role] = attn.get(role, 0.0) + rates.model_attn * call_seconds(c, shape, rates, hw)
        merge = sum(rates.model_attn * (o.merged * rates.merge + hw.call_overhead) for o in rank_ops if o.merged)
        flops = sum(c.pairs() * shape.flop_per_pair for c in calls)
        kernel = sum(call_seconds(c, shape, replace(rates, attention=1.0), hw) for c in calls)
        total = dense + sum(attn.values()) + merge
        row = dict(rank=r, total=total, dense=dense, attention=sum(attn.values()), merge=merge,
                   kernel_tflops=flops / kernel / 1e12 if kernel else 0.0, calls=len(calls),
                   attention_by_role=attn)
        if isinstance(layout, SpavaLayout):
            repl_tokens = layout.anchor_len + layout.query_len
            repl = dense * repl_tokens / plan.local_tokens[r] + attn.get("anchor", 0.0) + attn.get("query", 0.0)
            row.update(replicated=repl, replicated_share=repl / total)
        if best is None or total > best["total"]:
            best = row
    return best


def dense_flops_per_token(shape: Shape) -> float:
    """Matrix-product FLOPs of one token through one decoder layer (2 per multiply-add: QKV,
    output projection, SwiGLU gate|up and down); biases, norms and RoPE not counted."""
    h, d = shape.hidden, shape.head_dim
    return 2.0 * (h * (shape.heads + 2 * shape.kv_heads) * d + shape.heads * d * h + 3 * h * shape.ffn)


def rank_flops(algo: str, n_tokens: int, W: int, shape: Shape, *,
               lengths: Optional[Tuple[int, int, int]] = None,
               config: Optional[SpavaConfig] = None, frame_parallel: bool = True) -> List[Dict[str, float]]:
    """The LLM work each CP rank must do in one prefill forward (TP = 1, all layers), from the
    same per-rank ops as the time model: {"dense": matrix-product FLOPs of its local tokens,
    "attention": FLOPs of its attention calls (4 hq d per row-key pair, causal halved),
    "tokens": its local tokens, "frame_groups": the vision groups it encodes (its slice under
    frame-parallel vision, else all)}. algo: a name of
    ALGOS ("megatron-allgather" for TE's all_gather) or "full"; lengths, config: as layer_ops.
    The LM head (the last token's logits) is not counted."""
    plan, ops = layer_ops(algo, n_tokens, W, 1, shape, shard_weights=False, lengths=lengths, config=config)
    out = []
    for r, rank_ops in enumerate(ops):
        pairs = sum(c.pairs() for o in rank_ops for c in o.calls)
        groups = plan.frame_groups[r] if frame_parallel and len(plan.frame_groups) > 1 else sum(plan.frame_groups)
        out.append(dict(tokens=plan.local_tokens[r], frame_groups=groups,
                        dense=shape.layers * plan.local_tokens[r] * dense_flops_per_token(shape),
                        attention=shape.layers * pairs * shape.flop_per_pair))
    return out


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
