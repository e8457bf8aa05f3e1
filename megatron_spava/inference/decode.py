"""Attention of tokens added after the prefill over the distributed KV cache (SPAVA.md 4):
one decoded token at a time, or a whole query in the second pass of fuse_query=False."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..distributed import gather_partials, group_rank_world, merge_gathered
from ..ops.attention import attend, merge_partials


def decode_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache, layer: int,
                     cp_group: Optional[dist.ProcessGroup] = None,
                     softmax_scale: Optional[float] = None, kernel: str = "auto") -> torch.Tensor:
    """Exact attention of m new tokens over every rank's cache and, causally, themselves.

    q: [m, b, hq, d]; k, v: [m, b, hk, d] (post-RoPE), the same on every rank. The rank
    `cache.owner` (chosen by `cache.begin_tokens(m)`, called once per step before the
    forward) appends k/v first; it attends to its older rows and, causally, to the m new
    ones; every other rank to its whole cache. The partials are gathered and merged.
    Returns [m, b, hq, d] in q's dtype, identical on every rank. Raises RuntimeError
    (on every rank) when the step was not begun.
    """
    if cache is None:
        raise RuntimeError("decode step without a KV cache: run the prefill with "
                           "cp_request(..., cache=cache) and call cache.begin_token() per step")
    rank, world = group_rank_world(cp_group)
    m = q.shape[0]
    cache.append(layer, k, v)
    ck, cv = cache.kv(layer)
    if m == 1 or cache.owner != rank:  # one token sees itself: no mask needed
        partial = attend(q, ck, cv, causal=False, scale=softmax_scale, kernel=kernel)
    else:
        old = attend(q, ck[:-m], cv[:-m], causal=False, scale=softmax_scale, kernel=kernel)
        new = attend(q, ck[-m:], cv[-m:], causal=True, scale=softmax_scale, kernel=kernel)
        partial = merge_partials([old, new])
    gathered, _ = gather_partials(partial, cp_group, world, async_op=False)
    return merge_gathered(gathered, world).to(q.dtype)
