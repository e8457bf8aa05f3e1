"""Which tokens live on which rank (SPAVA.md section 1).

`SpavaLayout.plan` is pure: the same (n, l_q, W, config) gives the same layout on
every rank, with no torch.distributed call. Global positions are indices into the
original prompt `[context (n tokens) | query (l_q tokens)]`.

Rank r holds, in this local order::

    [A | B_r | B_{2W-1-r} | Q]       zigzag (two virtual hosts per rank)
    [A | B_r | Q]                    zigzag off (one block per rank)

A = [0, l_a) and Q = [n, n + l_q) are replicated on every rank. The context after the
anchor, [l_a, n), is cut into H = 2W (or W) contiguous blocks of
l_b = ceil((n - l_a) / H) tokens; the last one may be short but never empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .config import SpavaConfig, round_up

Range = Tuple[int, int]


@dataclass(frozen=True)
class LocalSegments:
    """Row ranges [lo, hi) of one rank's local sequence.

    anchor: rows of A. blocks: (virtual block id, lo, hi) in local order.
    query: rows of Q. anchor_shard: rows of A this rank contributes to the query rows.
    """

    anchor: Range
    blocks: Tuple[Tuple[int, int, int], ...]
    query: Range
    anchor_shard: Range


@dataclass(frozen=True)
class SpavaLayout:
    """A planned Spava layout; build it with `SpavaLayout.plan`.

    context_len: n. query_len: l_q. cp_size: W. anchor_len: l_a.
    block_len: l_b, the length of every virtual block but the last (which may be shorter).
    passing_len: tokens each block sends per KV head, min(budget, l_b); 0 when passing
      blocks are off. The last block's passing block is never read by anyone (no block
      comes after it), so it is the only one that may hold fewer real tokens.
    config: the SpavaConfig it was planned with (switches travel with the layout).
    """

    context_len: int
    query_len: int
    cp_size: int
    anchor_len: int
    block_len: int
    passing_len: int
    config: SpavaConfig

    @classmethod
    def plan(cls, *, context_len: int, query_len: int, cp_size: int,
             config: Optional[SpavaConfig] = None) -> "SpavaLayout":
        """Plan the layout of one request. Raises ValueError, naming the limit, when the
        sizes cannot make a valid layout."""
        config = SpavaConfig() if config is None else config
        for name, value, low in (("context_len", context_len, 1), ("query_len", query_len, 1),
                                 ("cp_size", cp_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Spava layout: {name} must be an integer >= {low}, got {value!r}")
        n, lq, world = context_len, query_len, cp_size
        if lq > config.max_query_len:
            raise ValueError(
                f"Spava layout: the query has {lq} tokens, more than max_query_len="
                f"{config.max_query_len}. The query is replicated and computed in full on every "
                f"rank; raise SpavaConfig.max_query_len if this is intended")
        num_blocks = 2 * world if config.zigzag else world
        if config.anchor_len is None:
            anchor = min(round_up(n // config.anchor_divisor, config.budget_align), n)
        elif config.anchor_len == "block":  # Star Attention: anchor as long as a block
            anchor = min(-(-n // (num_blocks + 1)), max(n - num_blocks, 0))
        elif config.anchor_len > n:
            raise ValueError(f"Spava layout: anchor_len={config.anchor_len} is longer than the "
                             f"context ({n} tokens)")
        else:
            anchor = config.anchor_len
        rest = n - anchor
        if rest < num_blocks:
            raise ValueError(
                f"Spava layout: context too short: {n} context tokens minus a {anchor}-token "
                f"anchor leaves {rest}, but cp_size={world} needs {num_blocks} virtual blocks "
                f"of at least one token (n - anchor_len >= {num_blocks}). Use a longer context, "
                f"a shorter anchor or fewer context-parallel ranks")
        block = -(-rest // num_blocks)
        if (num_blocks - 1) * block >= rest:
            raise ValueError(
                f"Spava layout: {rest} tokens after the anchor cut into {num_blocks} blocks of "
                f"ceil({rest}/{num_blocks})={block} tokens leave the last block empty. This only "
                f"happens below {num_blocks * (num_blocks - 1)} tokens after the anchor; change "
                f"the context or anchor length by a few tokens, or use fewer ranks")
        if not config.passing:
            passing = 0
        elif config.passing_len is None:
            default = round_up(n // config.passing_divisor, config.budget_align)
            passing = min(config.passing_scale * default, block)
        else:
            passing = min(config.passing_len, block)
        return cls(context_len=n, query_len=lq, cp_size=world, anchor_len=anchor,
                   block_len=block, passing_len=passing, config=config)

    # ---- virtual blocks -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """H: 2W virtual blocks with zigzag, W without."""
        return 2 * self.cp_size if self.config.zigzag else self.cp_size

    def block_range(self, v: int) -> Range:
        """Global [start, end) of virtual block v."""
        start = self.anchor_len + v * self.block_len
        return start, min(start + self.block_len, self.context_len)

    def blocks_of(self, rank: int) -> Tuple[int, ...]:
        """Virtual blocks held by `rank`, in local order: (r, 2W-1-r) or (r,)."""
        self._check_rank(rank)
        return (rank, 2 * self.cp_size - 1 - rank) if self.config.zigzag else (rank,)

    def rank_of_block(self, v: int) -> int:
        """The rank holding virtual block v: min(v, 2W-1-v) with zigzag, v without."""
        if not 0 <= v < self.num_blocks:
            raise ValueError(f"virtual block {v} out of range [0, {self.num_blocks})")
        return min(v, 2 * self.cp_size - 1 - v) if self.config.zigzag else v

    # ---- one rank's local sequence ----------------------------------------------------
    def anchor_shard(self, rank: int) -> Range:
        """Rows [lo, hi) of A that `rank` attends to for the query rows. With shard_anchor,
        A is cut into W contiguous shards of ceil(l_a / W) rows (trailing ones may be empty);
        without it, rank 0 takes all of A."""
        self._check_rank(rank)
        if not self.config.shard_anchor:
            return (0, self.anchor_len) if rank == 0 else (0, 0)
        shard = -(-self.anchor_len // self.cp_size)
        lo = min(rank * shard, self.anchor_len)
        return lo, min(lo + shard, self.anchor_len)

    def segments(self, rank: int) -> LocalSegments:
        """Local row ranges of `rank`'s sequence [A | blocks | Q]."""
        blocks, row = [], self.anchor_len
        for v in self.blocks_of(rank):
            start, end = self.block_range(v)
            blocks.append((v, row, row + end - start))
            row += end - start
        return LocalSegments(anchor=(0, self.anchor_len), blocks=tuple(blocks),
                             query=(row, row + self.query_len),
                             anchor_shard=self.anchor_shard(rank))

    def local_len(self, rank: int) -> int:
        """Rows of `rank`'s local sequence."""
        return self.segments(rank).query[1]

    def local_indices(self, rank: int) -> torch.Tensor:
        """LongTensor [local_len(rank)] of the global positions held by `rank`, in local
        order. Gather token ids, embeddings and RoPE positions with it."""
        parts = [torch.arange(0, self.anchor_len)]
        parts += [torch.arange(*self.block_range(v)) for v in self.blocks_of(rank)]
        parts.append(torch.arange(self.context_len, self.context_len + self.query_len))
        return torch.cat(parts)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.cp_size:
            raise ValueError(f"rank {rank} out of range for a layout planned for "
                             f"cp_size={self.cp_size}")
