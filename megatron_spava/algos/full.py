"""`full`: exact causal attention on one rank, no context parallelism (the paper's
"FlashAttn" baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..config import SpavaConfig
from ..distributed import check_inputs
from ..ops.attention import attend
from ..perf.work import Call, LayerRequest, LayerWork, Op, dense_split
from .base import Layout, check_lengths


@dataclass(frozen=True)
class FullLayout(Layout):
    """One rank holds the whole prompt in order; cp_size is 1."""

    default_algo = "full"

    @classmethod
    def plan(cls, *, context_len: int, query_len: int, cp_size: int = 1,
             config: Optional[SpavaConfig] = None) -> "FullLayout":
        config = check_lengths("full layout", context_len, query_len, cp_size, config)
        if cp_size != 1:
            raise ValueError(f"context-parallel algorithm 'full' runs without context "
                             f"parallelism, but cp_size={cp_size}; use ring for exact CP")
        return cls(context_len, query_len, 1, config=config)

    def local_len(self, rank: int) -> int:
        self.check_rank(rank)
        return self.total_len

    def local_indices(self, rank: int) -> torch.Tensor:
        self.check_rank(rank)
        return torch.arange(self.total_len)

    def owned_rows(self, rank: int) -> torch.Tensor:
        return torch.ones(self.local_len(rank), dtype=torch.bool)


def full_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: FullLayout,
                   cp_group: Optional[dist.ProcessGroup] = None,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention over the whole prompt on one rank. q: [s, b, hq, d]; k, v:
    [s, b, hk, d] -> [s, b, hq, d]."""
    check_inputs(q, k, v, layout, cp_group, caller="full_attn_func", collective=False)
    return attend(q, k, v, causal=True, scale=softmax_scale, kernel=layout.config.kernel)[0]


def full_cost(req: LayerRequest) -> LayerWork:
    """`Algorithm.cost` of full: one rank, the whole prompt, one causal call (no weight
    sharding: req.weights is ignored). Exact CP algorithms charge this at CP size 1."""
    S, shape, tp = req.tokens, req.shape, req.tp
    layout = FullLayout.plan(context_len=req.context, query_len=req.query, cp_size=1)
    ops = [[Op(dense=dense_split(shape) * S, gemm_rows=S), Op(calls=[Call(S, S, True, 1.0 / tp)]),
            Op(dense=(1 - dense_split(shape)) * S, gemm_rows=S)]]
    return LayerWork(layout, (S,), ops)
