"""Frame-parallel vision (SPAVA.md section 1): each context-parallel rank encodes a
disjoint, contiguous slice of a video's frame groups, then one all-gather gives every rank
all the embeddings. Exact whenever groups never attend to each other (Qwen2.5-VL's temporal
patch groups of 2 frames; InternVL3's frames, one tile each).

    embeds = encode_frame_parallel(encode_slice, rows_per_group, cp_group)

Model-independent: the family says how many embedding rows each group gives and how to
encode a slice [lo, hi) of groups.
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ...distributed import all_gather, group_rank_world


def split_groups(count: int, world: int, *, unit: str = "frame group",
                 units: str = "groups") -> List[Tuple[int, int]]:
    """Contiguous [lo, hi) ranges of `count` groups per rank, near-equal in count (bounds
    round(r * count / world)). Raises ValueError, the same on every rank, when there are fewer
    groups than ranks (`models.family.frame_group_error`, the one check); `unit`/`units` name a
    group in that message."""
    from ..family import frame_group_error
    error = frame_group_error(count, world, unit=unit, units=units)
    if error:
        raise ValueError(error)
    bounds = [round(r * count / world) for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def gather_rows(local: Tensor, counts: Sequence[int], group: Optional[dist.ProcessGroup]) -> Tensor:
    """All-gather variable-length row slices: rank r holds `local` [counts[r], ...]; every
    rank gets their concatenation in rank order [sum(counts), ...]. One padded all-gather
    (to max(counts) rows per rank)."""
    rank, world = group_rank_world(group)
    if len(counts) != world or local.shape[0] != counts[rank]:
        raise ValueError(f"gather_rows: rank {rank} holds {local.shape[0]} rows, the counts say "
                         f"{list(counts)} for {world} ranks")
    if world == 1:
        return local
    most = max(counts)
    padded = local.new_zeros(most, *local.shape[1:])
    padded[: local.shape[0]] = local
    gathered = local.new_empty(world * most, *local.shape[1:])
    all_gather(gathered, padded, group, world, async_op=False)
    gathered = gathered.view(world, most, *local.shape[1:])
    return torch.cat([gathered[r, :c] for r, c in enumerate(counts)])


def encode_frame_parallel(encode_slice: Callable[[int, int], Tensor], rows_per_group: Sequence[int],
                          group: Optional[dist.ProcessGroup] = None, *, unit: str = "frame group",
                          units: str = "groups") -> Tensor:
    """Embeddings of every group on every rank of `group`, each rank encoding its slice.

    encode_slice(lo, hi): this rank's groups [lo, hi) -> their embedding rows
      [sum(rows_per_group[lo:hi]), ...], in group order;
    rows_per_group: the embedding rows each group gives (the same on every rank).
    group None (or of size 1): this rank encodes every group. The group split is checked
    before any collective (`split_groups`).
    """
    rank, world = group_rank_world(group)
    ranges = split_groups(len(rows_per_group), world, unit=unit, units=units)
    starts = [0, *itertools.accumulate(rows_per_group)]
    lo, hi = ranges[rank]
    local = encode_slice(lo, hi)
    return gather_rows(local, [starts[b] - starts[a] for a, b in ranges], group)
