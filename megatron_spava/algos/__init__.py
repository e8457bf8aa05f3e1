"""Context-parallel attention algorithms behind one interface (SPAVA.md section 5).

    layout = plan_layout(algo, context_len=n, query_len=lq, cp_size=W, config=cfg)
    idx = layout.local_indices(rank)               # same contract for every algo
    out = cp_attn_func(q, k, v, layout=layout, cp_group=group, softmax_scale=None)

  full   exact causal attention, no context parallelism (W must be 1)
  ring   exact ZigZag ring attention over the whole prompt
  star   Star Attention: anchor as long as a block, no passing blocks, exact query
  apb    one block per rank, no overlap, passing budget doubled
  spava  everything in SPAVA.md

star, apb and spava are the Spava core with the switches `config_for` sets, so each
ablation is one config field on one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..config import SpavaConfig
from ..core_attention import spava_attn_func
from ..distributed import check_inputs
from ..layout import SpavaLayout
from ..ops.attention import attend
from .ring import RingLayout, ring_attn_func

ALGOS = ("full", "ring", "star", "apb", "spava")


@dataclass(frozen=True)
class FullLayout:
    """No context parallelism: one rank holds the whole prompt in order."""

    context_len: int
    query_len: int
    cp_size: int = 1
    config: SpavaConfig = field(default_factory=SpavaConfig)

    def local_len(self, rank: int) -> int:
        return self.context_len + self.query_len

    def local_indices(self, rank: int) -> torch.Tensor:
        return torch.arange(self.context_len + self.query_len)


Layout = Union[FullLayout, RingLayout, SpavaLayout]


def config_for(algo: str, config: Optional[SpavaConfig] = None) -> SpavaConfig:
    """The SpavaConfig that makes the Spava core run `algo` (SPAVA.md section 5); the
    budgets and kernel of `config` carry over."""
    config = config or SpavaConfig()
    if algo not in ALGOS:
        raise ValueError(f"unknown context-parallel algorithm {algo!r}; choose from {ALGOS}")
    if algo == "star":
        return config.replace(anchor_len="block", passing=False, zigzag=False)
    if algo == "apb":
        return config.replace(zigzag=False, overlap=False,
                              passing_scale=2 * config.passing_scale)
    return config


def plan_layout(algo: str, *, context_len: int, query_len: int, cp_size: int,
                config: Optional[SpavaConfig] = None) -> Layout:
    """Plan the per-request layout of `algo`. Pure; raises ValueError for bad sizes."""
    config = config_for(algo, config)
    if algo == "full":
        if cp_size != 1:
            raise ValueError(f"context-parallel algorithm 'full' runs without context "
                             f"parallelism, but cp_size={cp_size}; use ring for exact CP")
        if context_len < 1 or query_len < 0:
            raise ValueError(f"full layout: bad lengths ({context_len}, {query_len})")
        return FullLayout(context_len, query_len, 1, config)
    if algo == "ring":
        return RingLayout.plan(context_len=context_len, query_len=query_len, cp_size=cp_size,
                               config=config)
    return SpavaLayout.plan(context_len=context_len, query_len=query_len, cp_size=cp_size,
                            config=config)


def full_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: FullLayout,
                   cp_group: Optional[dist.ProcessGroup] = None,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention over the whole prompt on one rank. Shapes as spava_attn_func."""
    check_inputs(q, k, v, layout, cp_group, caller="full_attn_func", collective=False)
    return attend(q, k, v, causal=True, scale=softmax_scale, kernel=layout.config.kernel)[0]


def cp_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Layout,
                 cp_group: Optional[dist.ProcessGroup] = None,
                 softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Run the algorithm `layout` was planned for. q: [s_local, b, hq, d];
    k, v: [s_local, b, hk, d] -> [s_local, b, hq, d]."""
    if isinstance(layout, SpavaLayout):
        fn = spava_attn_func
    elif isinstance(layout, RingLayout):
        fn = ring_attn_func
    elif isinstance(layout, FullLayout):
        fn = full_attn_func
    else:
        raise TypeError(f"not a context-parallel layout: {type(layout).__name__}")
    return fn(q, k, v, layout=layout, cp_group=cp_group, softmax_scale=softmax_scale)


__all__ = ["ALGOS", "FullLayout", "RingLayout", "SpavaLayout", "config_for", "cp_attn_func",
           "full_attn_func", "plan_layout", "ring_attn_func"]
