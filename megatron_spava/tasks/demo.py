"""The main job's default input: a needle video written as a real mp4 (PyAV, H.264) with
its question and true answer."""

from __future__ import annotations

import os

from .model import FPS
from .needles import NeedleSample, render_frames


def needle_video_path(work_dir: str, sample: NeedleSample) -> str:
    """Where the mp4 of `sample` goes under `work_dir` (one file per sample)."""
    return os.path.join(work_dir, f"needle_{sample.task}_{sample.groups}g_s{sample.seed}_i{sample.index}.mp4")


def write_needle_video(path: str, sample: NeedleSample) -> str:
    """Write (once) the mp4 of `sample` at FPS frames per second: every frame is kept when it
    is read back at that rate, so each needle stays one whole temporal group. A video cut
    short or damaged since is written again (`cache.cached_file`: its SHA-256 beside it)."""
    from ..cache import cached_file
    from ..video import write_video
    return cached_file(path, lambda tmp: write_video(tmp, render_frames(sample), fps=FPS))
