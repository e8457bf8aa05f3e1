"""Measured kernel rates against call size (the attention and GEMM curves of one H200's
benchmark files) and the rates the time model charges: what one call or op costs."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Tuple

from .work import Call, Hardware, Op, Shape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
BENCH = os.path.join(ROOT, "benchmarks")


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
