"""`spava` (SPAVA.md sections 1-3) and its presets `star` and `apb` (section 5).

The layout (which tokens live on which rank) is here; the attention of one layer is
`megatron_spava.algos.spava.attention.spava_attn_func`. `SpavaLayout.plan` is pure: the same
(n, l_q, W, config) gives the same layout on every rank, with no torch.distributed call.

Rank r holds, in this local order::

    [A | B_r | B_{2W-1-r} | Q]       zigzag (two virtual hosts per rank)
    [A | B_r | Q]                    zigzag off (one block per rank)

A = [0, l_a) and Q = [n, n + l_q) are replicated on every rank. The context after the
anchor, [l_a, n), is cut into H = 2W (or W) contiguous blocks of
l_b = ceil((n - l_a) / H) tokens; the last one may be short but never empty.

Presets (never overriding what a user set explicitly):
  star  Star Attention: anchor_len="block", passing=False, zigzag=False. An explicit
        anchor_len, passing_len or passing_scale conflicts with it: ValueError.
  apb   zigzag=False, overlap=False, and the passing budget doubled (half as many blocks,
        the same exchanged volume): an explicit passing_len is doubled too, as is the
        default's passing_scale.
Boolean switches cannot conflict: a preset only turns switches off, which a user's
`--spava-no-*` agrees with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ...config import SpavaConfig, ceil_div, round_up
from ..base import Layout, check_lengths, split_len, zigzag_pair

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
class SpavaLayout(Layout):
    """A planned Spava layout; build it with `SpavaLayout.plan` (or `plan_layout("spava" |
    "star" | "apb", ...)`, which applies the preset first).

    context_len: n. query_len: l_q (0: a context-only pass, see SpavaConfig.fuse_query).
    cp_size: W. anchor_len: l_a.
    block_len: l_b, the length of every virtual block but the last (which may be shorter).
    passing_len: tokens each block sends per KV head, min(budget, l_b); 0 when passing
      blocks are off. The last block's passing block is never read by anyone (no block
      comes after it), so it is the only one that may hold fewer real tokens.
    config: the SpavaConfig it was planned with (switches travel with the layout).
    """

    anchor_len: int
    block_len: int
    passing_len: int
    default_algo = "spava"

    @classmethod
    def plan(cls, *, context_len: int, query_len: int, cp_size: int,
             config: Optional[SpavaConfig] = None) -> "SpavaLayout":
        """Plan the layout of one request. Raises ValueError, naming the limit, when the
        sizes cannot make a valid layout."""
        config = check_lengths("Spava layout", context_len, query_len, cp_size, config)
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
            anchor = min(ceil_div(n, num_blocks + 1), max(n - num_blocks, 0))
        elif config.anchor_len > n:
            raise ValueError(f"Spava layout: anchor_len={config.anchor_len} is longer than the "
                             f"context ({n} tokens)")
        else:
            anchor = config.anchor_len
        block = split_len(
            n - anchor, num_blocks, who="Spava layout", subject="context",
            unit="block", detail=f"{n} context tokens minus a {anchor}-token anchor leave ",
            hint=f"cp_size={world} needs {num_blocks} virtual blocks of at least one token "
                 f"(n - anchor_len >= {num_blocks}). Use a longer context, a shorter anchor or "
                 f"fewer context-parallel ranks")
        if not config.passing:
            passing = 0
        elif config.passing_len is None:
            default = round_up(n // config.passing_divisor, config.budget_align)
            passing = min(config.passing_scale * default, block)
        else:
            passing = min(config.passing_len, block)
        if passing and not lq and not anchor:
            raise ValueError(
                "Spava layout: a context-only pass (query_len=0) selects passing blocks with the "
                "queries of the anchor's last tokens, but anchor_len=0 leaves none; use an anchor "
                "or passing=False")
        return cls(n, lq, world, anchor, block, passing, config=config)

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
        self.check_rank(rank)
        return zigzag_pair(rank, self.cp_size) if self.config.zigzag else (rank,)

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
        self.check_rank(rank)
        if not self.config.shard_anchor:
            return (0, self.anchor_len) if rank == 0 else (0, 0)
        shard = ceil_div(self.anchor_len, self.cp_size)
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

    def owned_rows(self, rank: int) -> torch.Tensor:
        """Bool [local_len(rank)]: every row on rank 0; on other ranks the replicated anchor
        and query rows are not owned (rank 0 owns them)."""
        owned = torch.ones(self.local_len(rank), dtype=torch.bool)
        if rank > 0:
            seg = self.segments(rank)
            owned[: seg.anchor[1]] = False
            owned[seg.query[0]:] = False
        return owned

    def cache_rows(self, rank: int) -> torch.Tensor:
        """LongTensor of the local rows kept in the KV cache after prefill (SPAVA.md 4):
        [A shard r | B_r | B_2W-1-r], and Q on rank 0. Passing blocks are never cached."""
        seg = self.segments(rank)
        parts = [torch.arange(*seg.anchor_shard), torch.arange(seg.blocks[0][1], seg.blocks[-1][2])]
        if rank == 0:
            parts.append(torch.arange(*seg.query))
        return torch.cat(parts)


def star_preset(config: SpavaConfig) -> SpavaConfig:
    """Star Attention from `config`: a block-sized anchor, no passing blocks, one block per
    rank. Raises ValueError when `config` sets a budget star would have to ignore."""
    conflicts = []
    if config.anchor_len not in (None, "block"):
        conflicts.append(f"anchor_len={config.anchor_len}")
    if config.passing_len is not None:
        conflicts.append(f"passing_len={config.passing_len}")
    if config.passing_scale != 1:
        conflicts.append(f"passing_scale={config.passing_scale}")
    if conflicts:
        raise ValueError(
            f"context-parallel algorithm 'star' sets anchor_len='block' (the anchor is one "
            f"block) and exchanges no passing blocks, which conflicts with {', '.join(conflicts)}"
            f" (--spava-anchor-len / --spava-passing-len / --spava-passing-scale). Drop them, "
            f"or run 'spava' with --spava-no-passing --spava-no-zigzag for a fixed-anchor "
            f"Star variant")
    return config.replace(anchor_len="block", passing=False, zigzag=False)


def apb_preset(config: SpavaConfig) -> SpavaConfig:
    """APB from `config`: one block per rank, no overlap, and twice the passing budget
    Spava would use with the same settings (an explicit passing_len is doubled, otherwise
    passing_scale is), so that W blocks exchange the volume of Spava's 2W."""
    if config.passing_len is not None:
        return config.replace(zigzag=False, overlap=False, passing_len=2 * config.passing_len)
    return config.replace(zigzag=False, overlap=False, passing_scale=2 * config.passing_scale)
