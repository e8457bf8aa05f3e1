"""Synthetic video prompts of about n LLM tokens, per model family, for the prefill
benchmark, the TP x CP check, the roofline and the scaling model (`prompt_lengths`: the
(frame groups, context, query) lengths those prompts have)."""

from __future__ import annotations

import torch

TOKENS_PER_GROUP = 256  # 448x448 frames: 32x32 patches -> 16x16 merged tokens per 2 frames


def _is_internvl(cfg) -> bool:
    from megatron_spava.models.internvl3 import InternVL3Config
    return isinstance(cfg, InternVL3Config)


def _family_bench(cfg):
    """A family's own synthetic-prompt module (models.<family>.bench), or None (the two
    families written out here)."""
    if type(cfg).__name__ == "Qwen3VLConfig":
        from megatron_spava.models.qwen3_vl import bench
        return bench
    return None


def prompt_lengths(n: int, cfg=None, multiple: int = 1):
    """(frame groups, context tokens, query tokens) of `synthetic_inputs(cfg, n, ...)`
    (cfg None: Qwen2.5-VL's layout). multiple: the question is padded (24 tokens and up)
    so that the whole prompt is a multiple of it (Megatron's CP: 2 x CP)."""
    if cfg is not None and _family_bench(cfg):
        return _family_bench(cfg).prompt_lengths(n, cfg, multiple)
    if cfg is not None and _is_internvl(cfg):
        per_frame = cfg.tokens_per_tile + 2  # <img> <IMG_CONTEXT>*T </img>
        frames = max(1, (n - 44) // per_frame)
        groups, context = frames, 20 + frames * per_frame
    else:
        groups = max(1, (n - 46) // TOKENS_PER_GROUP)
        context = 20 + 1 + groups * TOKENS_PER_GROUP + 1
    return groups, context, 24 + (-(context + 24)) % multiple


def synthetic_inputs(cfg, n: int, seed: int, multiple: int = 1):
    """A chat prompt of about n tokens around a video: Qwen2.5-VL, a 448x448 video of n/256
    temporal groups; InternVL3, n/(T+2) frames of one tile each (T tokens per tile).
    multiple: the prompt length is made a multiple of it (`prompt_lengths`)."""
    from megatron_spava.video.inputs import InternVLInputs, VideoQAInputs
    if _family_bench(cfg):
        return _family_bench(cfg).synthetic_inputs(cfg, n, seed, multiple)
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 200, (20,), generator=gen)  # ordinary tokens in every vocabulary here
    groups, _, query = prompt_lengths(n, cfg, multiple)
    question = torch.randint(0, 200, (query,), generator=gen)
    if _is_internvl(cfg):  # <img>, </img>: ordinary ids here (the weights are random)
        frame = torch.tensor([201] + [cfg.image_token_id] * cfg.tokens_per_tile + [202])
        ids = torch.cat([prefix, frame.repeat(groups), question])[None]
        size = cfg.vision.image_size
        return InternVLInputs(ids, torch.randn(groups, 3, size, size, generator=gen))
    ids = torch.cat([prefix, torch.tensor([cfg.vision_start_token_id]),
                     torch.full((groups * TOKENS_PER_GROUP,), cfg.video_token_id),
                     torch.tensor([cfg.vision_end_token_id]), question])[None]
    pixels = torch.randn(groups * 4 * TOKENS_PER_GROUP, cfg.vision.patch_dim, generator=gen)
    return VideoQAInputs(ids, pixels, torch.tensor([[groups, 32, 32]]), torch.tensor([1.0]))
