"""Context-parallel attention algorithms behind one interface (SPAVA.md section 5).

    layout = plan_layout(algo, context_len=n, query_len=lq, cp_size=W, config=cfg)
    idx = layout.local_indices(rank)               # same contract for every algo
    out = cp_attn_func(q, k, v, layout=layout, cp_group=group, softmax_scale=None)

The algorithms are the entries of `registry` (`names()` lists them); today:

  full   exact causal attention, no context parallelism (W must be 1)
  ring   exact ZigZag ring attention over the whole prompt
  star   Star Attention: anchor as long as a block, no passing blocks, exact query
  apb    one block per rank, no overlap, passing budget doubled
  spava  everything in SPAVA.md
  megatron  Megatron's own CP (TE's TEDotProductAttention), where Transformer Engine imports

star, apb and spava are the Spava core with the switches their presets set, so each
ablation is one config field on one code path. `base.py` states the interface an
algorithm meets; adding one is a module here and one registry line.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..config import SpavaConfig
from .base import Algorithm, Layout
from .full import FullLayout, full_attn_func
from .registry import (ablation_chain, ablation_variants, benchmark_variants, get, names,
                       parse_variant, register, register_module, registered, unregister,
                       variant_config)
from .ring import RingLayout, ring_attn_func
from .spava import SpavaLayout, apb_preset, star_preset


def config_for(algo: str, config: Optional[SpavaConfig] = None) -> SpavaConfig:
    """The SpavaConfig `algo` runs with: `config` through the algorithm's preset (which
    combines with, or refuses, what `config` sets explicitly)."""
    return get(algo).config(config)


def plan_layout(algo: str, *, context_len: int, query_len: int, cp_size: int,
                config: Optional[SpavaConfig] = None) -> Layout:
    """Plan the per-request layout of `algo` (query_len=0: a context-only pass). Pure;
    raises ValueError for bad sizes or conflicting settings."""
    entry = get(algo)
    layout = entry.layout.plan(context_len=context_len, query_len=query_len, cp_size=cp_size,
                               config=entry.config(config))
    if layout.algo != algo:
        from dataclasses import replace
        layout = replace(layout, algo=algo)
    return layout


def cp_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Layout,
                 cp_group: Optional[dist.ProcessGroup] = None,
                 softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Run the algorithm `layout` was planned for (`layout.algo`). q: [s_local, b, hq, d];
    k, v: [s_local, b, hk, d] -> [s_local, b, hq, d]."""
    entry = get(layout.algo)
    if entry.attn_func is None:
        raise ValueError(
            f"context-parallel algorithm {entry.name!r} runs in its own core-attention module "
            f"({entry.core_attention.__name__}), not through cp_attn_func: build the model with "
            f"megatron_spava.specs.get_gpt_layer_spec(..., algo={entry.name!r})")
    return entry.attn_func(q, k, v, layout=layout, cp_group=cp_group, softmax_scale=softmax_scale)


def __getattr__(name: str):
    if name == "ALGOS":  # the registered names (kept for older callers; use names())
        return names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Algorithm", "FullLayout", "Layout", "RingLayout", "SpavaLayout", "ablation_chain",
           "ablation_variants", "apb_preset", "benchmark_variants", "config_for", "cp_attn_func",
           "full_attn_func", "get", "names", "parse_variant", "plan_layout", "register",
           "register_module", "registered", "ring_attn_func", "star_preset", "unregister",
           "variant_config"]
