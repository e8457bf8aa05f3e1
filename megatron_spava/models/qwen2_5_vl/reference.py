"""What the conformance suite (tests/conformance.py) feeds HF's model for this family's
inputs: the keyword arguments of `transformers`' forward / generate for a `VideoQAInputs`
(Qwen2.5-VL and Qwen3-VL: patches, grid, seconds per group, and the token types HF's rope
index reads)."""

from __future__ import annotations


def hf_inputs(inputs, hf_config) -> dict:
    """HF forward kwargs of `inputs` (video.inputs.VideoQAInputs) for a model of `hf_config`."""
    from .rope import token_types
    ids = inputs.input_ids
    kwargs = dict(input_ids=ids, pixel_values_videos=inputs.pixel_values_videos,
                  video_grid_thw=inputs.video_grid_thw,
                  mm_token_type_ids=token_types(ids, hf_config.image_token_id, hf_config.video_token_id))
    if getattr(inputs, "second_per_grid_ts", None) is not None:
        kwargs["second_per_grid_ts"] = inputs.second_per_grid_ts
    return kwargs
