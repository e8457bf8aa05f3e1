"""Qwen3-VL MoE (model_type qwen3_vl_moe: Qwen3-VL-30B-A3B, 235B-A22B) as a family of its
own in `models.registry` (`family.py`): the same config, model, conversion and prompt as the
dense family (they read the MoE fields), and a tiny MoE checkpoint (`tiny.make_tiny_checkpoint`)."""
