"""The Qwen3-VL needle model: what `tools/train_needle_model.py --family qwen3_vl` trains and
`tools/eval_needles.py` reads (this family's entry of the needle-model interface,
`megatron_spava.tasks.model.needle_kit`), shipped in `megatron_spava/assets/needle_qwen3/`.

The same budget as the Qwen2.5-VL needle model (`tasks/model.py`: text width 256, 4
decoder layers, 4 heads / 2 KV heads, a 3-block vision tower of width 128), in Qwen3-VL's
architecture: QK-norm, head_dim 64 with interleaved M-RoPE (sections 12/10/10, the 8B's
proportions; rope theta 5e6), a vision tower without windows with learned position
embeddings (8 x 8 grid) and patch 16, DeepStack taps after vision blocks 0 and 1 added to
LLM layers 0 and 1.

The video is the needle tasks' 112-pixel frames resized to 128 x 128 (the processor's
smart_resize rounds 112 to 4 x 32), so a temporal group is 8 x 8 patches = 16 LLM tokens as
for the Qwen2.5-VL model, and the eval sets are the same videos. The prompt is Qwen3-VL's
chat format as the pinned processor writes it (`prompt.video_placeholder`): no system turn,
and every group behind its timestamp, `<t seconds><|vision_start|><|video_pad|>*16
<|vision_end|>`, inside the template's outer <|vision_start|> ... <|vision_end|>. At 2
frames per second a group is one second (timestamps 0.2, 1.2, ...), so a video of G groups
has about G x (16 + 2 + 5 to 9 timestamp tokens) prompt tokens: Qwen's pre-tokenizer
splits every digit.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import List, Tuple

import torch

from ...tasks.model import FPS, NeedlePrompter as BaseNeedlePrompter, check_answer_tokens, corpus as base_corpus
from ...tasks.needles import FRAME_SIZE, FRAMES_PER_GROUP
from .tiny import CHAT_TEMPLATE

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "assets", "needle_qwen3")

#: HF Qwen3VLConfig fields (text_config / vision_config).
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=1 << 18,
            rope_parameters={"rope_type": "default", "mrope_section": [12, 10, 10],
                             "mrope_interleaved": True, "rope_theta": 5e6})
VISION = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
              num_position_embeddings=64, deepstack_visual_indexes=[0, 1], patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh")
#: Pixel bounds of the processor config: any number of 128 x 128 frames up to 2^17
#: (smart_resize bounds frames x area), so that every group keeps 16 tokens.
MIN_PIXELS, MAX_PIXELS = 32 * 32 * 2, 128 * 128 * (1 << 17)


def corpus() -> List[str]:
    """The Qwen2.5-VL needle corpus plus timestamp text (so ' seconds' is one token)."""
    return base_corpus() + [f"<{g + 0.25:.1f} seconds>" for g in range(0, 4096, 7)]


def build_tokenizer():
    """Byte-level BPE trained in code (Qwen's pre-tokenizer and control tokens), Qwen3-VL's
    chat template. Raises RuntimeError if an answer word is not a single token."""
    from ..qwen2_5_vl.tiny import build_tiny_tokenizer
    tok = build_tiny_tokenizer(vocab_size=640, corpus=corpus(), repeats=5)
    tok.chat_template = CHAT_TEMPLATE
    check_answer_tokens(tok)
    return tok


def hf_config(tokenizer, text_layers: int = TEXT["num_hidden_layers"]) -> dict:
    """config.json contents for `tokenizer`; text_layers: decoder layers (shipped: 4)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>")}
    vocab = -(-len(tokenizer) // 64) * 64
    if len(VISION["deepstack_visual_indexes"]) > text_layers:
        raise ValueError(f"--text-layers {text_layers}: the Qwen3-VL needle model adds DeepStack "
                         f"features to {len(VISION['deepstack_visual_indexes'])} LLM layers")
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {**TEXT, "num_hidden_layers": text_layers, "vocab_size": vocab,
                        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                        "tie_word_embeddings": False},
        "vision_config": dict(VISION),
    }


def hf_classes():
    """(config class, model class) of HF transformers for this family."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    return Qwen3VLConfig, Qwen3VLForConditionalGeneration


def preprocess_config():
    from .prompt import Qwen3VLPreprocessConfig
    return Qwen3VLPreprocessConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def write_checkpoint_files(out_dir: str, tokenizer) -> None:
    """Tokenizer, chat template and processor configs of a needle checkpoint (no weights)."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    cfg = preprocess_config()
    pixels = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    shared = {"patch_size": cfg.patch_size, "temporal_patch_size": cfg.temporal_patch_size,
              "merge_size": cfg.merge_size, "image_mean": list(cfg.image_mean),
              "image_std": list(cfg.image_std), "processor_class": "Qwen3VLProcessor"}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({**shared, "image_processor_type": "Qwen2VLImageProcessor", "size": pixels}, f, indent=1)
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump({**shared, "video_processor_type": "Qwen3VLVideoProcessor", "size": pixels,
                   "do_sample_frames": False, "cap_pixels_per_frame": False, "fps": FPS}, f, indent=1)


@lru_cache(maxsize=None)
def _stamp_text(group: int) -> str:
    """The timestamp text of temporal group `group` of a needle video (frames 2g, 2g+1 at FPS)."""
    from .prompt import group_timestamps
    (t,) = group_timestamps([FRAMES_PER_GROUP * group + i for i in range(FRAMES_PER_GROUP)], FPS,
                            FRAMES_PER_GROUP)
    return f"<{t:.1f} seconds>"


class NeedlePrompter(BaseNeedlePrompter):
    """Token ids and pixels of needle samples for a Qwen3-VL needle checkpoint (or tokenizer).

    Prompt: `<|im_start|>user\\n<|vision_start|>` + per group `<t seconds><|vision_start|>
    <|video_pad|>*n<|vision_end|>` + `<|vision_end|>question<|im_end|>\\n<|im_start|>assistant\\n`,
    built by concatenating ids tokenized once (every timestamp sits between special tokens,
    so the same ids as tokenizing the expanded text; tested against `Qwen3VLPrompter`).
    Answers, decoding and `inputs` are the base prompter's; time is in the text.
    """

    seconds_per_group = None

    def __init__(self, checkpoint_or_tokenizer):
        from .prompt import smart_resize
        super().__init__(checkpoint_or_tokenizer)
        tok, pre = self.tokenizer, self.preprocess
        self._start = tok.convert_tokens_to_ids("<|vision_start|>")
        self._end = tok.convert_tokens_to_ids("<|vision_end|>")
        side = smart_resize(FRAMES_PER_GROUP, FRAME_SIZE, FRAME_SIZE, pre.temporal_patch_size,
                            pre.patch_size * pre.merge_size, pre.min_pixels, pre.max_pixels)
        self._grid = (side[0] // pre.patch_size, side[1] // pre.patch_size)
        self._stamps: List[List[int]] = []
        self._offsets: List[int] = [len(self._before)]  # token index where group g's text begins

    @staticmethod
    def preprocess_from(checkpoint: str):
        from .prompt import Qwen3VLPreprocessConfig
        return Qwen3VLPreprocessConfig.from_checkpoint(checkpoint)

    @staticmethod
    def default_preprocess():
        return preprocess_config()

    @staticmethod
    def chat_template() -> str:
        return CHAT_TEMPLATE

    @property
    def frame_grid(self) -> Tuple[int, int]:
        """Patches per side (h, w) of a needle frame after Qwen3-VL's smart_resize."""
        return self._grid

    def _grow(self, groups: int) -> None:
        """Tokenize the timestamps of groups [len(self._stamps), groups) (once)."""
        if groups <= len(self._stamps):
            return
        new = [_stamp_text(g) for g in range(len(self._stamps), groups)]
        for ids in self.tokenizer(new, add_special_tokens=False)["input_ids"]:
            self._stamps.append(ids)
            self._offsets.append(self._offsets[-1] + len(ids) + 2 + self.tokens_per_group)

    def group_token(self, group: int) -> int:
        """Index in the prompt of the first video token of temporal group `group`."""
        self._grow(group + 1)
        return self._offsets[group] + len(self._stamps[group]) + 1

    def prompt_ids(self, question_task: str, video_tokens: int) -> List[int]:
        if video_tokens % self.tokens_per_group:
            raise ValueError(f"{video_tokens} video tokens are not whole groups of {self.tokens_per_group}")
        groups = video_tokens // self.tokens_per_group
        self._grow(groups)
        ids = list(self._before)
        body = [self._start] + [self.video_pad] * self.tokens_per_group + [self._end]
        for g in range(groups):
            ids += self._stamps[g]
            ids += body
        return ids + self._question[question_task]

    def pixels(self, frames: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [T, H, W, 3] (any device) -> (patches [N, 1536] float32, grid [1, 3])."""
        from .prompt import preprocess_video
        return preprocess_video(frames, self.preprocess)

    def positions(self, ids: torch.Tensor, grid: torch.Tensor, hf_config) -> torch.Tensor:
        """M-RoPE positions [3, S] of one unpadded row ids [1, S] with video grid [1, 3]
        (HF's get_rope_index: each group's run is its own (1, h, w) grid)."""
        from .rope import rope_index
        positions, _ = rope_index(ids, image_token_id=hf_config.image_token_id,
                                  video_token_id=hf_config.video_token_id,
                                  spatial_merge_size=hf_config.vision_config.spatial_merge_size,
                                  video_grid_thw=grid)
        return positions[:, 0]
