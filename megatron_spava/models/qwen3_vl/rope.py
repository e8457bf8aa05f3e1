"""Qwen3-VL's M-RoPE: the rope index (3-D positions t, h, w of a prompt) and the interleaved
rotary angles, computed once over the whole sequence (SPAVA.md section 1) and then gathered
by the layout's indices like any token.

Rope index (transformers 5.23 `Qwen3VLModel.get_rope_index`): the processor writes a video
as frame groups, each `<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>`, so every
run of video tokens is ONE temporal group with its own (1, h, w) grid. Text tokens count
up by one; a group starting at position p sits at t = p, h = p + row, w = p + col, and the
text after it resumes at p + max(h, w) / merge. Time is carried by the timestamp text,
not by the t axis.

Interleaved M-RoPE (`mrope_interleaved`): of the head_dim / 2 frequencies, index i uses
the h position when i % 3 == 1 and i < 3 * section[1], the w position when i % 3 == 2 and
i < 3 * section[2], else the t position (HF's `recomposition_frequencies`), instead of
Qwen2.5-VL's contiguous t | h | w sections.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..qwen2_5_vl.rope import MRopePositions, decode_positions, token_types  # noqa: F401  (same rules)


def rope_index(input_ids: Tensor, *, image_token_id: int, video_token_id: int, spatial_merge_size: int,
               image_grid_thw: Optional[Tensor] = None, video_grid_thw: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """M-RoPE position ids of a batch of prompts.

    input_ids [b, S]; grids [n, 3] (t, h, w) in patches, consumed in order across the batch:
    an image run takes one image grid, a video run one temporal group of the current video
    (a video of t groups covers t runs). attention_mask [b, S], 0 = padding (position 0).
    Returns (positions [3, b, S] long, deltas [b, 1]: max position + 1 - tokens, so that
    decoded token k sits at S_unpadded + delta + k on all three axes). Raises ValueError
    when the runs do not match the grids.
    """
    types = token_types(input_ids, image_token_id, video_token_id)
    groups = []  # every video's temporal groups as (1, h, w)
    for t, h, w in (video_grid_thw.tolist() if video_grid_thw is not None else []):
        groups += [(1, h, w)] * t
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []), 2: iter(groups)}
    b, S = input_ids.shape
    positions = torch.zeros(3, b, S, dtype=torch.long)
    deltas = []
    m = spatial_merge_size
    for r in range(b):
        keep = attention_mask[r].bool() if attention_mask is not None else torch.ones(S, dtype=torch.bool)
        kinds = types[r][keep]
        n = kinds.numel()
        if n == 0:
            deltas.append(0)
            continue
        # runs of equal token type: their starts, lengths and types (one host loop over runs)
        change = torch.ones(n, dtype=torch.bool)
        change[1:] = kinds[1:] != kinds[:-1]
        starts = change.nonzero().flatten()
        lengths = torch.diff(starts, append=torch.tensor([n]))
        shape = []  # per run: (advance of the next run's start, rows h' of a group, columns w')
        for kind, length in zip(kinds[starts].tolist(), lengths.tolist()):
            if kind == 0:
                shape.append((length, 0, 0))
                continue
            name = "image" if kind == 1 else "video frame group"
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(f"more {name} placeholder runs than grids in the batch") from None
            if t * (h // m) * (w // m) != length:
                raise ValueError(f"a {name} run of {length} tokens does not match its grid {t}x{h}x{w} "
                                 f"({t * (h // m) * (w // m)} merged tokens)")
            shape.append((max(h, w) // m, h // m, w // m))
        advance, rows, cols = torch.tensor(shape, dtype=torch.long).unbind(1)
        current = torch.cumsum(advance, 0) - advance  # each run's first position
        run = torch.repeat_interleave(torch.arange(len(shape)), lengths)
        j = torch.arange(n) - starts[run]  # index inside the run
        text = (cols == 0)[run]
        area, width = (rows * cols).clamp_min(1)[run], cols.clamp_min(1)[run]
        # text: j on every axis; a vision run (t, h', w') in t-major order: (j // h'w', j % h'w' // w', j % w')
        pos = torch.stack([torch.where(text, j, j // area), torch.where(text, j, j % area // width),
                           torch.where(text, j, j % width)]) + current[run]
        positions[:, r, keep] = pos
        deltas.append(int(pos.max()) + 1 - n)
    leftover = sum(1 for _ in grids[2])
    if leftover:
        raise ValueError(f"{leftover} video frame group(s) have no placeholder run in the prompt")
    return positions, torch.tensor(deltas).unsqueeze(1)


def interleaved_mrope(position_ids: Tensor, inv_freq: Tensor, section: Sequence[int]) -> Tensor:
    """Rotary angles [s, b, 1, head_dim] (megatron-core's layout: cos/sin of them rotate
    [x1 | x2] halves) of position_ids [3, b, s] with Qwen3-VL's interleaved sections.
    inv_freq [head_dim / 2] float32."""
    freqs = position_ids.to(inv_freq.device, torch.float32)[..., None] * inv_freq  # [3, b, s, d/2]
    out = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, 3 * section[axis], 3)
        out[..., idx] = freqs[axis][..., idx]
    return torch.cat([out, out], dim=-1).transpose(0, 1)[:, :, None, :].contiguous()
