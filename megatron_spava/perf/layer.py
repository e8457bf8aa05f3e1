"""One layer of a named algorithm or variant on a prompt of about n tokens over a TP x CP grid:
every rank's ops (from the registry entry's cost, `algos.registry.cost_of`), its traffic by
link, and the FLOPs each rank must do in one prefill (`rank_flops`, the roofline's)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..config import SpavaConfig, round_up
from . import inputs
from .work import Comm, Hardware, LayerRequest, Op, Plan, Shape

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
