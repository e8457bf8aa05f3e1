"""Qwen2.5-VL's synthetic prompts for the benchmarks (`perf.inputs`, the prefill benchmark,
the TP x CP check, the roofline, the scaling model): a 448x448 video (32x32 patches of 14
-> 16x16 = 256 merged tokens per temporal group of 2 frames),

    20 text | <|vision_start|> 256*g x <|video_pad|> <|vision_end|> | question (24 tokens and up)

with random patches (the weights are random)."""

from __future__ import annotations

import torch

TOKENS_PER_GROUP = 256  # 448x448 frames: 32x32 patches -> 16x16 merged tokens per 2 frames


def prompt_lengths(n: int, cfg=None, multiple: int = 1):
    """(frame groups, context tokens, query tokens) of a prompt of about n tokens; the
    question is padded (24 tokens and up) so that the whole prompt is a multiple of `multiple`."""
    groups = max(1, (n - 46) // TOKENS_PER_GROUP)
    context = 20 + 1 + groups * TOKENS_PER_GROUP + 1
    return groups, context, 24 + (-(context + 24)) % multiple


def synthetic_inputs(cfg, n: int, seed: int, multiple: int = 1):
    """VideoQAInputs of about n tokens (`prompt_lengths`) for a Qwen25VLConfig."""
    from ...video.inputs import VideoQAInputs
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 200, (20,), generator=gen)  # ordinary tokens in every vocabulary here
    groups, _, query = prompt_lengths(n, cfg, multiple)
    question = torch.randint(0, 200, (query,), generator=gen)
    ids = torch.cat([prefix, torch.tensor([cfg.vision_start_token_id]),
                     torch.full((groups * TOKENS_PER_GROUP,), cfg.video_token_id),
                     torch.tensor([cfg.vision_end_token_id]), question])[None]
    pixels = torch.randn(groups * 4 * TOKENS_PER_GROUP, cfg.vision.patch_dim, generator=gen)
    return VideoQAInputs(ids, pixels, torch.tensor([[groups, 32, 32]]), torch.tensor([1.0]))


def vision_flops_per_group(cfg) -> float:
    """Vision FLOPs of one temporal group of `synthetic_inputs` (2 frames of 448x448: 1024 patches)."""
    from .vision import vision_flops
    return vision_flops(cfg.vision, 4 * TOKENS_PER_GROUP, 4 * TOKENS_PER_GROUP)
