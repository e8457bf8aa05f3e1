"""The time model: one layer simulated as a compute stream and one NCCL stream per rank
(`simulate_layer`), a prefill's predicted TTFT (`predict`) and a rank's compute split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from ..algos.spava import SpavaLayout
from .layer import cp_ranks, layer_ops, tp_comms
from .rates import Rates, call_seconds, compute_seconds
from .work import Comm, Hardware, Op, Shape

GIB = 2 ** 30


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
