"""The distributed KV cache of SPAVA.md section 4.

After prefill each rank keeps its layout's `cache_rows` of every layer's K/V: for Spava
[A shard r | B_r | B_{2W-1-r}] (and rank 0 also Q), for ring its two chunks, for full
everything. Every token is cached on exactly one rank; passing blocks are never cached.

Tokens added after the prefill (a decoded token, or a whole query in the second pass of
fuse_query=False) run on every rank; each rank attends to its own cache, and the partial
(out, lse) are all-gathered and merged, which is exact over the whole cache. Their K/V go
to one rank, the one holding the fewest cached tokens (ties: the lowest rank) - (beyond)
in SPAVA.md, so that long answers stay balanced. Every rank keeps the same length
bookkeeping, so they agree on the owner without communicating.

Lifecycle of one step that adds m tokens (the decode loop and the query pass):

    cache.begin_tokens(m)          # once per step, on every rank: books the owner
    with cp_request(layout, cache=cache, decode=True):
        model(x_new)               # every layer's attention appends once, then attends

A layer appending twice in one step, or before any `begin_tokens`, raises RuntimeError:
the bookkeeping would otherwise drift silently. `snapshot()` / `restore()` roll the cache
back, e.g. to the context alone between questions about one video.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor


def cache_rows(layout, rank: int) -> Tensor:
    """LongTensor of the local rows `rank` keeps in its KV cache after prefill
    (`layout.cache_rows(rank)`)."""
    return layout.cache_rows(rank)


class DistributedKVCache:
    """This rank's share of every layer's K/V, with room for `max_new_tokens` rows added
    after the prefill (decoded tokens, and a query's rows in a second pass).

    layout: the prefill layout; cp_rank / cp_size: this rank in the CP group.
    """

    def __init__(self, layout, cp_rank: int, cp_size: int, max_new_tokens: int):
        if layout.cp_size != cp_size:
            raise ValueError(f"DistributedKVCache: the layout was planned for cp_size="
                             f"{layout.cp_size}, the cache for {cp_size} ranks")
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.rows = layout.cache_rows(cp_rank)
        self.lengths: List[int] = [len(layout.cache_rows(r)) for r in range(cp_size)]
        self.capacities = [n + max_new_tokens for n in self.lengths]  # known on every rank
        self.capacity = self.capacities[cp_rank]
        self.keys: Dict[int, Tensor] = {}
        self.values: Dict[int, Tensor] = {}
        self.used: Dict[int, int] = {}
        self.owner: Optional[int] = None  # the rank storing the current step's tokens
        self.step = 0  # steps begun; each layer appends once per step
        self.step_tokens = 0  # tokens the current step adds (0: no step begun)
        self._appended: Dict[int, int] = {}  # layer -> the step it last appended in

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

    def begin_tokens(self, m: int = 1) -> int:
        """Start a step that adds `m` tokens on every rank: choose the rank that stores
        them (least loaded) and book them. Returns the owner."""
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"begin_tokens: m must be an integer >= 1, got {m!r}")
        owner = min(range(self.cp_size), key=lambda r: (self.lengths[r], r))
        if self.lengths[owner] + m > self.capacities[owner]:  # the same on every rank: no hang
            raise RuntimeError(f"KV cache full: {m} more token(s) do not fit in the "
                               f"{self.capacities[owner]} rows of rank {owner}; raise max_new_tokens")
        self.owner = owner
        self.lengths[owner] += m
        self.step += 1
        self.step_tokens = m
        return self.owner

    def begin_token(self) -> int:
        """`begin_tokens(1)`: one decode step."""
        return self.begin_tokens(1)

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store the step's k/v [m, b, hk, d] of `layer` if this rank owns them. Raises
        RuntimeError when the step was not begun (`begin_tokens`) or this layer already
        appended in it, or when m differs from the booked count."""
        if self.step_tokens == 0:
            raise RuntimeError("KV cache: a decode step ran without cache.begin_token(): call "
                               "cache.begin_token() (or begin_tokens(m)) before every step that "
                               "adds tokens, on every rank")
        if self._appended.get(layer) == self.step:
            raise RuntimeError(f"KV cache: layer {layer} already appended in step {self.step}: "
                               f"call cache.begin_token() before every decode step")
        if k.shape[0] != self.step_tokens:
            raise RuntimeError(f"KV cache: step {self.step} booked {self.step_tokens} token(s) "
                               f"but layer {layer} adds {k.shape[0]}")
        if layer not in self.used:
            raise RuntimeError(f"KV cache: layer {layer} has no prefill in this cache; run the "
                               f"prefill with cp_request(..., cache=cache) first")
        self._appended[layer] = self.step
        if self.owner != self.cp_rank:
            return
        n, m = self.used[layer], k.shape[0]
        self.keys[layer][n:n + m] = k
        self.values[layer][n:n + m] = v
        self.used[layer] = n + m

    def kv(self, layer: int) -> Tuple[Tensor, Tensor]:
        """This rank's cached (k, v) of `layer`, [rows, b, hk, d] each."""
        n = self.used[layer]
        return self.keys[layer][:n], self.values[layer][:n]

    def snapshot(self) -> tuple:
        """The cache's state (lengths, rows used): `restore` rolls back to it. Rows added
        after it are overwritten by later steps; nothing is copied."""
        return tuple(self.lengths), dict(self.used)

    def restore(self, state: tuple) -> None:
        """Roll back to a `snapshot()` of this cache, on every rank alike."""
        lengths, used = state
        self.lengths, self.used = list(lengths), dict(used)
        self.owner, self.step_tokens = None, 0
