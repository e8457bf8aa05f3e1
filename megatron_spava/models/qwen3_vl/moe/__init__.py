"""Qwen3-VL MoE (model_type qwen3_vl_moe: Qwen3-VL-30B-A3B, 235B-A22B) as a family of its
own in `models.families`: the same config, model and conversion as the dense family (they
read the MoE fields), and a tiny MoE checkpoint (`tiny.make_tiny_checkpoint`)."""

from ..config import Qwen3VLConfig  # noqa: F401
from ..model import Qwen3VLModel  # noqa: F401
