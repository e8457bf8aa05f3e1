"""A tiny Qwen2.5-VL-architecture checkpoint made offline, in code: for tests, the README
main job and anyone without a real checkpoint. Same architecture as the real models
(window + full vision blocks, GQA, QKV bias, M-RoPE, SwiGLU), small sizes, random weights.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ...config import round_up
from ..common.tiny import chat_template, randomize

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
    return randomize(model, seed, is_norm=lambda n: "norm" in n or "ln_q" in n,
                     is_unit=lambda n: "embed_tokens" in n or "lm_head" in n)


#: Qwen2.5-VL's control tokens, in the order the real vocabulary has them.
QWEN_CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

#: The Qwen2.5-VL-Instruct chat format: a default system turn, images and videos as
#: <|vision_start|><|image_pad|/video_pad|><|vision_end|>, and the assistant prefix.
CHAT_TEMPLATE = chat_template(system="You are a helpful assistant.")

_CORPUS = [
    "You are a helpful assistant.", "What is happening in this video?", "Describe the video.",
    "Which square moves fastest?", "The red square moves from left to right.",
    "How many squares are there? There are three squares.", "Answer yes or no. Yes. No.",
    "What colour is the background? It is a gradient.", "system user assistant",
]


def build_tiny_tokenizer(vocab_size: int = 400, corpus=None, repeats: int = 20):
    """A byte-level BPE tokenizer trained in code on a tiny corpus (`corpus`, default the
    demo's sentences, each seen `repeats` times), with Qwen's pre-tokenizer, control tokens
    and chat template (no download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus or _CORPUS) * repeats, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for token in QWEN_CONTROL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=list(QWEN_CONTROL_TOKENS[1:]),
                          model_max_length=1 << 20, chat_template=CHAT_TEMPLATE)


#: Released model shapes (public config.json values), for random-weight runs.
SHAPES = {
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                         num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
               out_hidden_size=2048, tie=True),
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
               out_hidden_size=3584, tie=False),
}


def shaped_hf_config(shape: str) -> dict:
    """config.json of a released shape ("3b", "7b"): real layer counts, widths and heads."""
    spec = SHAPES[shape]
    config = tiny_hf_config(tie=spec["tie"])
    config["text_config"].update(spec["text"], rope_parameters={
        "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    config["vision_config"].update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=spec["out_hidden_size"],
                                   fullatt_block_indexes=[7, 15, 23, 31], window_size=112)
    return config


def make_tiny_checkpoint(out_dir: str, *, seed: int = 0, text_layers: int = 2,
                         vision_depth: int = 2, dtype=torch.float32, shape: Optional[str] = None) -> str:
    """Write a complete Qwen2.5-VL checkpoint directory: config.json, tokenizer with chat
    template, preprocessor configs, and (for the tiny shape) random safetensors weights.

    shape: None for the tiny model; "3b" or "7b" for a released shape without weight files
    (build such models with random weights: megatron-spava-demo --random-weights).
    Idempotent: an existing complete directory is left as it is."""
    marker = "model.safetensors" if shape is None else "config.json"
    if os.path.isfile(os.path.join(out_dir, marker)):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_CONTROL_TOKENS}
    config = (tiny_hf_config(text_layers=text_layers, vision_depth=vision_depth) if shape is None
              else shaped_hf_config(shape))
    if shape is None:
        config["text_config"]["vocab_size"] = round_up(len(tokenizer), 64)
    config["text_config"]["bos_token_id"] = ids["<|endoftext|>"]
    config["text_config"]["eos_token_id"] = ids["<|im_end|>"]
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
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
    shared = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711],
              "processor_class": "Qwen2_5_VLProcessor"}
    pixels = ({"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64} if shape is None else
              {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28})  # HF's video defaults
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({**shared, "image_processor_type": "Qwen2VLImageProcessor", "size": pixels,
                   "min_pixels": pixels["shortest_edge"], "max_pixels": pixels["longest_edge"]},
                  f, indent=1)
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump({**shared, "video_processor_type": "Qwen2VLVideoProcessor", "size": pixels,
                   "do_sample_frames": False}, f, indent=1)
    return out_dir
