"""The MoE family's conversions: `qwen3_vl.convert` (its weight map has the experts)."""

from ..convert import FAMILY, dist_to_hf, hf_to_dist, load_dist_into_model, load_hf_into_model  # noqa: F401
