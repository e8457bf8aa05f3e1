"""Synthetic video prompts of about n LLM tokens for the prefill benchmark, the TP x CP
check, the roofline and the scaling model (`prompt_lengths`: the (frame groups, context,
query) lengths those prompts have). Each family writes its own (`models.<family>.bench`,
through the model-family registry); this module picks the family of the config."""

from __future__ import annotations


def _bench(cfg):
    from megatron_spava.models.registry import family_of_config
    return family_of_config(cfg).bench()


def prompt_lengths(n: int, cfg=None, multiple: int = 1):
    """(frame groups, context tokens, query tokens) of `synthetic_inputs(cfg, n, ...)`
    (cfg None: the default family's layout, Qwen2.5-VL's). multiple: the question is padded
    (24 tokens and up) so that the whole prompt is a multiple of it (Megatron's CP: 2 x CP)."""
    return _bench(cfg).prompt_lengths(n, cfg, multiple)


def synthetic_inputs(cfg, n: int, seed: int, multiple: int = 1):
    """A chat prompt of about n tokens around a video, in the family's input type
    (`video.inputs`). multiple: the prompt length is made a multiple of it (`prompt_lengths`)."""
    return _bench(cfg).synthetic_inputs(cfg, n, seed, multiple)


def vision_flops_per_group(cfg) -> float:
    """Vision FLOPs of one frame group of `synthetic_inputs` (the family's)."""
    return _bench(cfg).vision_flops_per_group(cfg)
