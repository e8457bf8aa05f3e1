"""From (video clip, question) to Qwen3-VL inputs, with the checkpoint's own tokenizer,
chat template and processor configuration.

The pinned processor (transformers 5.23 `Qwen3VLProcessor.replace_video_token`) replaces
the chat template's <|video_pad|> by one group per temporal patch (2 frames),

    <{t:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>

with t the mean timestamp of the group's two frames (source frame index / source fps), and
keeps the template's outer <|vision_start|> ... <|vision_end|> around them (the release's
processor, transformers 4.57, and vLLM drop that pair: docs/NOTES.md). Its video processor
needs torchvision: where it loads, `Qwen3VLPrompter` uses it as is; elsewhere the text is
built the same way here and the frames are preprocessed in plain torch like its
`_preprocess` (smart_resize over all frames, bicubic antialiased resize on uint8, rescale,
normalise, pad to whole temporal patches, merge-block-major patches). `backend` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ...video.inputs import VideoQAInputs
from ...video.preprocess import _resize
from ...video.prompt import VIDEO_PAD, ChatPrompter


@dataclass(frozen=True)
class Qwen3VLPreprocessConfig:
    """Video preprocessing settings (defaults: HF's Qwen3VLVideoProcessor)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 768 * 32 * 32
    image_mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: Tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_checkpoint(cls, path: str) -> "Qwen3VLPreprocessConfig":
        import json
        import os
        values = {}
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                continue
            with open(file) as f:
                raw = json.load(f)
            values.update({k: raw[k] for k in ("patch_size", "temporal_patch_size", "merge_size") if k in raw})
            values.update({k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw})
            if name.startswith("video"):
                if raw.get("cap_pixels_per_frame"):
                    raise ValueError(f"{file}: cap_pixels_per_frame is not implemented by the torch "
                                     f"fallback (the pinned processor's default is off)")
                size = raw.get("size") or {}
                values["min_pixels"] = size.get("shortest_edge", cls.min_pixels)
                values["max_pixels"] = size.get("longest_edge", cls.max_pixels)
        return cls(**values)


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                 min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Qwen3-VL's video resize target (HF's `video_processing_qwen3_vl.smart_resize`): sides
    multiples of `factor`, frames x area scaled into [min_pixels, max_pixels]."""
    if num_frames < temporal_factor:
        raise ValueError(f"a Qwen3-VL video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_video(frames, cfg: Qwen3VLPreprocessConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """frames: uint8 [T, H, W, 3] (numpy or torch, any device) -> (patches [t*h*w, 3 * T_p * P * P]
    float32 on that device, grid_thw [1, 3] long)."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).contiguous()
    P, Tp, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    h, w = smart_resize(x.shape[0], x.shape[2], x.shape[3], Tp, P * m, cfg.min_pixels, cfg.max_pixels)
    x = _resize(x, (h, w)).float() / 255.0
    mean = torch.tensor(cfg.image_mean, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / torch.tensor(cfg.image_std, device=x.device).view(1, 3, 1, 1)
    if x.shape[0] % Tp:  # repeat the last frame up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(Tp - x.shape[0] % Tp, -1, -1, -1)])
    t, gh, gw = x.shape[0] // Tp, h // P, w // P
    x = x.reshape(t, Tp, 3, gh // m, m, P, gw // m, m, P).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, 3 * Tp * P * P).contiguous(), torch.tensor([[t, gh, gw]])


def group_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int = 2) -> List[float]:
    """Seconds of each temporal group: its frames' source indices / fps, averaged over the
    first and last frame of the group (HF's `Qwen3VLProcessor._calculate_timestamps`; the
    last frame is repeated up to a whole group)."""
    indices = list(indices)
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [i / fps for i in indices]
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(seconds), temporal_patch_size)]


def video_placeholder(timestamps: Sequence[float], tokens_per_group: int, start: str = "<|vision_start|>",
                      pad: str = VIDEO_PAD, end: str = "<|vision_end|>") -> str:
    """The text the pinned processor puts in place of one <|video_pad|>."""
    return "".join(f"<{t:.1f} seconds>{start}{pad * tokens_per_group}{end}" for t in timestamps)


class Qwen3VLPrompter(ChatPrompter):
    """Builds VideoQAInputs (second_per_grid_ts None: Qwen3-VL's time is in the text) for a
    Qwen3-VL checkpoint directory (`ChatPrompter`'s use_hf_processor)."""

    def __init__(self, checkpoint: str, use_hf_processor="auto"):
        super().__init__(checkpoint, use_hf_processor)
        self.config = Qwen3VLPreprocessConfig.from_checkpoint(checkpoint)

    def __call__(self, clip, question: str) -> VideoQAInputs:
        """clip: a `megatron_spava.video.VideoClip` (frames, indices, source_fps)."""
        text = self.prompt_text(question)
        if self.processor is not None:
            meta = {"fps": clip.source_fps, "total_num_frames": clip.source_frames,
                    "frames_indices": list(clip.indices)}
            out = self.processor(text=[text], videos=[clip.frames], do_sample_frames=False,
                                 video_metadata=[meta], cap_pixels_per_frame=False, return_tensors="pt")
            return VideoQAInputs(out["input_ids"], out["pixel_values_videos"], out["video_grid_thw"])
        pixels, grid = preprocess_video(clip.frames, self.config)
        if text.count(VIDEO_PAD) != 1:
            raise ValueError(f"the chat template must produce one {VIDEO_PAD} per video")
        per_group = int(grid[0, 1] * grid[0, 2]) // self.config.merge_size ** 2
        stamps = group_timestamps(clip.indices, clip.source_fps, self.config.temporal_patch_size)
        text = text.replace(VIDEO_PAD, video_placeholder(stamps, per_group))
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return VideoQAInputs(ids, pixels, grid)
