"""Qwen2.5-VL on megatron-core with context-parallel (Spava) attention. What is Qwen's:
the vision encoder, its temporal groups, the M-RoPE positions and the weight map; the
generation loop is `megatron_spava.inference.generate`, the shared pieces `models.common`."""

from .config import Qwen25VLConfig
from .model import Qwen25VLModel, encode_video_frame_parallel
from .vision import VisionConfig, VisionEncoder

__all__ = ["Qwen25VLConfig", "Qwen25VLModel", "VisionConfig", "VisionEncoder",
           "encode_video_frame_parallel"]
