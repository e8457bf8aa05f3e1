"""`ring`: exact ZigZag ring attention, the exact context-parallel baseline.

The whole prompt (context and query, S tokens) is cut into 2W contiguous chunks of
ceil(S / 2W) tokens (the last may be short); rank r holds chunks r and 2W-1-r, so
every rank does the same causal work. K/V travel around the ring in W-1 steps; each
step's transfer overlaps the attention of the step before. Chunk i attends to chunk j
fully when j < i, causally when j == i, not at all when j > i; partials merge by LSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import SpavaConfig
from .. import profiling
from ..distributed import check_inputs, ring_exchange
from ..ops.attention import attend, merge_partials
from ..perf.work import Call, Comm, LayerRequest, LayerWork, Op, Shape, dense_split
from .base import Layout, check_lengths, split_len, zigzag_pair


@dataclass(frozen=True)
class RingLayout(Layout):
    """ZigZag layout of the whole prompt. context_len: n; query_len: l_q; cp_size: W;
    chunk_len: ceil((n + l_q) / 2W). config: only its `kernel` and `check_ranks_agree`
    are used. Every token is held by exactly one rank."""

    chunk_len: int
    default_algo = "ring"

    @classmethod
    def plan(cls, *, context_len: int, query_len: int, cp_size: int,
             config: Optional[SpavaConfig] = None) -> "RingLayout":
        """Plan the ring layout; raises ValueError when 2W chunks cannot all hold a token."""
        config = check_lengths("ring layout", context_len, query_len, cp_size, config)
        chunk = split_len(context_len + query_len, 2 * cp_size, who="ring layout",
                          subject="prompt", unit="chunk",
                          hint="Use a longer prompt or fewer ranks")
        return cls(context_len, query_len, cp_size, chunk, config=config)

    def chunk_range(self, c: int) -> Tuple[int, int]:
        """Global [start, end) of chunk c."""
        start = c * self.chunk_len
        return start, min(start + self.chunk_len, self.total_len)

    def chunks_of(self, rank: int) -> Tuple[int, int]:
        self.check_rank(rank)
        return zigzag_pair(rank, self.cp_size)

    def local_len(self, rank: int) -> int:
        return sum(hi - lo for lo, hi in map(self.chunk_range, self.chunks_of(rank)))

    def local_indices(self, rank: int) -> torch.Tensor:
        """LongTensor [local_len(rank)]: the global positions of chunks r and 2W-1-r."""
        return torch.cat([torch.arange(*self.chunk_range(c)) for c in self.chunks_of(rank)])

    def owned_rows(self, rank: int) -> torch.Tensor:
        return torch.ones(self.local_len(rank), dtype=torch.bool)  # nothing is replicated


def ring_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: RingLayout,
                   cp_group: Optional[dist.ProcessGroup] = None,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Exact causal attention over the whole prompt, ZigZag ring over `cp_group`.

    q: [s_local, b, hq, d]; k, v: [s_local, b, hk, d] in `layout.local_indices(rank)`
    order. Returns [s_local, b, hq, d] in q's dtype.
    """
    rank, world = check_inputs(q, k, v, layout, cp_group, caller="ring_attn_func",
                               collective=layout.config.check_ranks_agree)
    kernel = layout.config.kernel
    d = k.shape[-1]
    mine = layout.chunks_of(rank)
    lens = [hi - lo for lo, hi in map(layout.chunk_range, mine)]
    q_chunks = [q[:lens[0]], q[lens[0]:]]

    # K|V packed along the last dim and padded to two full chunks, so that every rank
    # sends and receives the same shape.
    slot = 2 * layout.chunk_len
    buf = k.new_zeros(slot, *k.shape[1:-1], 2 * d)
    buf[: k.shape[0], ..., :d] = k
    buf[: k.shape[0], ..., d:] = v
    acc = [None, None]  # running (out, lse) of each local chunk
    for step in range(world):
        src = (rank - step) % world
        pending = None
        if step < world - 1:  # pass the buffer on while this step computes
            pending = ring_exchange(buf, cp_group, rank, world)
        src_chunks = layout.chunks_of(src)
        src_lens = [hi - lo for lo, hi in map(layout.chunk_range, src_chunks)]
        offsets = [0, src_lens[0]]
        for i, qc in zip(mine, range(2)):
            for j, off, length in zip(src_chunks, offsets, src_lens):
                if j > i:
                    continue
                kv = buf[off:off + length]
                part = attend(q_chunks[qc], kv[..., :d], kv[..., d:], causal=(j == i),
                              scale=softmax_scale, kernel=kernel)
                if acc[qc] is None:
                    acc[qc] = part
                else:
                    with profiling.region("merge", q):
                        acc[qc] = merge_partials([acc[qc], part])
        if pending is not None:
            buf = pending()
    out = torch.empty_like(q)  # the two chunks' float32 outputs, cast once into place
    out[:lens[0]] = acc[0][0]
    out[lens[0]:] = acc[1][0]
    return out


def ring_ops(layout: RingLayout, r: int, shape: Shape, tp: int, group: List[int],
             weights: Optional[Comm], heads_frac: float = 1.0, name: str = "kv") -> List[Op]:
    """The ops `ring_attn_func` runs on CP rank r: W steps, each attending its two chunks to
    the two chunks it holds, the next step's K|V (2 chunk slots) in flight meanwhile."""
    W = layout.cp_size
    hf = heads_frac / tp
    hk, d, hq = shape.kv_heads * heads_frac / tp, shape.head_dim, shape.heads * hf
    me = group[r]
    local = layout.local_len(r)
    pre = dense_split(shape)
    ops = [Op(comm=weights)] if weights is not None else []
    ops.append(Op(dense=pre * local, gemm_rows=local))
    mine = layout.chunks_of(r)
    lens = [hi - lo for lo, hi in map(layout.chunk_range, mine)]
    slot = int(2 * layout.chunk_len * hk * 2 * d * shape.act_bytes)
    started = [False, False]
    send_to, recv_from = group[(r + 1) % W], group[(r - 1) % W]
    n_comm = 1 if weights is not None else 0
    for step in range(W):
        pending = None
        if step < W - 1:
            ops.append(Op(comm=Comm("p2p", group, slot, me, (send_to, recv_from), name=f"{name}{step}")))
            pending = n_comm
            n_comm += 1
        src = layout.chunks_of((r - step) % W)
        src_lens = [hi - lo for lo, hi in map(layout.chunk_range, src)]
        calls, merged = [], 0.0
        for qc, i in enumerate(mine):
            for j, length in zip(src, src_lens):
                if j > i:
                    continue
                calls.append(Call(lens[qc], length, j == i, hf))
                if started[qc]:
                    merged += lens[qc] * hq * d * 2
                started[qc] = True
        ops.append(Op(calls=calls, merged=merged))
        if pending is not None:
            ops.append(Op(wait=pending))
    ops.append(Op(dense=(1 - pre) * local, gemm_rows=local))
    return ops


def ring_cost(req: LayerRequest) -> LayerWork:
    """`Algorithm.cost` of ring (exact: at CP size 1 it is full attention)."""
    if req.cp == 1:
        from .full import full_cost
        return full_cost(req)
    layout = RingLayout.plan(context_len=req.context, query_len=req.query, cp_size=req.cp)
    ops = [ring_ops(layout, r, req.shape, req.tp, list(req.group), req.weights_of(r)) for r in range(req.cp)]
    return LayerWork(layout, tuple(layout.local_len(r) for r in range(req.cp)), ops)
