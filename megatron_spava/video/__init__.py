"""Video input for Qwen2.5-VL: decoding (PyAV), frame sampling, preprocessing, prompts."""

from .io import VideoClip, count_sampled_frames, load_video, write_synthetic_video, write_video
from .preprocess import VideoPreprocessConfig, preprocess_frames, smart_resize

__all__ = ["VideoClip", "VideoPreprocessConfig", "count_sampled_frames", "load_video", "write_video", "preprocess_frames", "smart_resize",
           "write_synthetic_video"]
