"""A tiny InternVL3-architecture checkpoint made offline, in code (tests, anyone without a
real checkpoint), and the released InternVL3-2B shape for random-weight runs. Same
architecture as the real model (InternViT with layer scale and QKV bias, pixel shuffle,
MLP projector, Qwen2.5 LLM with GQA and QKV bias), small sizes, random weights.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..common.tiny import randomize

#: InternVL's image tokens, as the HF tokenizer names them (`tokenizer.start_image_token`...).
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

#: The chat template of the OpenGVLab/InternVL3-*-hf checkpoints (transformers'
#: convert_internvl_weights_to_hf.py): no system turn; a video is "<video>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

#: InternVL's normalisation (ImageNet mean/std, as its image processor and training use).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_hf_config(*, text_layers: int = 2, vision_depth: int = 2, tie: bool = False,
                   kv_heads: int = 2, vocab_size: int = 443, image_token_id: int = 409) -> dict:
    """config.json contents of the tiny model. 112x112 tiles of 14-pixel patches: an 8x8
    grid, 16 LLM tokens per frame after the 2x2 pixel shuffle. The vocabulary (443, odd)
    makes the megatron side pad it at every TP size, as InternVL3's 151674 needs at TP 4."""
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": 16,
        "image_token_id": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tie,
        "text_config": {
            "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "hidden_act": "silu",
            "eos_token_id": 395, "tie_word_embeddings": tie, "use_sliding_window": False,
        },
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": 32, "num_hidden_layers": vision_depth,
            "num_attention_heads": 4, "intermediate_size": 64, "image_size": [112, 112],
            "patch_size": [14, 14], "num_channels": 3, "hidden_act": "gelu", "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6, "attention_bias": True, "use_qk_norm": False,
            "use_absolute_position_embeddings": True, "use_mean_pooling": True,
            "layer_scale_init_value": 0.1,
        },
    }


#: The released InternVL3-2B shape (public config values: InternViT-300M-448px-V2_5 and a
#: Qwen2.5-1.5B LLM with InternVL's 151674-token vocabulary), for random-weight runs.
SHAPES = {
    "2b": dict(
        text=dict(vocab_size=151674, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, eos_token_id=151645,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                    intermediate_size=4096, image_size=[448, 448], patch_size=[14, 14]),
        top=dict(image_seq_length=256, image_token_id=151667, tie_word_embeddings=False)),
}


def shaped_hf_config(shape: str) -> dict:
    """config.json of a released shape ("2b"): real layer counts, widths and heads."""
    if shape not in SHAPES:
        raise ValueError(f"unknown InternVL3 shape {shape!r}; choose from {sorted(SHAPES)}")
    spec = SHAPES[shape]
    config = tiny_hf_config()
    config["text_config"].update(spec["text"], tie_word_embeddings=spec["top"]["tie_word_embeddings"])
    config["vision_config"].update(spec["vision"])
    config.update(spec["top"])
    return config


def tiny_hf_model(config: Optional[dict] = None, *, seed: int = 0, dtype=torch.float32):
    """HF InternVLForConditionalGeneration with random weights: norm and layer-scale weights
    1 + N(0, 0.1), token embeddings and lm_head N(0, 1), everything else N(0, 0.1). With
    these the greedy answer varies from token to token, so decode bugs show."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(**(config or tiny_hf_config()))
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).to(dtype).eval()
    randomize(model, seed,
              is_norm=lambda n: ("norm" in n or "lambda" in n) and n.endswith(("weight", "lambda_1", "lambda_2")),
              is_unit=lambda n: "embed_tokens" in n or "lm_head" in n)
    return model


def build_tiny_tokenizer():
    """Qwen2.5-VL's tiny byte-level BPE (trained in code) plus InternVL's image tokens and
    the InternVL3-hf chat template."""
    from ..qwen2_5_vl.tiny import build_tiny_tokenizer as qwen_tokenizer

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(list(IMAGE_TOKENS.values()), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_checkpoint(out_dir: str, *, seed: int = 0, text_layers: int = 2, vision_depth: int = 2,
                         dtype=torch.float32, shape: Optional[str] = None) -> str:
    """Write a complete InternVL checkpoint directory: config.json, tokenizer (with the
    image tokens as named attributes) and chat template, processor configs, and (for the
    tiny shape) random safetensors weights.

    shape: None for the tiny model; "2b" for the released shape without weight files
    (build it with random weights). Idempotent: a complete directory is left as it is."""
    from transformers import AutoTokenizer

    marker = "model.safetensors" if shape is None else "config.json"
    if os.path.isfile(os.path.join(out_dir, marker)):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(out_dir)  # reloaded so that <img> etc. become named attributes
    tokenizer = AutoTokenizer.from_pretrained(out_dir, extra_special_tokens=IMAGE_TOKENS)
    tokenizer.save_pretrained(out_dir)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in IMAGE_TOKENS.items()}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if shape is None:
        config = tiny_hf_config(text_layers=text_layers, vision_depth=vision_depth,
                                vocab_size=len(tokenizer) + 32,
                                image_token_id=ids["context_image_token"])
        config["text_config"]["eos_token_id"] = eos
        model = tiny_hf_model(config, seed=seed, dtype=dtype)
        model.generation_config.eos_token_id = eos
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        config = shaped_hf_config(shape)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    size = config["vision_config"]["image_size"][0]
    shared = {"do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
              "do_convert_rgb": True, "processor_class": "InternVLProcessor"}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({**shared, "image_processor_type": "GotOcr2ImageProcessorFast", "crop_to_patches": False,
                   "min_patches": 1, "max_patches": 12}, f, indent=1)
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump({**shared, "video_processor_type": "InternVLVideoProcessor", "do_sample_frames": False},
                  f, indent=1)
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"image_seq_length": config["image_seq_length"], "processor_class": "InternVLProcessor"},
                  f, indent=1)
    return out_dir
