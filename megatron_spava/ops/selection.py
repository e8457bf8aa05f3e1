"""Query-aware selection of passing blocks (SPAVA.md section 2, steps 1-3).

probe -> fp32 scores -> max-pool within the block -> per-head top-k -> gather.
Pure functions of tensors; no communication.

Two scores (SpavaConfig.mean_probe):
  mean (SPAVA.md): one probe per KV head, the query tokens' queries averaged over the GQA
    group and the query tokens; s[t, h] = k[t, h] . probe[h].
  log-sum-exp (beyond SPAVA.md): every query token's and head's query is a probe;
    s[t, h] = logsumexp_j(scale * q_j . k[t, h]) over the group's heads and the query
    tokens: the log of the attention mass (before normalisation) the query puts on t.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: log-sum-exp scores are computed over key chunks of at most this many logits.
_LOGITS_PER_CHUNK = 1 << 24


def query_probe(q_query: torch.Tensor, num_kv_heads: int, mean: bool = True) -> torch.Tensor:
    """The probe vectors of each KV head.

    mean=True: one per KV head, the query tokens' queries averaged over the GQA group, then
    over the query tokens (the mean of dot products is the dot product with the mean, so
    scoring against it equals averaging per-token scores). mean=False: all lq * group of
    them, unaveraged.

    q_query: [lq, b, hq, d] with hq % num_kv_heads == 0. Returns [b, hk, m, d] float32 with
    m = 1 (mean) or lq * hq // hk.
    """
    lq, b, hq, d = q_query.shape
    grouped = q_query.float().reshape(lq, b, num_kv_heads, hq // num_kv_heads, d)
    if mean:
        return grouped.mean(dim=(0, 3)).unsqueeze(2)
    return grouped.permute(1, 2, 0, 3, 4).reshape(b, num_kv_heads, -1, d)


def selection_scores(k_block: torch.Tensor, probe: torch.Tensor, pool_kernel: int,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Scores of the block's keys in float32, smoothed by a max-pool of width `pool_kernel`
    (stride 1, same padding) along t within this block.

    probe: [b, hk, m, d] float32 from `query_probe`. scale None (the mean probe, m = 1):
    s[t, h] = k[t, h] . probe[h, 0] (no softmax, no scaling). scale set (any m):
    s[t, h] = logsumexp_j(scale * k[t, h] . probe[h, j]), over key chunks to bound memory.

    k_block: [l, b, hk, d]. Returns [b, hk, l] float32.
    """
    keys = k_block.permute(1, 2, 0, 3).float()  # [b, hk, l, d]
    if scale is None:
        if probe.shape[2] != 1:
            raise ValueError(f"selection_scores: {probe.shape[2]} probes per head need a scale "
                             "(log-sum-exp); the mean score takes one")
        scores = torch.matmul(keys, probe[:, :, 0].unsqueeze(-1)).squeeze(-1)
    else:
        step = max(1, _LOGITS_PER_CHUNK // max(1, probe.shape[0] * probe.shape[1] * probe.shape[2]))
        probes_t = probe.transpose(-1, -2) * scale  # [b, hk, d, m]
        scores = torch.cat([torch.logsumexp(torch.matmul(keys[:, :, t:t + step], probes_t), dim=-1)
                            for t in range(0, keys.shape[2], step)], dim=-1)
    return F.max_pool1d(scores, pool_kernel, stride=1, padding=pool_kernel // 2)


def select_passing(k_block: torch.Tensor, v_block: torch.Tensor, probe: torch.Tensor,
                   budget: int, pool_kernel: int, scale: Optional[float] = None) -> torch.Tensor:
    """The passing block of one virtual block: per (batch, KV head), the `budget` tokens
    with the highest smoothed scores (`selection_scores`). Different heads keep different
    tokens.

    k_block, v_block: [l, b, hk, d] with l >= budget; probe: [b, hk, m, d] float32.
    Returns [budget, b, hk, 2d]: selected keys and values packed along the last dim
    (one tensor, so one collective moves both). Token order within it is unspecified;
    passing keys are fully visible, so it does not matter.
    """
    return gather_top(k_block, v_block, selection_scores(k_block, probe, pool_kernel, scale), budget)


def gather_top(k_block: torch.Tensor, v_block: torch.Tensor, scores: torch.Tensor,
               budget: int) -> torch.Tensor:
    """Per (batch, KV head), the keys and values of the `budget` highest `scores`.

    k_block, v_block: [l, b, hk, d]; scores: [b, hk, l]. Returns [budget, b, hk, 2d] (keys |
    values), in unspecified token order."""
    index = scores.topk(budget, dim=-1, sorted=False).indices  # [b, hk, budget]
    index = index.permute(2, 0, 1).unsqueeze(-1).expand(-1, -1, -1, k_block.shape[-1])
    return torch.cat([k_block.gather(0, index), v_block.gather(0, index)], dim=-1)
