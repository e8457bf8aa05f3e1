"""Decode videos (mp4, mkv, webm, ... through PyAV/FFmpeg) or directories of frames,
sample frames by rate or count, and write synthetic test videos."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class VideoClip:
    """Sampled frames and their timing.

    frames: uint8 [T, H, W, 3]; fps: rate of the sampled frames (frames per second of
    video time); source: path; indices: sampled frame numbers in the source;
    source_frames / source_fps: the source's frame count and rate.
    """

    frames: np.ndarray
    fps: float
    source: str
    indices: List[int]
    source_frames: int
    source_fps: float


def _sample_indices(total: int, source_fps: float, fps: Optional[float], max_frames: Optional[int],
                    min_frames: int, multiple: int) -> List[int]:
    """Evenly spaced frame numbers: `fps` frames per second of video (or all frames),
    clamped to [min_frames, max_frames] and to a multiple of `multiple`."""
    want = total if fps is None else total / source_fps * fps
    if max_frames is not None:
        want = min(want, max_frames)
    want = min(max(want, min_frames), total)
    count = max(multiple, int(want) // multiple * multiple) if total >= multiple else total
    return [min(total - 1, int(i * total / count)) for i in range(count)]


def _decode_sampled(path: str, choose):
    """Decode a video twice: once to count its frames, then again converting to RGB only the
    frame numbers `choose(total, rate)` returns, so memory holds just the kept frames (a
    minute of 1080p30 would be 11 GB as RGB). Returns (frames, indices, total, rate)."""
    import av

    def video_stream(container):
        if not container.streams.video:
            raise ValueError(f"video {path} has no video stream (no frames)")
        return container.streams.video[0]

    try:
        with av.open(path) as container:
            stream = video_stream(container)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            total = sum(1 for _ in container.decode(stream))
        if not total:
            raise ValueError(f"video {path} contains no frames")
        indices = choose(total, rate)
        wanted = set(indices)
        with av.open(path) as container:
            kept = {i: frame.to_ndarray(format="rgb24")
                    for i, frame in enumerate(container.decode(video_stream(container))) if i in wanted}
    except av.error.FFmpegError as err:  # invalid data, truncated file, unknown format
        raise ValueError(f"cannot decode video {path}: {err}") from None
    return [kept[i] for i in indices], indices, total, rate


def load_video(path: str, *, fps: Optional[float] = 2.0, max_frames: Optional[int] = 768,
               min_frames: int = 4, frames_fps: float = 2.0, multiple: int = 2) -> VideoClip:
    """Decode and sample a video file, or a directory of frame images (sorted by name,
    played at `frames_fps`).

    fps: frames to keep per second of video (None: every frame); max_frames/min_frames:
    bounds on the kept count, which is rounded down to a multiple of `multiple` (the
    temporal patch). Raises FileNotFoundError for a missing path and ValueError for a
    corrupt file or a video without frames.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):
        from PIL import Image
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"no frame images ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
        source_fps = frames_fps
        total = len(names)
        indices = _sample_indices(total, source_fps, fps, max_frames, min_frames, multiple)
        frames = [np.asarray(Image.open(os.path.join(path, names[i])).convert("RGB")) for i in indices]
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"frame images in {path} differ in size")
    else:
        frames, indices, total, rate = _decode_sampled(path, lambda total, rate: _sample_indices(
            total, rate or frames_fps, fps, max_frames, min_frames, multiple))
        source_fps = rate or frames_fps
    kept_fps = len(indices) / (total / source_fps)
    return VideoClip(frames=np.stack(frames), fps=kept_fps, source=path, indices=indices,
                     source_frames=total, source_fps=source_fps)


def count_sampled_frames(path: str, *, fps: Optional[float] = 2.0, max_frames: Optional[int] = 768,
                         min_frames: int = 4, frames_fps: float = 2.0, multiple: int = 2) -> int:
    """How many frames `load_video` with these arguments would keep, without converting any
    to RGB (one decode pass for a video file). Raises as `load_video` does: FileNotFoundError
    for a missing path, ValueError for a file that is not a decodable video."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):
        total = sum(1 for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not total:
            raise ValueError(f"no frame images ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
        return len(_sample_indices(total, frames_fps, fps, max_frames, min_frames, multiple))
    import av
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"video {path} has no video stream (no frames)")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            total = sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode video {path}: {err}") from None
    if not total:
        raise ValueError(f"video {path} contains no frames")
    return len(_sample_indices(total, rate or frames_fps, fps, max_frames, min_frames, multiple))


def write_video(path: str, frames, *, fps: float, codec: str = "libx264", pix_fmt: str = "yuv444p",
                options: Optional[dict] = None) -> str:
    """Encode uint8 RGB frames [T, H, W, 3] (numpy or torch) to `path` with PyAV. Default:
    H.264 at 4:4:4, constant rate factor 0 (lossless in YUV; the RGB round trip is off by a
    level or two)."""
    import av
    from fractions import Fraction

    frames = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.shape} {frames.dtype}")
    if options is None:
        options = {"crf": "0", "preset": "veryfast"} if codec == "libx264" else {}
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_synthetic_video(path: str, *, frames: int = 32, height: int = 112, width: int = 112,
                          fps: int = 4, seed: int = 0, codec: str = "mpeg4") -> str:
    """Write an mp4 of coloured squares moving over a gradient (deterministic per seed).
    frames=0 writes a valid container with no frames (for error tests)."""
    import av

    rng = np.random.default_rng(seed)
    colors = rng.integers(64, 256, size=(3, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1),
                     np.full_like(xx, 64)], axis=-1).astype(np.uint8)
    side = max(4, min(height, width) // 5)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()
        for t in range(frames):
            img = base.copy()
            for k, color in enumerate(colors):
                phase = 2 * math.pi * (t / frames + k / 3)
                y = int((height - side) * (0.5 + 0.4 * math.sin(phase)))
                x = int((width - side) * (0.5 + 0.4 * math.cos(phase + k)))
                img[y:y + side, x:x + side] = color
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
