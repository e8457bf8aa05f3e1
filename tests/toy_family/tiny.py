"""The toy family's tiny checkpoint: Qwen2.5-VL's tiny one with one LLM layer, model_type toy_vl."""

import json
import os

from megatron_spava.models.qwen2_5_vl import tiny as qwen

SHAPES = {}


def tiny_hf_config(**kwargs) -> dict:
    return {**qwen.tiny_hf_config(text_layers=1, **kwargs), "model_type": "toy_vl"}


def shaped_hf_config(shape: str) -> dict:
    raise ValueError(f"the toy family has no released shapes ({shape!r})")


def make_tiny_checkpoint(out_dir: str, *, shape=None, seed: int = 0) -> str:
    if shape is not None:
        shaped_hf_config(shape)
    qwen.make_tiny_checkpoint(out_dir, seed=seed, text_layers=1)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model_type"] = "toy_vl"
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return out_dir
