"""InternVL3 (InternViT + MLP projector + Qwen2.5 LLM) on megatron-core with
context-parallel (Spava) attention."""

from .config import InternViTConfig, InternVL3Config
from .model import InternVL3Model, encode_frames_frame_parallel, image_ordinals, split_frames

__all__ = ["InternViTConfig", "InternVL3Config", "InternVL3Model", "encode_frames_frame_parallel",
           "image_ordinals", "split_frames"]
