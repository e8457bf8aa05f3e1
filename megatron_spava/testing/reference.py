"""Independent references for Spava's tests, demo and benchmarks.

Nothing here calls Spava: references are plain PyTorch SDPA over the original token
order, in float64 unless asked otherwise, with dense masks built from SPAVA.md's rules.
"""

from __future__ import annotations

import functools
import math

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def random_qkv(total_len: int, batch: int, q_heads: int, kv_heads: int, head_dim: int, *,
               seed: int, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reproducible q [S, b, hq, d], k/v [S, b, hk, d], the same on every rank for a seed.
    Drawn on the CPU in float32 so that every device and dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total_len, batch, q_heads, head_dim, generator=gen)
    k = torch.randn(total_len, batch, kv_heads, head_dim, generator=gen)
    v = torch.randn(total_len, batch, kv_heads, head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   mask: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float64,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Single-process attention over the original order with torch SDPA.

    q: [S, b, hq, d]; k, v: [S, b, hk, d]. mask: None for causal, else a bool
    [S, S] (True = may attend). Computed in `dtype` (float64 by default); returns
    [S, b, hq, d] in that dtype.
    """
    qb, kb, vb = (t.to(dtype).permute(1, 2, 0, 3) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if mask is None:
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.to(qb.device),
                                             enable_gqa=gqa, scale=scale)
    return out.permute(2, 0, 1, 3)


def star_mask(layout) -> torch.Tensor:
    """Dense bool mask [S, S] of what each token sees when no passing blocks are exchanged
    (SPAVA.md section 2 with every P_v empty): anchor rows are causal over A; rows of block
    v see A and their own block causally; query rows see everything before them."""
    n, total = layout.context_len, layout.context_len + layout.query_len
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:, :layout.anchor_len] = True
    for v in range(layout.num_blocks):
        lo, hi = layout.block_range(v)
        allowed[lo:hi, lo:hi] = True
    allowed[n:] = True
    return allowed & causal


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def spava_mask(layout, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dense bool mask [b, hq, S, S] of the keys each row sees under Spava (SPAVA.md
    section 2), written from the contract with plain loops, for a dense-SDPA oracle.

    Row of block v: the anchor, its own block causally, and for every earlier block u < v
    the passing block P_u: per (batch, KV head) the min(passing, len(B_u)) tokens of B_u
    with the highest max-pooled scores k . probe, probe = the query tokens' queries
    averaged over the GQA group and the query tokens (config.selection "mean"), or
    log(sum over the query tokens i and the group's heads hh of exp(d**-0.5 * q[i, hh] . k))
    (config.selection "lse"), or that minus its log-sum-exp over the block, maximised over
    the KV heads (config.selection "lse-max"), or log(sum over i and hh of each row's
    softmax over the block's keys, at the key) (config.selection "rownorm"), shared over
    the KV heads as lse-max shares lse ("rownorm-max"). Query and anchor rows: causal.
    Only unambiguous when the top-k has no ties at its boundary (e.g. pool_kernel=1).
    """
    n, lq, cfg = layout.context_len, layout.query_len, layout.config
    total, b, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    queries = q[n:n + lq].double()  # [lq, b, hq, d]
    probe = queries.reshape(lq, b, hk, group, d).mean(dim=(0, 3))  # [b, hk, d]

    if cfg.selection not in ("mean", "lse", "lse-max", "rownorm", "rownorm-max"):
        raise ValueError(f"spava_mask: no reference for selection {cfg.selection!r}")

    def logit(i, bi, hh, t):
        return float(queries[i, bi, hh] @ k[t, bi, hh // group].double()) / math.sqrt(d)

    @functools.lru_cache(maxsize=None)
    def row_mass(i, bi, hh, lo, hi):  # the row's softmax denominator over the block
        return sum(math.exp(logit(i, bi, hh, u)) for u in range(lo, hi))

    def score(t, bi, h, lo, hi):
        key = k[t, bi, h].double()
        if cfg.selection == "mean":
            return float(key @ probe[bi, h])
        rows = [(i, hh) for i in range(lq) for hh in range(h * group, (h + 1) * group)]
        if cfg.selection.startswith("rownorm"):  # each row's softmax over the block, at t
            return math.log(sum(math.exp(logit(i, bi, hh, t)) / row_mass(i, bi, hh, lo, hi) for i, hh in rows))
        return math.log(sum(math.exp(logit(i, bi, hh, t)) for i, hh in rows))

    base = star_mask(layout)
    mask = base.expand(b, hq, total, total).clone()
    half = cfg.pool_kernel // 2
    for u in range(layout.num_blocks):
        lo, hi = layout.block_range(u)
        budget = min(layout.passing_len, hi - lo)
        if budget == 0:
            continue
        later = torch.zeros(total, dtype=torch.bool)
        later[hi:n] = True  # rows of every later block
        for bi in range(b):
            heads = [[score(t, bi, h, lo, hi) for t in range(lo, hi)] for h in range(hk)]
            if cfg.selection.endswith("-max"):  # each head's log share of its mass, max over heads
                shares = [[s - math.log(sum(math.exp(x - max(r)) for x in r)) - max(r) for s in r]
                          for r in heads]
                heads = [[max(col) for col in zip(*shares)]] * hk
            for h in range(hk):
                raw = heads[h]
                pooled = [max(raw[max(0, i - half):i + half + 1]) for i in range(len(raw))]
                top = sorted(range(len(pooled)), key=lambda i: -pooled[i])[:budget]
                cols = torch.tensor(top) + lo
                for hh in range(h * group, (h + 1) * group):
                    mask[bi, hh][later.nonzero().squeeze(1)[:, None], cols[None, :]] = True
    return mask
