"""Independent references for Spava's tests, demo and benchmarks.

Nothing here calls Spava: references are plain PyTorch SDPA over the original token
order, in float64 unless asked otherwise, with dense masks built from SPAVA.md's rules.
"""

from __future__ import annotations

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
