"""Spava context-parallel attention: the functional core (SPAVA.md sections 2-3).

`spava_attn_func` runs one attention layer on one CP rank. Every rank of the CP group
calls it with its local q/k/v in the layout's local order [A | blocks | Q]:

  1-3  score this rank's blocks against the query probe and select passing blocks (both
       blocks in one pass: they are contiguous in the local order);
  4    all-gather the passing blocks of the first blocks, then of the second blocks,
       asynchronously;
  8    attend the query rows to this rank's share of the keys and launch the all-gather
       of those partials;
  5    anchor rows: causal attention of A over A;
  6-7  block rows: causal attention within the block, and (once its exchange has landed)
       attention to [passing blocks before it | A], merged by LSE;
  8    merge the query partials of every rank: exact query rows, the same on every rank.

The exchanged passing blocks land in one buffer X = [G2 | A | G1], where G1 holds the
first blocks' passing blocks in rank order (P_0 .. P_{W-1}) and G2 the second blocks'
(P_{2W-1} .. P_W). Rows of B_r then read the contiguous slice [A | P_0 .. P_{r-1}] and
rows of B_{2W-1-r} the slice [P_{2W-2-r} .. P_W | A | P_0 .. P_{W-1}]: no concatenation.

A context-only pass (layout.query_len == 0, the first pass of fuse_query=False) has no
query rows and no query to select with: the probes are then the queries of the anchor's
last `context_probe_len` tokens, which every rank holds (query-agnostic selection).
The score is `config.selection`, a named entry of `selection.SCORERS`; the selection
reports what it chose to `selection.record_selection` subscribers, if any.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ... import profiling
from ...distributed import all_gather, check_inputs, gather_partials, merge_gathered
from ...ops.attention import attend, attend_many, merge_partials, resolve_merge
from . import selection

def spava_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: "SpavaLayout",
                    cp_group: Optional[dist.ProcessGroup] = None,
                    softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Spava attention of one layer on this CP rank.

    q: [s_local, b, hq, d]; k, v: [s_local, b, hk, d], post-RoPE, hq % hk == 0, in the
    layout's local order (`layout.local_indices(rank)`). cp_group: the context-parallel
    group the layout was planned for (None: a single rank). softmax_scale: default
    d ** -0.5. Returns [s_local, b, hq, d] in q's dtype; anchor and query rows are the
    same on every rank. Raises ValueError (before any collective) for bad input, or for a
    `config.merge_kernel` that cannot run on q's device.
    """
    merge = resolve_merge(layout.config.merge_kernel, q.device)
    rank, world = check_inputs(q, k, v, layout, cp_group, caller="spava_attn_func",
                               collective=layout.config.check_ranks_agree)
    cfg = layout.config
    seg = layout.segments(rank)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    b, hk, d = k.shape[1], k.shape[2], k.shape[3]
    a_hi = seg.anchor[1]
    q_lo, q_hi = seg.query
    lp, nblk = layout.passing_len, len(seg.blocks)
    out = torch.empty_like(q)

    # X = [G2 | A | G1]: gathered passing blocks around a copy of the anchor's K|V.
    slots = world * lp
    off_a = slots * (nblk - 1)
    off_g1 = off_a + a_hi
    x = k.new_empty(off_g1 + slots, b, hk, 2 * d)
    x[off_a:off_g1, ..., :d] = k[:a_hi]
    x[off_a:off_g1, ..., d:] = v[:a_hi]

    # 1-4. Select each block's passing block and launch its all-gather.
    works = []
    listening = selection.listening()
    if lp:
        if q_hi > q_lo:  # query-aware: the query tokens' queries
            probes = q[q_lo:q_hi]
        else:  # context only: the anchor's last tokens (plan ensures there are some)
            probes = q[max(0, a_hi - cfg.context_probe_len):a_hi]
        # the last block's passing block is never read; the others are selected together
        # (a rank's blocks are contiguous: one score call, pool, top-k and gather)
        chosen = [j for j, (vblock, _, _) in enumerate(seg.blocks) if vblock != layout.num_blocks - 1]
        reports = [dict(block=seg.blocks[j][0], block_range=layout.block_range(seg.blocks[j][0]), rank=rank)
                   if listening else None for j in chosen]
        with profiling.region("selection", k):
            passing = dict(zip(chosen, selection.select_passing_blocks(
                k, v, [seg.blocks[j][1:] for j in chosen], probes, lp, cfg.pool_kernel, scale, cfg.selection,
                reports=reports)))
        for j in range(len(seg.blocks)):
            mine = passing[j] if j in passing else k.new_zeros(lp, b, hk, 2 * d)
            region = x[off_g1:off_g1 + slots] if j == 0 else x[:slots]
            works.append(all_gather(region, mine, cp_group, world, async_op=cfg.overlap))

    # 8a. Query rows over this rank's share of the keys; launch the gather of partials.
    if q_hi > q_lo:
        s_lo, s_hi = seg.anchor_shard
        c_lo, c_hi = seg.blocks[0][1], seg.blocks[-1][2]  # this rank's blocks are contiguous
        keys = [(k[s_lo:s_hi], v[s_lo:s_hi], False), (k[c_lo:c_hi], v[c_lo:c_hi], False)]
        if rank == 0:
            keys.append((k[q_lo:q_hi], v[q_lo:q_hi], True))
        q_partial = attend_many(q[q_lo:q_hi], keys, scale=scale, kernel=cfg.kernel, merge=merge)
        gathered, q_work = gather_partials(q_partial, cp_group, world, async_op=cfg.overlap)

    # 5. Anchor rows: exact, A is the true prefix.
    if a_hi:
        out[:a_hi] = attend(q[:a_hi], k[:a_hi], v[:a_hi], causal=True, scale=scale,
                            kernel=cfg.kernel)[0]

    # 6-7. Block rows: causal within the block now, the exchanged prefix once it lands.
    own = [attend(q[lo:hi], k[lo:hi], v[lo:hi], causal=True, scale=scale, kernel=cfg.kernel)
           for _, lo, hi in seg.blocks]
    prefixes = [(off_a, off_g1 + rank * lp), ((rank + 1) * lp, off_g1 + slots)]
    for j, (_, lo, hi) in enumerate(seg.blocks):
        if j < len(works) and works[j] is not None:
            works[j].wait()
        p_lo, p_hi = prefixes[j]
        parts = [own[j]]
        if p_hi > p_lo:
            parts.append(attend(q[lo:hi], x[p_lo:p_hi, ..., :d], x[p_lo:p_hi, ..., d:],
                                scale=scale, kernel=cfg.kernel))
        if len(parts) > 1:
            with profiling.region("merge", q):
                merge_partials(parts, out=out[lo:hi], impl=merge)
        else:
            out[lo:hi] = own[j][0]

    # 8b. Exact query rows: merge every rank's partial.
    if q_hi > q_lo:
        if q_work is not None:
            q_work.wait()
        with profiling.region("merge", q):
            _, lse = merge_gathered(gathered, world, with_lse=True, out=out[q_lo:q_hi], impl=merge)
        if listening:
            selection.publish(dict(kind="query", layer=selection.current_layer(), rank=rank, lse=lse, scale=scale))
    return out
