"""Qwen2.5-VL on megatron-core with context-parallel (Spava) attention. What is Qwen's:
the vision encoder, its temporal groups, the M-RoPE positions and the weight map; the
generation loop is `megatron_spava.inference.generate`, the shared pieces `models.common`.

The names below load lazily, so that the megatron-free submodules (`tiny`, `rope`,
`config`) import without megatron-core (the needle model's HF-only training does)."""

from ..common.lazy import lazy_exports

_LAZY = {"Qwen25VLConfig": "config", "Qwen25VLModel": "model", "encode_video_frame_parallel": "model",
         "VisionConfig": "vision", "VisionEncoder": "vision"}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
