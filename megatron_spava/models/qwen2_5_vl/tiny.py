"""A tiny Qwen2.5-VL-architecture checkpoint made offline, in code: for tests, the README
main job and anyone without a real checkpoint. Same architecture as the real models
(window + full vision blocks, GQA, QKV bias, M-RoPE, SwiGLU), small sizes, random weights.
"""

from __future__ import annotations

from typing import Optional

import torch

# Special token ids of the tiny vocabulary (256 ids: 0..239 ordinary, then specials).
TINY_SPECIAL = {
    "<|endoftext|>": 240, "<|im_start|>": 241, "<|im_end|>": 242, "<|vision_start|>": 243,
    "<|vision_end|>": 244, "<|vision_pad|>": 245, "<|image_pad|>": 246, "<|video_pad|>": 247,
}


def tiny_hf_config(*, text_layers: int = 2, vision_depth: int = 2, tie: bool = False,
                   kv_heads: int = 2) -> dict:
    """config.json contents of the tiny model (nested text_config/vision_config layout)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": TINY_SPECIAL["<|image_pad|>"],
        "video_token_id": TINY_SPECIAL["<|video_pad|>"],
        "vision_start_token_id": TINY_SPECIAL["<|vision_start|>"],
        "vision_end_token_id": TINY_SPECIAL["<|vision_end|>"],
        "tie_word_embeddings": tie,
        "text_config": {
            "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            "bos_token_id": TINY_SPECIAL["<|endoftext|>"], "eos_token_id": TINY_SPECIAL["<|im_end|>"],
            "tie_word_embeddings": tie,
        },
        "vision_config": {
            "depth": vision_depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": 64, "fullatt_block_indexes": [vision_depth - 1], "window_size": 56,
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "tokens_per_second": 2, "in_channels": 3, "hidden_act": "silu",
        },
    }


def tiny_hf_model(config: Optional[dict] = None, *, seed: int = 0, dtype=torch.float32):
    """HF Qwen2_5_VLForConditionalGeneration with random weights: norms 1 + N(0, 0.1),
    embeddings and lm_head N(0, 1), everything else N(0, 0.1). With these the greedy answer
    varies from token to token (logits std ~7), so decode bugs show."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(**(config or tiny_hf_config()))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model
