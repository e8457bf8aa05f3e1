"""The needle model: a small Qwen2.5-VL-architecture model trained here, from scratch, on the
needle tasks (`tools/train_needle_model.py`), shipped in `megatron_spava/assets/needle_qwen/`.
This module is also the Qwen2.5-VL family's needle kit (`models/qwen2_5_vl/needle.py`
re-exports it); other families have their own (`needle_kit`: Qwen3-VL's in
`models/qwen3_vl/needle.py`, shipped in `assets/needle_qwen3/`).

    from megatron_spava.tasks.model import shipped_checkpoint, NeedlePrompter
    ckpt = shipped_checkpoint()                       # directory: config, tokenizer, weights
    prompter = NeedlePrompter(ckpt)
    inputs = prompter.inputs(sample, frames)          # VideoQAInputs for generate()

Its tokenizer is a byte-level BPE trained in code on the tasks' sentences, so that every
answer word is one token; the chat format is Qwen2.5-VL-Instruct's.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from .needles import ANSWER_WORDS, FRAMES_PER_GROUP, QUESTIONS, NeedleSample

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                         "needle_qwen")
SYSTEM_PROMPT = "You are a helpful assistant."
FPS = 2.0  # the frame rate the model sees: 2 frames per group -> one group per second

#: Model shape (HF Qwen2_5_VLConfig fields). M-RoPE gives time most of the rotary pairs, low
#: frequencies included, so that temporal positions up to ~32K (256K tokens) do not wrap.
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=1 << 18,
            rope_parameters={"rope_type": "default", "mrope_section": [20, 6, 6], "rope_theta": 1e6})
VISION = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
              fullatt_block_indexes=[2], window_size=112, patch_size=14, temporal_patch_size=2,
              spatial_merge_size=2, tokens_per_second=2, in_channels=3, hidden_act="silu")


def corpus() -> List[str]:
    """Sentences the tokenizer is trained on: the prompts and every answer form."""
    words = list(ANSWER_WORDS)
    lines = [SYSTEM_PROMPT, "system user assistant", *QUESTIONS.values(), " ".join(words)]
    lines += [f"{a} {b}" for a in words for b in words]  # leading-space forms, as in orderings
    return lines


def build_tokenizer():
    """The needle model's tokenizer (Qwen2Tokenizer, Qwen control tokens and chat template).
    Raises RuntimeError if an answer word is not a single token."""
    from ..models.qwen2_5_vl.tiny import build_tiny_tokenizer
    tok = build_tiny_tokenizer(vocab_size=640, corpus=corpus(), repeats=5)
    check_answer_tokens(tok)
    return tok


def check_answer_tokens(tok) -> None:
    """RuntimeError unless every answer word (and, for labels, its leading-space form) is one token."""
    for word in ANSWER_WORDS:
        forms = (word,) if word.isdigit() else (word, " " + word)  # " 7" is " " + "7" in Qwen's
        for form in forms:                                          # pre-tokenizer; counts stand alone
            if len(tok(form, add_special_tokens=False)["input_ids"]) != 1:
                raise RuntimeError(f"answer word {form!r} is not one token in the needle tokenizer")


def hf_classes():
    """(config class, model class) of HF transformers for this family."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def needle_kit(family: str = "qwen2_5_vl"):
    """The needle-model module of a model family (its folder's `needle.py`): ASSET_DIR,
    build_tokenizer(), hf_config(tokenizer, text_layers) -> config.json dict, hf_classes(),
    write_checkpoint_files(out_dir, tokenizer) and NeedlePrompter (prompt_ids, answer_ids,
    decode, pixels, inputs, positions, group_token, prefix_len, frame_grid,
    tokens_per_group, eos, pad). ValueError for a family without one."""
    from ..models.registry import get_family
    return get_family(family).needle()


def needle_prompter(checkpoint: str):
    """The NeedlePrompter of a checkpoint's family (config.json's model_type)."""
    from ..models.registry import detect_family
    return detect_family(checkpoint).needle().NeedlePrompter(checkpoint)


def hf_config(tokenizer, text_layers: int = TEXT["num_hidden_layers"]) -> dict:
    """config.json contents of the needle model for `tokenizer`; text_layers: decoder layers
    (the shipped model: 4)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>")}
    vocab = -(-len(tokenizer) // 64) * 64
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {**TEXT, "num_hidden_layers": text_layers, "vocab_size": vocab,
                        "bos_token_id": ids["<|endoftext|>"],
                        "eos_token_id": ids["<|im_end|>"], "tie_word_embeddings": False},
        "vision_config": dict(VISION),
    }


def shipped_checkpoint() -> str:
    """Directory of the shipped needle model; FileNotFoundError if it is not installed."""
    if not os.path.isfile(os.path.join(ASSET_DIR, "model.safetensors")):
        raise FileNotFoundError(
            f"the trained needle model is not at {ASSET_DIR} (train it with "
            f"tools/train_needle_model.py --out {ASSET_DIR}), or use --random-weights")
    return ASSET_DIR


class NeedlePrompter:
    """Token ids and pixels of needle samples for a checkpoint's tokenizer.

    The prompt is the chat template's text with one <|video_pad|> per video token:
    `<|im_start|>system ... <|vision_start|><|video_pad|>*N<|vision_end|>question<|im_end|>
    <|im_start|>assistant\\n`, built by concatenating ids tokenized once (the same ids as
    tokenizing the expanded text; tested).
    """

    #: seconds per temporal group passed to the model (None: time is in the prompt's text)
    seconds_per_group: Optional[float] = FRAMES_PER_GROUP / FPS

    def __init__(self, checkpoint_or_tokenizer):
        from transformers import AutoTokenizer
        if isinstance(checkpoint_or_tokenizer, str):
            self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_or_tokenizer, local_files_only=True)
            self.preprocess = self.preprocess_from(checkpoint_or_tokenizer)
        else:
            self.tokenizer = checkpoint_or_tokenizer
            self.preprocess = self.default_preprocess()
        tok = self.tokenizer
        self.video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
        self.eos = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = tok.convert_tokens_to_ids("<|endoftext|>")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\x00"}]}]
        text = tok.apply_chat_template(messages, chat_template=self.chat_template(), tokenize=False,
                                       add_generation_prompt=True)
        before, after = text.split("<|video_pad|>")
        self._before = tok(before, add_special_tokens=False)["input_ids"]
        q_before, q_after = after.split("\x00")
        self._question = {task: tok(q_before + q + q_after, add_special_tokens=False)["input_ids"]
                          for task, q in QUESTIONS.items()}

    # ---- what a family's prompter overrides (Qwen3-VL: models/qwen3_vl/needle.py) ----
    @staticmethod
    def preprocess_from(checkpoint: str):
        """The checkpoint's video preprocessing config."""
        from ..video.preprocess import VideoPreprocessConfig
        return VideoPreprocessConfig.from_checkpoint(checkpoint)

    @staticmethod
    def default_preprocess():
        """The preprocessing config when built from a tokenizer alone."""
        return preprocess_config()

    @staticmethod
    def chat_template() -> str:
        from ..models.qwen2_5_vl.tiny import CHAT_TEMPLATE
        return CHAT_TEMPLATE

    @property
    def prefix_len(self) -> int:
        """Prompt tokens before the first video token."""
        return len(self._before)

    @property
    def frame_grid(self) -> Tuple[int, int]:
        """Patches per side (h, w) of a needle frame after preprocessing."""
        from .needles import FRAME_SIZE
        return FRAME_SIZE // self.preprocess.patch_size, FRAME_SIZE // self.preprocess.patch_size

    @property
    def tokens_per_group(self) -> int:
        h, w = self.frame_grid
        return h * w // self.preprocess.merge_size ** 2

    def group_token(self, group: int) -> int:
        """Index in the prompt of the first video token of temporal group `group`."""
        return self.prefix_len + group * self.tokens_per_group

    def positions(self, ids: torch.Tensor, grid: torch.Tensor, hf_config) -> torch.Tensor:
        """M-RoPE positions [3, S] of one unpadded row ids [1, S] with video grid [1, 3]
        (Qwen's original convention, as our Megatron model uses)."""
        from ..models.qwen2_5_vl.rope import rope_index
        vision = hf_config.vision_config
        positions, _ = rope_index(
            ids, image_token_id=hf_config.image_token_id, video_token_id=hf_config.video_token_id,
            spatial_merge_size=vision.spatial_merge_size, tokens_per_second=vision.tokens_per_second,
            video_grid_thw=grid, second_per_grid_ts=torch.tensor([FRAMES_PER_GROUP / FPS]),
            convention="qwen")
        return positions[:, 0]

    def prompt_ids(self, question_task: str, video_tokens: int) -> List[int]:
        return self._before + [self.video_pad] * video_tokens + self._question[question_task]

    def answer_ids(self, answer: str) -> List[int]:
        """Answer tokens followed by <|im_end|>."""
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def pixels(self, frames: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [T, H, W, 3] (any device) -> (patches [N, 1176] float32, grid [1, 3])."""
        from ..video.preprocess import preprocess_frames
        return preprocess_frames(frames, self.preprocess)

    def inputs(self, sample: NeedleSample, frames: torch.Tensor):
        """VideoQAInputs of one sample for `generate` (batch 1)."""
        from ..video.inputs import VideoQAInputs
        pixels, grid = self.pixels(frames)
        tokens = int(grid.prod()) // self.preprocess.merge_size ** 2
        ids = torch.tensor([self.prompt_ids(sample.task, tokens)])
        seconds = None if self.seconds_per_group is None else torch.tensor([self.seconds_per_group])
        return VideoQAInputs(ids, pixels, grid, seconds)


def preprocess_config():
    from ..video.preprocess import VideoPreprocessConfig
    return VideoPreprocessConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def write_checkpoint_files(out_dir: str, tokenizer) -> None:
    """Tokenizer, chat template and processor configs of a needle checkpoint (no weights)."""
    import json

    from ..models.qwen2_5_vl.tiny import CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    cfg = preprocess_config()
    shared = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
              "processor_class": "Qwen2_5_VLProcessor"}
    pixels = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({**shared, "image_processor_type": "Qwen2VLImageProcessor", "size": pixels,
                   "min_pixels": pixels["shortest_edge"], "max_pixels": pixels["longest_edge"]}, f, indent=1)
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump({**shared, "video_processor_type": "Qwen2VLVideoProcessor", "size": pixels,
                   "do_sample_frames": False}, f, indent=1)
def save_checkpoint(model, out_dir: str, tokenizer, info: dict, archive: str = None,
                    write_files=None) -> None:
    """fp16 safetensors + config + tokenizer files + train_info.json (weights to a temporary
    name first), and with `archive`, a tar of the directory (its top folder named like
    out_dir's last component). write_files: the family's `write_checkpoint_files`
    (default: this module's, Qwen2.5-VL's)."""
    import json

    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    model.config.save_pretrained(out_dir)
    (write_files or write_checkpoint_files)(out_dir, tokenizer)
    with open(os.path.join(out_dir, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if archive:
        write_archive(out_dir, archive)


def write_archive(out_dir: str, archive: str) -> None:
    import tarfile
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    tmp = archive + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        tar.add(out_dir, arcname=os.path.basename(os.path.normpath(out_dir)))
    os.replace(tmp, archive)


def load_fp16_weights(model, out_dir: str) -> None:
    from safetensors.torch import load_file
    state = load_file(os.path.join(out_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m or not model.config.tie_word_embeddings]:
        raise RuntimeError(f"checkpoint mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")


