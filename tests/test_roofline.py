"""The roofline floor of the prefill benchmark (megatron_spava.perf.bench_prefill): the FLOPs it charges each rank (vision
encoder, dense layers, attention; perf.layer's per-rank ops (the registry entries' costs) and the model
packages' `vision_flops`) against the FLOPs the real prefill executes, counted by PyTorch's
own `torch.utils.flop_counter.FlopCounterMode` inside `generate` on gloo ranks, per rank,
for the three model families and every layout family. The counter sees the matrix products
(aten.mm / addmm) and, through a mapping given here, the CPU attention kernel (4 b h sq sk d
FLOPs per call, halved for a causal call: the same convention as the floor)."""

import os
import re

import pytest
import torch
import torch.distributed as dist

from megatron_spava.perf import inputs as prompts
from megatron_spava.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 1200


def _bench_prefill():
    from megatron_spava.perf import bench_prefill
    return bench_prefill


def _cpu_attention_flops(q, k, v, dropout=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    """FLOPs of aten._scaled_dot_product_flash_attention_for_cpu from its shapes [b, h, s, d]."""
    b, h, sq, d = q
    return int(4 * b * h * sq * k[2] * d / (2 if is_causal else 1))


def _split(counts) -> dict:
    """Counted FLOPs of one generate call: vision (everything outside the language model),
    dense (the decoder layers' four linears), attention (the decoder's attention kernel calls)."""
    attn_op = "aten._scaled_dot_product_flash_attention_for_cpu"
    total = sum(counts["Global"].values())
    lm = [k for k in counts if re.search(r"\.language_model\.[^.]+$", k)]  # its top-level modules
    assert any(k.endswith(".decoder") for k in lm), sorted(counts)
    linears = [k for k in counts if "language_model.decoder.layers." in k
               and k.rsplit(".", 1)[-1] in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")]
    decoder = [k for k in counts if k.endswith("language_model.decoder")]
    return dict(vision=total - sum(sum(counts[k].values()) for k in lm),
                dense=sum(sum(counts[k].values()) for k in linears),
                attention=counts[decoder[0]].get(attn_op, 0))


def _count(family: str, variants):
    """On this rank: the counted and the floor's FLOPs of a tiny model's prefill per variant."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_spava import cpu_compat
    from megatron_spava.inference.generate import generate
    cpu_compat.apply()
    bp = _bench_prefill()
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    out = {}
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    for cp in sorted({1 if bp.one_rank(v) else world for v in variants}):
        model, ps = bp.build("tiny", cp, 0, device, model=family)
        inputs = prompts.synthetic_inputs(model.cfg, TOKENS, 0)
        for variant in variants:
            if bp.one_rank(variant) != (cp == 1):  # the registry entry's Algorithm.one_rank
                continue
            name, config = bp.algo_and_config(variant)
            with FlopCounterMode(display=False, custom_mapping=mapping, depth=None) as fc:
                generate(model, inputs, algo=name, config=config, cp_group=ps.get_context_parallel_group(),
                         max_new_tokens=1, eos_token_ids=[], device=device)
            counted = _split({str(k): {str(o): c for o, c in v.items()} for k, v in fc.get_flop_counts().items()})
            rates = dict(gemm_flops_per_s=1.0, attention_flops_per_s=1.0)
            floor = bp.rank_flops(model.cfg, TOKENS, variant, cp)[ps.get_context_parallel_rank()]
            out[variant] = dict(counted=counted, floor=floor, rank=rank,
                                busiest=bp.roofline(model.cfg, TOKENS, variant, cp, rates)["floor_s"],
                                total=sum(floor.values()))
    return out


VARIANTS = ["full", "ring", "spava", "apb", "star", "spava-no-zigzag", "spava-no-frame-parallel"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl3", "qwen3_vl"])
def test_floor_flops_are_the_flops_the_prefill_executes(family):
    per_rank = run_ranks(_count, 2, family, VARIANTS, timeout=300)
    for variant in VARIANTS:
        for r in per_rank:
            got, want = r[variant]["counted"], r[variant]["floor"]
            for part in ("vision", "dense", "attention"):
                assert want[part] > 0, (variant, part)
                # exact: selection scoring, merges, norms, the LM head lie outside the counted parts
                assert got[part] == pytest.approx(want[part], rel=1e-9), (family, variant, r["rank"], part, got, want)
        # the floor is the busiest rank's (rates of 1 FLOP/s: the floor in seconds is in FLOPs)
        assert per_rank[0][variant]["busiest"] == pytest.approx(max(r[variant]["total"] for r in per_rank))


def test_floor_of_the_7b_shape_on_h200_rates():
    """The 7B-shaped floor at 128K tokens on 4 GPUs, at the H200 rates BENCHMARKS.md quotes
    (GEMM 692, causal attention 602 TFLOP/s), by hand: full's attention is 28 layers x
    4 hq d S^2 / 2 at 602 TFLOP/s; ring's is a quarter of it; spava's dense work covers its
    local tokens (the replicated anchor and query included)."""
    bp = _bench_prefill()
    cfg = bp.model_config("7b")
    rates = dict(gemm_flops_per_s=692e12, attention_flops_per_s=602e12)
    _, context, query = prompts.prompt_lengths(131072, cfg)
    S = context + query
    full = bp.roofline(cfg, 131072, "full", 4, rates)
    assert full["attention_s"] == pytest.approx(28 * 4 * 28 * 128 * S * S / 2 / 602e12, rel=1e-3)
    ring = bp.roofline(cfg, 131072, "ring", 4, rates)
    assert ring["attention_s"] == pytest.approx(full["attention_s"] / 4, rel=0.01)
    assert ring["dense_s"] == pytest.approx(full["dense_s"] / 4, rel=0.01)
    spava = bp.roofline(cfg, 131072, "spava", 4, rates)
    assert ring["dense_s"] < spava["dense_s"] < 1.1 * ring["dense_s"]
    assert spava["attention_s"] < ring["attention_s"] / 4
    assert spava["vision_s"] == pytest.approx(full["vision_s"] / 4, rel=0.01)
