"""The tiny Qwen3-VL MoE checkpoint: `qwen3_vl.tiny` with moe=True (8 experts, top 2)."""

import functools

from .. import tiny

SHAPES = {}
tiny_hf_config = functools.partial(tiny.tiny_hf_config, moe=True)
tiny_hf_model = tiny.tiny_hf_model
make_tiny_checkpoint = functools.partial(tiny.make_tiny_checkpoint, moe=True)


def shaped_hf_config(shape: str) -> dict:
    raise ValueError(f"no released Qwen3-VL MoE shape is set up for random-weight runs ({shape!r})")
