"""InternVL3 (InternViT + MLP projector + Qwen2.5 LLM) on megatron-core with
context-parallel (Spava) attention. The generation loop is `megatron_spava.inference.generate`
(shared with Qwen2.5-VL); its inputs are `megatron_spava.video.InternVLInputs`."""

from .config import InternViTConfig, InternVL3Config
from .model import InternVL3Model, encode_frames_frame_parallel, split_frames

__all__ = ["InternViTConfig", "InternVL3Config", "InternVL3Model", "encode_frames_frame_parallel",
           "split_frames"]
