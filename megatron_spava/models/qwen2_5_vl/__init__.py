"""Qwen2.5-VL on megatron-core with context-parallel (Spava) attention."""

from .config import Qwen25VLConfig
from .model import Qwen25VLModel, encode_video_frame_parallel, video_ordinals
from .vision import VisionConfig, VisionEncoder

__all__ = ["Qwen25VLConfig", "Qwen25VLModel", "VisionConfig", "VisionEncoder",
           "encode_video_frame_parallel", "video_ordinals"]
