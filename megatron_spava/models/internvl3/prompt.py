"""From (video frames, question) to InternVL3 inputs, with the checkpoint's own tokenizer,
chat template and processor configuration.

HF's InternVLProcessor turns a video into one 448x448 tile per frame and replaces the
chat template's `<video>` by

    Frame1: <img><IMG_CONTEXT>*256</img>\\nFrame2: <img>...</img>\\n...

(`InternVLProcessor.replace_video_token`). Its video processor needs torchvision: where
that loads, `InternVLPrompter` uses it as is; elsewhere it builds the same text itself
and preprocesses in plain torch (resize to the tile size, bicubic antialiased on uint8;
rescale; normalise). `backend` says which one ran.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from ...video.inputs import InternVLInputs
from ...video.preprocess import _resize
from ...video.prompt import ChatPrompter
from .tiny import IMAGE_TOKENS, IMAGENET_MEAN, IMAGENET_STD


def video_placeholder(num_frames: int, tokens_per_frame: int, start: str = "<img>",
                      context: str = "<IMG_CONTEXT>", end: str = "</img>") -> str:
    """The text HF's InternVLProcessor puts in place of one `<video>`."""
    return "\n".join(f"Frame{i + 1}: {start}{context * tokens_per_frame}{end}" for i in range(num_frames))


@dataclass(frozen=True)
class TilePreprocessConfig:
    """Video preprocessing settings of an InternVL checkpoint (video_preprocessor_config.json)."""

    size: int = 448
    rescale_factor: float = 1 / 255
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN
    image_std: Tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_checkpoint(cls, path: str) -> "TilePreprocessConfig":
        values = {}
        file = os.path.join(path, "video_preprocessor_config.json")
        if os.path.isfile(file):
            with open(file) as f:
                raw = json.load(f)
            size = raw.get("size") or {}
            if size.get("height", cls.size) != size.get("width", cls.size):
                raise ValueError(f"InternVL tiles are square; {file} asks for {size}")
            values["size"] = int(size.get("height", cls.size))
            values.update({k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw})
            if "rescale_factor" in raw:
                values["rescale_factor"] = float(raw["rescale_factor"])
        return cls(**values)


def preprocess_tiles(frames, cfg: TilePreprocessConfig) -> torch.Tensor:
    """frames: uint8 [T, H, W, 3] (numpy or torch) -> float32 [T, 3, size, size]."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    x = _resize(x.permute(0, 3, 1, 2).contiguous(), (cfg.size, cfg.size)).float() * cfg.rescale_factor
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


class InternVLPrompter(ChatPrompter):
    """Builds InternVLInputs for an InternVL checkpoint directory (`ChatPrompter`'s
    use_hf_processor)."""

    def __init__(self, checkpoint: str, use_hf_processor="auto"):
        super().__init__(checkpoint, use_hf_processor)
        self.config = TilePreprocessConfig.from_checkpoint(checkpoint)
        with open(os.path.join(checkpoint, "config.json")) as f:
            self.tokens_per_frame = json.load(f).get("image_seq_length", 256)

    def __call__(self, frames, question: str) -> InternVLInputs:
        """frames: uint8 [T, H, W, 3] or a `megatron_spava.video.VideoClip`."""
        frames = getattr(frames, "frames", frames)
        text = self.prompt_text(question)
        if self.processor is not None:
            out = self.processor(text=[text], videos=[frames], return_tensors="pt")
            return InternVLInputs(out["input_ids"], out["pixel_values"])
        video = IMAGE_TOKENS["video_token"]
        if text.count(video) != 1:
            raise ValueError(f"the chat template must produce one {video} per video")
        names = {k: getattr(self.tokenizer, k, None) or v for k, v in IMAGE_TOKENS.items()}
        text = text.replace(video, video_placeholder(
            len(frames), self.tokens_per_frame, names["start_image_token"],
            names["context_image_token"], names["end_image_token"]))
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return InternVLInputs(ids, preprocess_tiles(frames, self.config))

