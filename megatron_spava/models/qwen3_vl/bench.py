"""Qwen3-VL's synthetic prompts for the benchmarks (`perf.inputs`; the prefill benchmark,
the TP x CP check, the roofline): a 512x512 video (32x32 patches of 16 -> 16x16 = 256
merged tokens per temporal group of 2 frames) in the pinned processor's layout,

    20 text | <|vision_start|> ( <t seconds> <|vision_start|> 256 x <|video_pad|> <|vision_end|> )*g
    <|vision_end|> | question (24 tokens and up)

the timestamp being TIMESTAMP_TOKENS ordinary ids (the weights are random), random
patches, and the same number of LLM tokens per group as Qwen2.5-VL's 448x448 prompts.
"""

from __future__ import annotations

import torch

SIDE_PATCHES = 32            # 512 / 16
TOKENS_PER_GROUP = 256       # (32 / 2) ** 2 merged tokens
TIMESTAMP_TOKENS = 6         # "<12.5 seconds>" in Qwen's tokenizer: <, 1, 2, ., 5, " seconds>" pieces
PER_GROUP = TIMESTAMP_TOKENS + 1 + TOKENS_PER_GROUP + 1


def prompt_lengths(n: int, cfg=None, multiple: int = 1):
    """(frame groups, context tokens, query tokens) of a prompt of about n tokens; the
    question is padded so that the whole prompt is a multiple of `multiple`."""
    groups = max(1, (n - 46) // PER_GROUP)
    context = 20 + 1 + groups * PER_GROUP + 1
    return groups, context, 24 + (-(context + 24)) % multiple


def synthetic_inputs(cfg, n: int, seed: int, multiple: int = 1):
    """VideoQAInputs of about n tokens (`prompt_lengths`) for a Qwen3VLConfig."""
    from ...video.inputs import VideoQAInputs
    gen = torch.Generator().manual_seed(seed)
    groups, _, query = prompt_lengths(n, cfg, multiple)
    prefix = torch.randint(0, 200, (20,), generator=gen)
    question = torch.randint(0, 200, (query,), generator=gen)
    vs, ve = torch.tensor([cfg.vision_start_token_id]), torch.tensor([cfg.vision_end_token_id])
    parts = [prefix, vs]
    for _ in range(groups):
        parts += [torch.randint(0, 200, (TIMESTAMP_TOKENS,), generator=gen), vs,
                  torch.full((TOKENS_PER_GROUP,), cfg.video_token_id), ve]
    ids = torch.cat(parts + [ve, question])[None]
    pixels = torch.randn(groups * SIDE_PATCHES ** 2, cfg.vision.patch_dim, generator=gen)
    return VideoQAInputs(ids, pixels, torch.tensor([[groups, SIDE_PATCHES, SIDE_PATCHES]]))


def vision_flops_per_group(cfg) -> float:
    """Vision FLOPs of one temporal group of `synthetic_inputs` (1024 patches)."""
    from .vision import vision_flops
    return vision_flops(cfg.vision, SIDE_PATCHES ** 2, SIDE_PATCHES ** 2)
