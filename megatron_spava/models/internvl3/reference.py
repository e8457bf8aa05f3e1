"""What the conformance suite (tests/conformance.py) feeds HF's InternVLForConditionalGeneration
for an `InternVLInputs`: the prompt ids and one tile per frame."""

from __future__ import annotations


def hf_inputs(inputs, hf_config) -> dict:
    """HF forward kwargs of `inputs` (video.inputs.InternVLInputs)."""
    return dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values)
