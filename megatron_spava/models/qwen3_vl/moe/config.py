"""The MoE family's config: `qwen3_vl.config` (it reads num_experts and the rest)."""

from ..config import Qwen3VLConfig, Qwen3VLVisionConfig  # noqa: F401
