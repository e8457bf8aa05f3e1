"""Query-aware selection of passing blocks (SPAVA.md section 2, steps 1-3).

probe -> fp32 scores -> max-pool within the block -> per-head top-k -> gather.
Pure functions of tensors; no communication.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def query_probe(q_query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """One probe vector per KV head: the query tokens' queries averaged over the GQA
    group, then over the query tokens (the mean of dot products is the dot product with
    the mean, so scoring against it equals averaging per-token scores).

    q_query: [lq, b, hq, d] with hq % num_kv_heads == 0. Returns [b, hk, d] float32.
    """
    lq, b, hq, d = q_query.shape
    return q_query.float().reshape(lq, b, num_kv_heads, hq // num_kv_heads, d).mean(dim=(0, 3))


def selection_scores(k_block: torch.Tensor, probe: torch.Tensor, pool_kernel: int) -> torch.Tensor:
    """Scores s[t, h] = k[t, h] . probe[h] in float32 (no softmax, no scaling), smoothed by a
    max-pool of width `pool_kernel` (stride 1, same padding) along t within this block.

    k_block: [l, b, hk, d]; probe: [b, hk, d] float32. Returns [b, hk, l] float32.
    """
    scores = torch.matmul(k_block.permute(1, 2, 0, 3).float(), probe.unsqueeze(-1)).squeeze(-1)
    return F.max_pool1d(scores, pool_kernel, stride=1, padding=pool_kernel // 2)


def select_passing(k_block: torch.Tensor, v_block: torch.Tensor, probe: torch.Tensor,
                   budget: int, pool_kernel: int) -> torch.Tensor:
    """The passing block of one virtual block: per (batch, KV head), the `budget` tokens
    with the highest smoothed scores. Different heads keep different tokens.

    k_block, v_block: [l, b, hk, d] with l >= budget; probe: [b, hk, d] float32.
    Returns [budget, b, hk, 2d]: selected keys and values packed along the last dim
    (one tensor, so one collective moves both). Token order within it is unspecified;
    passing keys are fully visible, so it does not matter.
    """
    d = k_block.shape[-1]
    scores = selection_scores(k_block, probe, pool_kernel)
    index = scores.topk(budget, dim=-1, sorted=False).indices  # [b, hk, budget]
    index = index.permute(2, 0, 1).unsqueeze(-1).expand(-1, -1, -1, d)
    return torch.cat([k_block.gather(0, index), v_block.gather(0, index)], dim=-1)
