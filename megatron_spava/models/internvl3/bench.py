"""InternVL3's synthetic prompts for the benchmarks (`perf.inputs`): n/(T+2) frames of one
random tile each (T LLM tokens per tile),

    20 text | ( <img> T x <IMG_CONTEXT> </img> )*frames | question (24 tokens and up)

<img>, </img> being ordinary ids here (the weights are random)."""

from __future__ import annotations

import torch


def prompt_lengths(n: int, cfg, multiple: int = 1):
    """(frames, context tokens, query tokens) of a prompt of about n tokens; the question is
    padded so that the whole prompt is a multiple of `multiple`."""
    per_frame = cfg.tokens_per_tile + 2  # <img> <IMG_CONTEXT>*T </img>
    frames = max(1, (n - 44) // per_frame)
    context = 20 + frames * per_frame
    return frames, context, 24 + (-(context + 24)) % multiple


def synthetic_inputs(cfg, n: int, seed: int, multiple: int = 1):
    """InternVLInputs of about n tokens (`prompt_lengths`) for an InternVL3Config."""
    from ...video.inputs import InternVLInputs
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 200, (20,), generator=gen)
    frames, _, query = prompt_lengths(n, cfg, multiple)
    question = torch.randint(0, 200, (query,), generator=gen)
    frame = torch.tensor([201] + [cfg.image_token_id] * cfg.tokens_per_tile + [202])
    ids = torch.cat([prefix, frame.repeat(frames), question])[None]
    size = cfg.vision.image_size
    return InternVLInputs(ids, torch.randn(frames, 3, size, size, generator=gen))


def vision_flops_per_group(cfg) -> float:
    """Vision FLOPs of one frame (one 448x448 tile)."""
    from .vision import vision_flops
    return vision_flops(cfg, 1)
