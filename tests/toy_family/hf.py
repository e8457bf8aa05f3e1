"""The toy family's HF model: transformers' Qwen2_5_VLForConditionalGeneration reading a
toy_vl config.json."""

import json
import os


class ToyForConditionalGeneration:
    @staticmethod
    def from_pretrained(path: str, **kwargs):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        with open(os.path.join(path, "config.json")) as f:
            config = {k: v for k, v in json.load(f).items() if k != "model_type"}
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, config=Qwen2_5_VLConfig(**config), **kwargs)
