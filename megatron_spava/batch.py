"""Layout-aware batch sharding: the replacement for Megatron's `get_batch_on_this_cp_rank`.

Megatron's version cuts every sequence into 2W equal chunks and keeps chunks r and
2W-1-r. Spava's layout replicates the anchor and the query on every rank and places
unequal blocks, so the sharding must follow `layout.local_indices(rank)` instead.
Positions are gathered by the same indices, so RoPE sees the global positions.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

#: Batch keys whose last dim is the sequence: tokens/labels/loss_mask/position_ids as
#: [b, S], and M-RoPE position ids as [3, b, S].
SEQUENCE_KEYS = ("tokens", "input_ids", "labels", "loss_mask", "position_ids")


def get_batch_on_this_cp_rank(batch: Mapping[str, Optional[torch.Tensor]], layout,
                              cp_rank: Optional[int] = None) -> Dict[str, Optional[torch.Tensor]]:
    """Keep this CP rank's tokens of a global batch.

    batch: Megatron's batch dict; tensors under SEQUENCE_KEYS have the sequence (S =
      layout.context_len + layout.query_len) as their last dim and are gathered by
      `layout.local_indices(cp_rank)`. "attention_mask" becomes None: the layout defines
      the causal structure. Other entries pass through unchanged.
    cp_rank: this rank's position in the CP group (default: megatron's parallel_state).
    Returns a new dict, plus "rope_positions": LongTensor [s_local] of global positions for
    1-D RoPE (position_ids[0] gathered when given, else the indices themselves). Pass it
    to `cp_request(layout, positions=...)`.
    loss_mask keeps only the rows this rank owns (`layout.owned_rows`): tokens replicated on
    several ranks (Spava's anchor and query) count on CP rank 0 only, so that a loss summed
    over the CP group counts every token once.
    """
    if cp_rank is None:
        from megatron.core import parallel_state
        cp_rank = parallel_state.get_context_parallel_rank()
    total = layout.total_len
    idx = layout.local_indices(cp_rank)
    out: Dict[str, Optional[torch.Tensor]] = {}
    for key, value in batch.items():
        if key == "attention_mask":
            out[key] = None
        elif key in SEQUENCE_KEYS and value is not None:
            if value.shape[-1] != total:
                raise ValueError(f"batch[{key!r}] has {value.shape[-1]} positions but the layout "
                                 f"was planned for {total} (context {layout.context_len} + query "
                                 f"{layout.query_len})")
            out[key] = value.index_select(value.dim() - 1, idx.to(value.device))
            if key == "loss_mask":
                out[key] = out[key] * layout.owned_rows(cp_rank).to(out[key])
        else:
            out[key] = value
    positions = out.get("position_ids")
    if positions is not None and positions.dim() == 2:
        out["rope_positions"] = positions[0].long()
    else:  # absent, or M-RoPE ids (the model reads those directly)
        out["rope_positions"] = idx
    return out


def owned_by_rank(layout, rank: int) -> torch.Tensor:
    """Bool [local_len(rank)]: the local tokens `rank` owns (`layout.owned_rows(rank)`). A
    token held by several ranks (Spava's replicated anchor and query) is owned by one."""
    return layout.owned_rows(rank)
