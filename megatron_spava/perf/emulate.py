"""One rank of a W-rank context-parallel layout, run alone on one device (issue 25).

    megatron-spava-bench-prefill --shape 7b --tokens 131072 --algos spava full \\
        --emulate-cp 4                  # the busiest rank of 4 (--emulate-rank R: rank R)

The rank does exactly its own compute at its own sizes: its slice of the video's frame
groups, its local tokens through every layer, its 1/W shard of each layer's weights, its
attention calls from its layout. Every collective is replaced by a local stand-in that
moves no data between ranks but returns tensors of the true shapes: the process passes an
`EmulatedGroup(R, W)` wherever a CP group goes, and `megatron_spava.distributed` (the one
seam where the algorithms, frame-parallel vision and weight sharding issue collectives)
switches there (all-gather -> W local copies, ring exchange -> the rank's own buffer,
all-reduce / broadcast -> unchanged). The values that would come from other ranks are
therefore not the real ones: the run is for time and FLOPs, never for accuracy.

What this module adds to the benchmark (perf/bench_prefill.py, which also picks the rank:
`bench_prefill.busiest_rank`, from the registry entry's cost model, and collects the rank's
work: `bench_prefill.rank_work`): the model's switch (`emulate`), the floor per part
(`part_floors`) and the predicted TTFT with the measured all-gather times (`predicted_ttft`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from ..distributed import EmulatedGroup
from .work import Comm, Hardware

#: the parts of one rank's prefill the emulated run times and floors
PARTS = ("vision", "dense", "attention", "selection", "merges")


def emulate(model, group: EmulatedGroup):
    """Point the model's context-parallel modules (`SpavaCoreAttention`) at `group`, in
    place: its forward then runs as rank group.rank of group.world. Raises ValueError for a
    model whose core attention is not ours (Megatron's own CP attention, Transformer
    Engine's, issues its collectives inside TE: it cannot be emulated). Returns the model."""
    from ..modules import SpavaCoreAttention
    found = 0
    for m in model.modules():
        if isinstance(m, SpavaCoreAttention):
            m.cp_group = group
            found += 1
        elif type(m).__name__ == "TEDotProductAttention":
            raise ValueError("an emulated rank needs SpavaCoreAttention; Megatron's own context "
                             "parallelism (Transformer Engine's attention) issues its collectives "
                             "inside TE and cannot be emulated")
    if not found:
        raise ValueError("an emulated rank needs a model built with SpavaCoreAttention; found none")
    return model


def part_floors(work: dict, rates: dict) -> Dict[str, float]:
    """The floor of each part, in seconds: vision and dense FLOPs at the measured GEMM rate,
    attention FLOPs at the measured causal-attention rate, the LSE merges' float32 reads and
    the selection's read of K at the measured device-memory copy rate (reads + writes per
    second); "total" their sum. rates: bench_prefill.measure_rates' keys, plus optionally
    "dense_gemm_flops_per_s" (the dense layers' own rate: FP8's)."""
    f = work["flops"]
    bw = rates.get("copy_bytes_per_s") or float("inf")
    dense_rate = rates.get("dense_gemm_flops_per_s", rates["gemm_flops_per_s"])
    out = dict(vision=f["vision"] / rates["gemm_flops_per_s"], dense=f["dense"] / dense_rate,
               attention=f["attention"] / rates["attention_flops_per_s"],
               selection=work["selection_bytes"] / bw, merges=4.0 * work["merged"] / bw)
    out["total"] = sum(out.values())
    return out


def vision_gather(cfg, n: int, cp: int, me: int = 0) -> Optional[Comm]:
    """The frame-parallel vision all-gather of one prefill as one rank sees it: the video
    embeddings, about one row of the LLM's hidden size per prompt token, 1/cp per rank
    (bf16); None at cp 1."""
    if cp <= 1:
        return None
    return Comm("all_gather", list(range(cp)), int(math.ceil(n / cp) * cfg.hidden_size * 2), me, name="vision")


def predicted_ttft(measured_s: float, work: dict, cfg, n: int, cp: int, overlap: bool = True,
                   hw: Optional[Hardware] = None) -> dict:
    """A prediction, not a measurement: the emulated rank's measured time plus the
    all-gathers it would wait for, at the all-gather times measured on 4 H200 over NVLink
    (BENCHMARKS.md section 5, ../shared/ENVIRONMENT.md: 265 GB/s bus bandwidth at 16 MB per
    rank, 326 GB/s at 256 MB; `perf.work.Hardware`'s fit through both). The vision gather
    is synchronous (always added); the layers' collectives (weights prefetched a layer
    ahead, passing blocks and query partials in flight during the rank's own attention) are
    added only without overlap. Returns {"ttft_s", "ttft_no_overlap_s", "vision_gather_s",
    "layer_comm_s"} (layer_comm_s: all layers)."""
    hw = hw or Hardware()
    g = vision_gather(cfg, n, cp)
    vision = g.seconds(hw) if g is not None else 0.0
    layer = work["layers"] * sum(c.seconds(hw) for c in work["comms"])
    return dict(ttft_s=measured_s + vision + (0.0 if overlap else layer),
                ttft_no_overlap_s=measured_s + vision + layer, vision_gather_s=vision, layer_comm_s=layer)


def part_times(vision_s: float, llm_s: float, regions: dict) -> Dict[str, float]:
    """The measured parts of one run, in seconds: vision (generate's vision time), the
    regions timed inside the LLM (`profiling`: "attention" around every core-attention
    call, "selection" and "merge" inside it) split so that the parts add up to the TTFT:
    attention = the attention region less selection and merges, dense = the LLM time
    outside attention (the linears, and the norms, RoPE, embedding, LM head and the weight
    gathers' stand-ins around them)."""
    attn = regions.get("attention", 0.0)
    sel, merge = regions.get("selection", 0.0), regions.get("merge", 0.0)
    return dict(vision=vision_s, dense=llm_s - attn, attention=attn - sel - merge, selection=sel, merges=merge)


def check_args(emulate_rank: Optional[int], emulate_cp: Optional[int], te_cp_algos: List[str] = ()) -> Optional[str]:
    """Why --emulate-rank / --emulate-cp cannot run, or None. te_cp_algos: the requested
    algorithms that are Megatron's own CP (TE's attention: not emulable). Pure."""
    if emulate_rank is not None and emulate_cp is None:
        return "--emulate-rank needs --emulate-cp W (the layout's size)"
    if emulate_cp is None:
        return None
    if emulate_cp < 1:
        return f"--emulate-cp must be >= 1, got {emulate_cp}"
    if emulate_rank is not None and not 0 <= emulate_rank < emulate_cp:
        return f"--emulate-rank must be in [0, {emulate_cp}), got {emulate_rank}"
    if te_cp_algos:
        return (f"{', '.join(te_cp_algos)}: Megatron's own context parallelism runs its collectives inside "
                f"Transformer Engine and cannot be emulated; drop it from --algos")
    return None
