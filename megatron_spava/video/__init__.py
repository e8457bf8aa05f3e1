"""Video input: decoding (PyAV), frame sampling, the VQA input types of every model family
(`inputs.py`), Qwen2.5-VL's preprocessing and prompts (InternVL3's prompts are
`models.internvl3.prompt`)."""

from .inputs import InternVLInputs, VideoQAInputs
from .io import VideoClip, count_sampled_frames, load_video, write_synthetic_video, write_video
from .preprocess import VideoPreprocessConfig, preprocess_frames, smart_resize

__all__ = ["InternVLInputs", "VideoClip", "VideoPreprocessConfig", "VideoQAInputs",
           "count_sampled_frames", "load_video", "preprocess_frames", "smart_resize",
           "write_synthetic_video", "write_video"]
