"""Qwen3-VL (dense, and MoE through megatron-core's MoE layers: `moe/`) on megatron-core
with context-parallel (Spava) attention. What is Qwen3-VL's: the vision encoder (no
windows, learned position embeddings interpolated per frame size, patch 16, DeepStack taps
through their own mergers), the interleaved M-RoPE whose rope index puts a text timestamp
between frame groups, QK-norm in the LLM, DeepStack features added to the first LLM layers
at the visual positions, the weight map and the prompt. The generation loop is
`megatron_spava.inference.generate`; shared pieces are `models.common` (and Qwen2.5-VL's
frame-group encoder loop and M-RoPE decode positions).

The names below load lazily, so the megatron-free submodules (`config`, `rope`, `tiny`,
`prompt`) import without megatron-core."""

from ..common.lazy import lazy_exports

_LAZY = {"Qwen3VLConfig": "config", "Qwen3VLVisionConfig": "config", "Qwen3VLModel": "model",
         "Qwen3VLVisionEncoder": "vision", "Qwen3VLPrompter": "prompt"}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
