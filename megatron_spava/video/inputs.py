"""The inputs of one video question (batch 1), as each model family's processor makes them
(`video.prompt.VideoPrompter`, `models.internvl3.prompt.InternVLPrompter`) and
`inference.generate` takes them. Every type has `input_ids` (generate cuts and extends the
prompt with dataclasses.replace) and `frame_groups` (the units frame parallelism splits)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class VideoQAInputs:
    """Qwen2.5-VL: patches and their grid.

    input_ids [1, S]; pixel_values_videos [N, patch_dim]; video_grid_thw [n_videos, 3];
    second_per_grid_ts [n_videos] (seconds per temporal group).
    """

    input_ids: Tensor
    pixel_values_videos: Tensor
    video_grid_thw: Tensor
    second_per_grid_ts: Optional[Tensor] = None

    @property
    def frame_groups(self) -> int:
        """Temporal groups (2 frames each) of all videos."""
        return int(self.video_grid_thw[:, 0].sum())


@dataclass
class InternVLInputs:
    """InternVL3: one tile per frame, as HF's InternVLProcessor produces it for a video.

    input_ids [1, S] (every frame `Frame{i}: <img><IMG_CONTEXT>*256</img>`);
    pixel_values [F, 3, 448, 448] (one tile per frame, normalised).
    """

    input_ids: Tensor
    pixel_values: Tensor

    @property
    def frame_groups(self) -> int:
        """Frames (each its own group)."""
        return int(self.pixel_values.shape[0])


def pin_pixels(inputs):
    """A copy of `inputs` (any of the types above) whose pixel tensors (fields named
    pixel_values*) sit in page-locked host memory, as a decoding pipeline on a CUDA machine
    leaves its frames: each rank's slice then reaches the GPU by DMA at the bus's speed and
    without blocking the host (`to_device`), instead of through a pageable staging copy
    (92 ms for one rank's 616 MB of float32 patches at 128K tokens, 7B shape, one H100:
    BENCHMARKS.md section 13). Needs CUDA."""
    pinned = {f.name: getattr(inputs, f.name).pin_memory() for f in dataclasses.fields(inputs)
              if f.name.startswith("pixel_values") and isinstance(getattr(inputs, f.name), Tensor)}
    return dataclasses.replace(inputs, **pinned)


def to_device(pixels: Tensor, device) -> Tensor:
    """pixels on `device`: asynchronously when they are page-locked (`pin_pixels`), in stream
    order with the kernels that read them."""
    return pixels.to(device, non_blocking=pixels.is_pinned())
