"""A tiny Qwen3-VL-architecture checkpoint made offline, in code: for tests, the demo and
anyone without a real checkpoint. Same architecture as the released dense models (no
windows, learned interpolated position embeddings, patch 16, DeepStack, QK-norm,
interleaved M-RoPE, GQA, SwiGLU), small sizes, random weights."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ...config import round_up
from ..common.tiny import chat_template, randomize
from ..qwen2_5_vl.tiny import QWEN_CONTROL_TOKENS, build_tiny_tokenizer

#: Special token ids of `tiny_hf_config` alone (256 ids); `make_tiny_checkpoint` uses its
#: tokenizer's ids instead.
TINY_SPECIAL = {
    "<|endoftext|>": 240, "<|im_start|>": 241, "<|im_end|>": 242, "<|vision_start|>": 243,
    "<|vision_end|>": 244, "<|vision_pad|>": 245, "<|image_pad|>": 246, "<|video_pad|>": 247,
}

#: The Qwen3-VL-Instruct chat format for text and one video per part (no default system
#: turn, unlike Qwen2.5-VL's): a video is <|vision_start|><|video_pad|><|vision_end|>,
#: which the processor expands into timestamped frame groups inside that pair.
CHAT_TEMPLATE = chat_template()

_CORPUS = [
    "What is happening in this video?", "Describe the video.", "Which square moves fastest?",
    "The red square moves from left to right.", "How many squares are there? There are three.",
    "<0.5 seconds><1.5 seconds><2.5 seconds><3.5 seconds><10.0 seconds>", "system user assistant",
]


def tiny_hf_config(*, text_layers: int = 3, vision_depth: int = 3, tie: bool = False,
                   kv_heads: int = 2, deepstack=(0, 1), moe: bool = False) -> dict:
    """config.json contents of the tiny model (nested layout, transformers 5.x). moe: the
    Qwen3-VL-30B-A3B architecture in small (8 experts of width 48, top 2, every layer)."""
    config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": TINY_SPECIAL["<|image_pad|>"],
        "video_token_id": TINY_SPECIAL["<|video_pad|>"],
        "vision_start_token_id": TINY_SPECIAL["<|vision_start|>"],
        "vision_end_token_id": TINY_SPECIAL["<|vision_end|>"],
        "tie_word_embeddings": tie,
        "text_config": {
            "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
            "head_dim": 24, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 4, 4],
                                "mrope_interleaved": True, "rope_theta": 5e5},
            "bos_token_id": TINY_SPECIAL["<|endoftext|>"], "eos_token_id": TINY_SPECIAL["<|im_end|>"],
            "tie_word_embeddings": tie,
        },
        "vision_config": {
            "depth": vision_depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": 64, "num_position_embeddings": 64, "deepstack_visual_indexes": list(deepstack),
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
        },
    }
    if moe:
        config.update(model_type="qwen3_vl_moe", architectures=["Qwen3VLMoeForConditionalGeneration"])
        config["text_config"].update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                     decoder_sparse_step=1, mlp_only_layers=[])
    return config


def tiny_hf_model(config: Optional[dict] = None, *, seed: int = 0, dtype=torch.float32):
    """HF Qwen3VL(Moe)ForConditionalGeneration with random weights: norms 1 + N(0, 0.1),
    norm biases N(0, 0.1), embeddings, lm_head and MoE routers N(0, 1), everything else
    N(0, 0.1), so the greedy answer varies from token to token."""
    import transformers

    config = config or tiny_hf_config()
    kind = "Qwen3VLMoe" if config.get("model_type") == "qwen3_vl_moe" else "Qwen3VL"
    cfg = getattr(transformers, f"{kind}Config")(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(cfg).to(dtype).eval()
    return randomize(model, seed, is_norm=lambda n: "norm" in n and n.endswith("weight"),
                     is_unit=lambda n: ("embed_tokens" in n or "lm_head" in n or "pos_embed" in n
                                        or n.endswith("mlp.gate.weight")))  # MoE router: clear top-k choices


#: Released dense shapes (public config.json values; README and BENCHMARKS cite where), for
#: random-weight runs. "8b": Qwen/Qwen3-VL-8B-Instruct.
SHAPES = {
    "8b": dict(text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                         num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128),
               vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24]),
               tie=False),
}


def shaped_hf_config(shape: str) -> dict:
    """config.json of a released shape ("8b"): real layer counts, widths and heads."""
    spec = SHAPES[shape]
    config = tiny_hf_config(tie=spec["tie"])
    config["text_config"].update(spec["text"], rope_parameters={
        "rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
        "rope_theta": 5e6})
    config["vision_config"].update(spec["vision"])
    return config


def tiny_tokenizer():
    """`qwen2_5_vl.tiny.build_tiny_tokenizer` on a corpus with timestamps, Qwen3-VL's template."""
    tokenizer = build_tiny_tokenizer(corpus=_CORPUS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_checkpoint(out_dir: str, *, seed: int = 0, text_layers: int = 3, vision_depth: int = 3,
                         dtype=torch.float32, shape: Optional[str] = None, moe: bool = False) -> str:
    """Write a complete Qwen3-VL checkpoint directory: config.json, tokenizer with chat
    template, processor configs, and (for the tiny shape) random safetensors weights.
    shape: None for the tiny model; "8b" for the released shape without weight files (build
    it with random weights: megatron-spava-demo --random-weights). Idempotent."""
    marker = "model.safetensors" if shape is None else "config.json"
    if os.path.isfile(os.path.join(out_dir, marker)):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_CONTROL_TOKENS}
    config = (tiny_hf_config(text_layers=text_layers, vision_depth=vision_depth, moe=moe) if shape is None
              else shaped_hf_config(shape))
    if shape is None:
        config["text_config"]["vocab_size"] = round_up(len(tokenizer), 64)
    config["text_config"]["bos_token_id"] = ids["<|endoftext|>"]
    config["text_config"]["eos_token_id"] = ids["<|im_end|>"]
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if shape is None:
        model = tiny_hf_model(config, seed=seed, dtype=dtype)
        model.generation_config.eos_token_id = ids["<|im_end|>"]
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    # HF's Qwen3-VL video defaults (fps 2, 128..768 merged 32x32 tokens); tiny: small frames
    pixels = ({"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 64 * 8} if shape is None else
              {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32})
    shared = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "processor_class": "Qwen3VLProcessor"}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({**shared, "image_processor_type": "Qwen2VLImageProcessor", "size": pixels}, f, indent=1)
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump({**shared, "video_processor_type": "Qwen3VLVideoProcessor", "size": pixels,
                   "do_sample_frames": False, "cap_pixels_per_frame": False}, f, indent=1)
    return out_dir
