"""Qwen2.5-VL video preprocessing in plain torch (no torchvision).

frames -> resize so that both sides are multiples of patch * merge and the area is
within [min_pixels, max_pixels] -> scale to [0, 1] -> normalise (CLIP mean/std) ->
pad the frame count to a multiple of the temporal patch -> patches
[t * h * w, C * T_p * P * P] in the merge-block-major order the vision encoder expects,
with grid_thw = (t, h, w) in patches.

`megatron_spava.video.prompt` uses HF's own processor instead when it can (it needs
torchvision); this path is the fallback and is checked against it where both run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VideoPreprocessConfig:
    """Video preprocessing settings (defaults: HF's Qwen2-VL video processor)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    image_mean: Tuple[float, float, float] = CLIP_MEAN
    image_std: Tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_checkpoint(cls, path: str) -> "VideoPreprocessConfig":
        """From the checkpoint's preprocessor_config.json (shared fields) and
        video_preprocessor_config.json (video fields, which win)."""
        values = {}
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                continue
            with open(file) as f:
                raw = json.load(f)
            values.update({k: raw[k] for k in ("patch_size", "temporal_patch_size", "merge_size")
                           if k in raw})
            values.update({k: tuple(raw[k]) for k in ("image_mean", "image_std") if k in raw})
            if name.startswith("video"):
                size = raw.get("size") or {}
                values["min_pixels"] = raw.get("min_pixels", size.get("shortest_edge", cls.min_pixels))
                values["max_pixels"] = raw.get("max_pixels", size.get("longest_edge", cls.max_pixels))
        return cls(**values)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Qwen2-VL's resize target: sides rounded to multiples of `factor`, area scaled into
    [min_pixels, max_pixels], aspect ratio kept as well as the rounding allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of uint8 frames [T, C, H, W] (torchvision's behaviour)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.device.type == "cpu":  # CPU interpolates uint8 directly
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    y = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def preprocess_frames(frames, cfg: VideoPreprocessConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """frames: uint8 [T, H, W, 3] (numpy or torch). Returns (pixel patches
    [t*h*w, 3 * T_p * P * P] float32, grid_thw [1, 3] long)."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).contiguous()  # T, C, H, W
    P, Tp, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    h, w = smart_resize(x.shape[2], x.shape[3], P * m, cfg.min_pixels, cfg.max_pixels)
    x = _resize(x, (h, w)).float() / 255.0
    mean = torch.tensor(cfg.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[0] % Tp:  # repeat the last frame up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(Tp - x.shape[0] % Tp, -1, -1, -1)])
    t, gh, gw = x.shape[0] // Tp, h // P, w // P
    x = x.reshape(t, Tp, 3, gh // m, m, P, gw // m, m, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, T_p, P, P
    return x.reshape(t * gh * gw, 3 * Tp * P * P).contiguous(), torch.tensor([[t, gh, gw]])
