"""The distributed KV cache of SPAVA.md section 4.

After prefill, rank r keeps [A shard r | B_r | B_{2W-1-r}] (and rank 0 also Q) for Spava
layouts, its two chunks for ring, everything for full: every token is cached on exactly
one rank. Passing blocks are never cached.

A decode step runs the new token on every rank; each rank attends to its own cache, and
the partial (out, lse) are all-gathered and merged, which is exact over the whole cache.
The new token's K/V go to one rank, the one holding the fewest cached tokens (ties: the
lowest rank) - (beyond) in SPAVA.md, so that long answers stay balanced. Every rank keeps
the same length bookkeeping, so they agree on the owner without communicating.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..layout import SpavaLayout


def cache_rows(layout, rank: int) -> Tensor:
    """LongTensor of the local rows `rank` keeps in its KV cache after prefill."""
    if not isinstance(layout, SpavaLayout):  # ring and full hold each token once already
        return torch.arange(layout.local_len(rank))
    seg = layout.segments(rank)
    parts = [torch.arange(*seg.anchor_shard), torch.arange(seg.blocks[0][1], seg.blocks[-1][2])]
    if rank == 0:
        parts.append(torch.arange(*seg.query))
    return torch.cat(parts)


class DistributedKVCache:
    """This rank's share of every layer's K/V, with room for `max_new_tokens` decoded tokens.

    layout: the prefill layout; cp_rank / cp_size: this rank in the CP group.
    """

    def __init__(self, layout, cp_rank: int, cp_size: int, max_new_tokens: int):
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.rows = cache_rows(layout, cp_rank)
        self.lengths: List[int] = [len(cache_rows(layout, r)) for r in range(cp_size)]
        self.capacity = self.lengths[cp_rank] + max_new_tokens
        self.keys: Dict[int, Tensor] = {}
        self.values: Dict[int, Tensor] = {}
        self.used: Dict[int, int] = {}
        self.owner: Optional[int] = None

    def store_prefill(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Keep this rank's cache rows of a layer's prefill k/v [s_local, b, hk, d]."""
        if self.rows.device != k.device:  # once, not per layer: a pageable copy syncs the stream
            self.rows = self.rows.to(k.device)
        rows = self.rows
        n = rows.numel()
        for store, t in ((self.keys, k), (self.values, v)):
            buf = t.new_empty(self.capacity, *t.shape[1:])
            torch.index_select(t, 0, rows, out=buf[:n])
            store[layer] = buf
        self.used[layer] = n

    def begin_token(self) -> int:
        """Choose the rank that stores the next decoded token (least loaded) and book it."""
        self.owner = min(range(self.cp_size), key=lambda r: (self.lengths[r], r))
        self.lengths[self.owner] += 1
        return self.owner

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store the decoded token's k/v [1, b, hk, d] if this rank owns it."""
        if self.owner != self.cp_rank:
            return
        n = self.used[layer]
        if n >= self.capacity:
            raise RuntimeError(f"KV cache full: {self.capacity} rows on rank {self.cp_rank}; "
                               f"raise max_new_tokens")
        self.keys[layer][n:n + 1] = k
        self.values[layer][n:n + 1] = v
        self.used[layer] = n + 1

    def kv(self, layer: int) -> Tuple[Tensor, Tensor]:
        n = self.used[layer]
        return self.keys[layer][:n], self.values[layer][:n]
