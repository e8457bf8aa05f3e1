"""3-D M-RoPE positions (t, h, w) of a Qwen2.5-VL prompt, computed once over the whole
sequence (SPAVA.md section 1), then gathered by the layout's indices like any token.

Two conventions, which differ only in where the text after a video starts:
  "qwen"  Qwen's original rule, the one the released checkpoints were trained with
          (transformers 4.49-5.2, Qwen's fine-tuning code, vLLM; docs/NOTES.md cites them):
          text resumes at max(position of the vision block) + 1. (transformers 4.52-5.2
          truncate fractional seconds-per-group to an integer; 4.49-4.51 are exact.)
  "hf"    transformers >= 5.3 `get_rope_index`: text resumes at start + max(h, w) / merge,
          ignoring the video's temporal extent, so long videos' t positions overlap the
          following text.
They agree for text, images and videos with (t - 1) * interval < max(h, w) / merge.
"""

from __future__ import annotations

from itertools import groupby
from typing import Optional, Tuple

import torch
from torch import Tensor

CONVENTIONS = ("qwen", "hf")


def token_types(input_ids: Tensor, image_token_id: int, video_token_id: int) -> Tensor:
    """0 text, 1 image, 2 video, per token (HF's mm_token_type_ids)."""
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    return types


def rope_index(input_ids: Tensor, *, image_token_id: int, video_token_id: int,
               spatial_merge_size: int, tokens_per_second: float,
               image_grid_thw: Optional[Tensor] = None, video_grid_thw: Optional[Tensor] = None,
               second_per_grid_ts: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None,
               convention: str = "qwen") -> Tuple[Tensor, Tensor]:
    """M-RoPE position ids of a batch of prompts.

    input_ids: [b, S]. Grids: [n, 3] (t, h, w) in patches, consumed in order across the
    batch. second_per_grid_ts: [n_videos] seconds per temporal group (default 1).
    attention_mask: [b, S], 0 = padding (padded slots get position 0).
    Returns (positions [3, b, S] long, deltas [b, 1]: max position + 1 - tokens, so that
    decoded token k (k = 0, 1, ...) sits at S_unpadded + delta + k on all three axes).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"rope convention must be one of {CONVENTIONS}, got {convention!r}")
    types = token_types(input_ids, image_token_id, video_token_id)
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    b, S = input_ids.shape
    positions = torch.zeros(3, b, S, dtype=torch.long)
    deltas = []
    for row in range(b):
        keep = attention_mask[row].bool() if attention_mask is not None else torch.ones(S, dtype=torch.bool)
        row_types = types[row][keep].tolist()
        pieces, current = [], 0
        for kind, run in groupby(row_types):
            length = len(list(run))
            if kind == 0:
                pieces.append(torch.arange(length).expand(3, -1) + current)
                current += length
                continue
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(f"more {'image' if kind == 1 else 'video'} placeholder runs than "
                                 f"grids in the batch") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if t * gh * gw != length:
                raise ValueError(f"a {'video' if kind == 2 else 'image'} run of {length} tokens does "
                                 f"not match its grid {t}x{h}x{w} ({t * gh * gw} merged tokens)")
            interval = tokens_per_second * next(seconds, 1.0) if kind == 2 else 1.0
            tpos = (torch.arange(t) * interval).long()
            grid = torch.stack(torch.meshgrid(tpos, torch.arange(gh), torch.arange(gw),
                                              indexing="ij")).reshape(3, -1)
            pieces.append(grid + current)
            if convention == "qwen":
                current = int(pieces[-1].max()) + 1
            else:
                current += max(gh, gw)
        row_pos = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        positions[:, row, keep] = row_pos
        deltas.append(int(row_pos.max()) + 1 - row_pos.shape[1] if row_pos.numel() else 0)
    return positions, torch.tensor(deltas).unsqueeze(1)


def decode_positions(positions: Tensor, deltas: Tensor, step: int, prompt_len: int) -> Tensor:
    """M-RoPE ids [3, b, 1] of decoded token `step` (0-based) after a prompt of
    `prompt_len` unpadded tokens: prompt_len + delta + step on every axis."""
    pos = (prompt_len + deltas[:, 0] + step).to(positions.dtype)  # [b]
    return pos.view(1, -1, 1).expand(3, -1, 1).clone()


class MRopePositions:
    """The M-RoPE ids of one prompt, for `inference.generate` (`Qwen25VLModel.prompt_positions`):
    positions [3, 1, S] and deltas [1, 1] from `rope_index`.

    take(idx) -> [3, 1, len(idx)], the prompt tokens at global indices idx;
    decode(step) -> [3, 1, 1], decoded token `step` (0-based) after the prompt."""

    def __init__(self, positions: Tensor, deltas: Tensor):
        self.positions, self.deltas = positions, deltas

    def take(self, idx: Tensor) -> Tensor:
        return self.positions[:, :, idx]

    def decode(self, step: int) -> Tensor:
        return decode_positions(self.positions, self.deltas, step, self.positions.shape[2])
