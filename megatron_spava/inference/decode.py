"""One decode step of attention over the distributed KV cache (SPAVA.md section 4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..distributed import gather_partials, group_rank_world, merge_gathered
from ..ops.attention import attend


def decode_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache, layer: int,
                     cp_group: Optional[dist.ProcessGroup] = None,
                     softmax_scale: Optional[float] = None, kernel: str = "auto") -> torch.Tensor:
    """Attention of one new token over every rank's cache, exact.

    q: [1, b, hq, d]; k, v: [1, b, hk, d] (post-RoPE), the same on every rank. The rank
    `cache.owner` (chosen by `cache.begin_token()`) appends k/v first, so the token sees
    itself. Returns [1, b, hq, d] in q's dtype, identical on every rank.
    """
    if q.shape[0] != 1:
        raise ValueError(f"decode_attn_func takes one new token at a time, got {q.shape[0]}")
    if cache is None or cache.owner is None:
        raise RuntimeError("decode step without a KV cache: run the prefill with "
                           "cp_request(..., cache=cache) and call cache.begin_token() per token")
    _, world = group_rank_world(cp_group)
    cache.append(layer, k, v)
    ck, cv = cache.kv(layer)
    partial = attend(q, ck, cv, causal=False, scale=softmax_scale, kernel=kernel)
    gathered, _ = gather_partials(partial, cp_group, world, async_op=False)
    return merge_gathered(gathered, world).to(q.dtype)
