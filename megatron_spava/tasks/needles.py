"""Synthetic long videos with needles, after VNBench (retrieval, ordering, counting), plus a
task whose answer must travel through context tokens ("scene").

    from megatron_spava.tasks import make_sample, render_frames, groups_for_tokens
    s = make_sample("ordering", groups=groups_for_tokens(4096), seed=0, index=7)
    frames = render_frames(s)            # uint8 [2 * s.groups, 112, 112, 3]
    s.question, s.answer                 # "In which order did the needles appear?", "red seven cross"

A video is a sequence of temporal groups (Qwen2.5-VL encodes 2 frames per group; at
112x112 a group is 16 LLM tokens). The haystack has structure: scenes of a gradient
background with drifting stripes and 1-3 moving objects, cut at random frames. Every
haystack colour is muted and no haystack frame has a white background. A needle fills one
whole group (2 identical frames): a white frame with a big black shape or seven-segment
digit, or a frame filled with a saturated colour inside a white border. A title card is a
saturated colour frame with a white band and black "text" dashes across its middle.

Tasks (question and answer are fixed strings; answers are words of `ANSWER_WORDS`):
  retrieval  one needle anywhere                    "What needle appeared in the video?"  -> label
  ordering   2-4 needles, distinct labels           "In which order did the needles appear?"
                                                                       -> labels in time order
  counting   one label shown k = 1-4 times          "How many times did the needle appear?" -> "k"
  scene      scenes of 16-128 groups (fewer in short videos), each opened by a title card (a
             colour, never that of the scene before), after an untitled intro; one needle (a
             shape or digit) in one of them  "Which title card came last before the needle?"
                                                             -> the colour of the needle's scene
In retrieval, ordering and counting the question's tokens can read the needles' own tokens
directly: Spava computes the query rows exactly, so those tasks test whether the needles'
representations survive approximate attention, but not whether context tokens can gather
information from other blocks. In `scene` they must: no token of the question can tell
which card preceded the needle (there are cards before and after it, and older cards before
the right one); only the needle's own tokens can look back, causally, for the latest card
before them, which often lies in an earlier block, on another rank.

Positions are uniform: needle groups are drawn uniformly over the video (so needles fall in
the anchor, in every rank's blocks and on block edges). Everything is a pure function of
(task, groups, seed, index): `make_sample` draws with numpy's PCG64 from those, and
`render_frames` is deterministic given the sample.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

TASKS = ("retrieval", "ordering", "counting", "scene")
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
#: Seven-segment digit needles, labelled by their names so that every label is a word (one
#: token with or without a leading space; Qwen's pre-tokenizer splits " 7" into two).
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LABELS = SHAPES + COLOURS + DIGITS  # every needle's label
COUNTS = tuple(str(k) for k in range(1, 5))  # counting answers
#: Every word an answer can contain (one token each in the needle model's tokenizer).
ANSWER_WORDS = tuple(dict.fromkeys(LABELS + COUNTS))
QUESTIONS = {
    "retrieval": "What needle appeared in the video?",
    "ordering": "In which order did the needles appear?",
    "counting": "How many times did the needle appear?",
    "scene": "Which title card came last before the needle?",
}
RGB = {"red": (230, 25, 25), "green": (20, 190, 40), "blue": (30, 70, 235), "yellow": (245, 215, 0)}

FRAMES_PER_GROUP = 2  # Qwen2.5-VL's temporal patch
FRAME_SIZE = 112      # 8x8 patches of 14 -> 4x4 merged tokens
TOKENS_PER_GROUP = (FRAME_SIZE // 28) ** 2
ORDER_NEEDLES = (2, 4)  # inclusive range of needles in `ordering`
SCENE_GROUPS = (16, 128)  # scene lengths in groups in `scene` (capped to fit short videos)


@dataclass(frozen=True)
class NeedleSample:
    """One video and its question.

    groups: temporal groups (the video has FRAMES_PER_GROUP * groups frames).
    needles: (group, label) in time order. cards: (group, colour) of title cards, in time
    order (scene task only). cuts: frame numbers where a new haystack scene starts (0 first).
    seed, index: what it was drawn from (haystack details are drawn from them too).
    """

    task: str
    groups: int
    needles: Tuple[Tuple[int, str], ...]
    cards: Tuple[Tuple[int, str], ...]
    cuts: Tuple[int, ...]
    question: str
    answer: str
    seed: int
    index: int
    size: int = FRAME_SIZE

    @property
    def frames(self) -> int:
        return FRAMES_PER_GROUP * self.groups

    @property
    def video_tokens(self) -> int:
        return self.groups * (self.size // 28) ** 2


def groups_for_tokens(tokens: int, size: int = FRAME_SIZE) -> int:
    """Temporal groups whose video tokens come closest to `tokens` (at least 4)."""
    return max(4, round(tokens / (size // 28) ** 2))


def _rng(task: str, groups: int, seed: int, index: int, stream: int = 0) -> np.random.Generator:
    key = [zlib.crc32(task.encode()), groups, seed, index, stream]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _distinct(rng, count: int, low: int, high: int) -> list:
    """`count` distinct integers in [low, high), uniformly, sorted."""
    return sorted(int(x) for x in rng.choice(np.arange(low, high), size=count, replace=False))


def make_sample(task: str, *, groups: int, seed: int = 0, index: int = 0,
                size: int = FRAME_SIZE) -> NeedleSample:
    """Draw one sample (pure: the same arguments give the same sample)."""
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; choose from {TASKS}")
    if size % 28:
        raise ValueError(f"frame size must be a multiple of 28 (patch 14 x merge 2), got {size}")
    need = {"retrieval": 1, "ordering": ORDER_NEEDLES[1], "counting": len(COUNTS),
            "scene": 4}[task]
    if groups < max(need, 4):
        raise ValueError(f"task {task!r} needs at least {max(need, 4)} temporal groups, got {groups}")
    rng = _rng(task, groups, seed, index)
    cards: list = []
    if task == "retrieval":
        needles = [(_distinct(rng, 1, 0, groups)[0], LABELS[rng.integers(len(LABELS))])]
        answer = needles[0][1]
    elif task == "ordering":
        k = int(rng.integers(ORDER_NEEDLES[0], ORDER_NEEDLES[1] + 1))
        labels = [LABELS[i] for i in rng.choice(len(LABELS), size=k, replace=False)]
        needles = list(zip(_distinct(rng, k, 0, groups), labels))
        answer = " ".join(labels)
    elif task == "counting":
        k = int(rng.integers(1, len(COUNTS) + 1))
        label = LABELS[rng.integers(len(LABELS))]
        needles = [(g, label) for g in _distinct(rng, k, 0, groups)]
        answer = str(k)
    else:  # scene: titled scenes of bounded length after an untitled intro; the needle in one
        hi = max(2, min(SCENE_GROUPS[1], groups // 2))
        lo = max(2, min(SCENE_GROUPS[0], hi // 2))
        starts = [int(rng.integers(0, lo // 2 + 1))]  # a short intro: needles stay near uniform
        while starts[-1] + lo < groups - 1:
            starts.append(starts[-1] + int(rng.integers(lo, hi + 1)))
        starts = [g for g in starts if g < groups - 1]
        colours = [COLOURS[rng.integers(len(COLOURS))]]
        for _ in starts[1:]:  # neighbouring scenes differ: an older card is never right by luck
            colours.append([c for c in COLOURS if c != colours[-1]][rng.integers(len(COLOURS) - 1)])
        cards = list(zip(starts, colours))
        free = [g for g in range(starts[0] + 1, groups) if g not in set(starts)]
        needle = free[rng.integers(len(free))]
        shapes_digits = SHAPES + DIGITS
        needles = [(needle, shapes_digits[rng.integers(len(shapes_digits))])]
        answer = [c for g, c in cards if g < needle][-1]
    frames = FRAMES_PER_GROUP * groups
    # Haystack scene cuts: every 16-192 frames, plus a cut right after every title card.
    cuts, t = [0], 0
    while True:
        t += int(rng.integers(16, 193))
        if t >= frames:
            break
        cuts.append(t)
    cuts = sorted(set(cuts) | {FRAMES_PER_GROUP * (g + 1) for g, _ in cards if g + 1 < groups})
    return NeedleSample(task=task, groups=groups, needles=tuple(needles), cards=tuple(cards),
                        cuts=tuple(cuts), question=QUESTIONS[task], answer=answer, seed=seed,
                        index=index, size=size)


def eval_set(tasks: Sequence[str], tokens: int, count: int, seed: int) -> list:
    """`count` samples per task at about `tokens` video tokens: indices 0..count-1."""
    groups = groups_for_tokens(tokens)
    return [make_sample(t, groups=groups, seed=seed, index=i) for t in tasks for i in range(count)]


# ----------------------------------------------------------------------------- rendering

def _grid(size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")  # y, x [size, size]


def _shape_mask(label: str, size: int, device) -> torch.Tensor:
    """bool [size, size]: where a needle's black symbol is drawn."""
    y, x = _grid(size, device)
    c, s = size / 2, size / 112  # geometry designed at 112 px, scaled
    dy, dx = y - c, x - c
    if label == "circle":
        return dy ** 2 + dx ** 2 <= (38 * s) ** 2
    if label == "square":
        return (dx.abs() <= 34 * s) & (dy.abs() <= 34 * s)
    if label == "triangle":
        top, bottom = -38 * s, 34 * s
        return (dy >= top) & (dy <= bottom) & (dx.abs() <= (dy - top) * 0.58)
    if label == "cross":
        arm, half = 11 * s, 40 * s
        return ((dx.abs() <= arm) & (dy.abs() <= half)) | ((dy.abs() <= arm) & (dx.abs() <= half))
    if label in DIGITS:  # seven segments a-g in a 56 x 88 box, strokes 12 px
        segments = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg",
                    "abcdfg")[DIGITS.index(label)]
        w, h, t = 28 * s, 44 * s, 6 * s  # half width, half height, half stroke
        horizontal = lambda cy: (dx.abs() <= w) & ((dy - cy).abs() <= t)
        vertical = lambda cx, y0, y1: ((dx - cx).abs() <= t) & (dy >= y0 - t) & (dy <= y1 + t)
        parts = {"a": horizontal(-h), "g": horizontal(0.0), "d": horizontal(h),
                 "f": vertical(-w, -h, 0.0), "b": vertical(w, -h, 0.0),
                 "e": vertical(-w, 0.0, h), "c": vertical(w, 0.0, h)}
        mask = torch.zeros_like(y, dtype=torch.bool)
        for seg in segments:
            mask |= parts[seg]
        return mask
    raise ValueError(f"no symbol for label {label!r}")


@functools.lru_cache(maxsize=8)
def _bank(size: int, device: str) -> Tuple[dict, dict]:
    """Needle images {label: uint8 [size, size, 3]} and title cards {colour: ...}."""
    white = torch.full((size, size, 3), 255, dtype=torch.uint8, device=device)
    needles = {}
    for label in LABELS:
        img = white.clone()
        if label in COLOURS:
            b = max(1, round(12 * size / 112))
            img[b:size - b, b:size - b] = torch.tensor(RGB[label], dtype=torch.uint8, device=device)
        else:
            img[_shape_mask(label, size, device)] = 15
        needles[label] = img
    y, x = _grid(size, device)
    band = (y - size / 2).abs() <= 14 * size / 112
    dashes = band & ((y - size / 2).abs() <= 4 * size / 112) & (((x // (10 * size / 112)) % 2) == 0) \
        & ((x - size / 2).abs() <= 40 * size / 112)
    border = (torch.minimum(torch.minimum(y, x), torch.minimum(size - y, size - x)) <= 5 * size / 112)
    cards = {}
    for colour in COLOURS:
        img = torch.empty((size, size, 3), dtype=torch.uint8, device=device)
        img[:] = torch.tensor(RGB[colour], dtype=torch.uint8, device=device)
        img[band] = 255
        img[dashes | border] = 15
        cards[colour] = img
    return needles, cards


def haystack_params(sample: NeedleSample) -> dict:
    """Per-scene parameters (numpy) of the haystack, drawn from the sample's own stream."""
    rng = _rng(sample.task, sample.groups, sample.seed, sample.index, stream=1)
    n = len(sample.cuts)
    muted = lambda *shape: 0.55 * rng.uniform(40, 200, size=(*shape, 3)) + 0.45 * 110.0
    k = 3  # object slots per scene; a scene uses 1-3
    return dict(
        c0=muted(n), c1=muted(n), grad_angle=rng.uniform(0, 2 * math.pi, n),
        stripe_freq=rng.uniform(0.08, 0.45, n), stripe_angle=rng.uniform(0, math.pi, n),
        stripe_amp=rng.uniform(8, 30, n), stripe_speed=rng.uniform(-0.4, 0.4, n),
        obj_on=(np.arange(k)[None] < rng.integers(1, k + 1, n)[:, None]),
        obj_colour=0.7 * rng.uniform(30, 220, size=(n, k, 3)) + 0.3 * 110.0,
        obj_radius=rng.uniform(6, 18, (n, k)), obj_box=rng.random((n, k)) < 0.5,
        obj_pos=rng.uniform(0, 1, (n, k, 2)), obj_vel=rng.uniform(-0.03, 0.03, (n, k, 2)),
    )


def _bounce(p: torch.Tensor) -> torch.Tensor:
    """Triangle wave folding any real into [0, 1] (a point bouncing between walls)."""
    p = torch.remainder(p, 2.0)
    return torch.where(p > 1, 2 - p, p)


def render_frames(sample: NeedleSample, device="cpu", chunk: int = 1024) -> torch.Tensor:
    """uint8 frames [2 * groups, size, size, 3] of `sample`, rendered on `device` in chunks
    of `chunk` frames (see `render_videos`)."""
    return render_videos([sample], device, chunk)


def render_videos(samples: Sequence[NeedleSample], device="cpu", chunk: int = 1024,
                  params: Optional[Sequence[dict]] = None) -> torch.Tensor:
    """The frames of several samples of one frame size, concatenated in order: uint8
    [sum of 2 * groups, size, size, 3]. Rendered together (the same pixels as one by one),
    in chunks of `chunk` frames.

    A haystack frame of scene s at frame t of the scene: the scene's colour ramp plus
    stripes drifting with t, sin(f u + w t) = sin(f u) cos(w t) + cos(f u) sin(w t) (u the
    coordinate along the stripes' normal), then the scene's objects at their positions at t.
    Per-scene images are built once; per-frame work is a few passes over the frames.
    params: the samples' `haystack_params`, if already drawn (e.g. by a prefetch thread)."""
    device = torch.device(device)
    size = samples[0].size
    if any(s.size != size for s in samples):
        raise ValueError("render_videos: every sample must have the same frame size")
    params = list(params) if params is not None else [haystack_params(s) for s in samples]
    p = {k: torch.as_tensor(np.concatenate([q[k] for q in params]), device=device,
                            dtype=torch.float32 if params[0][k].dtype != bool else torch.bool)
         for k in params[0]}
    starts = np.cumsum([0] + [s.frames for s in samples])
    cuts = torch.tensor([int(c + o) for s, o in zip(samples, starts) for c in s.cuts], device=device)
    T = int(starts[-1])
    y, x = _grid(size, device)
    a = p["grad_angle"][:, None, None]
    ramp = (0.5 + ((x - size / 2) * torch.cos(a) + (y - size / 2) * torch.sin(a)) / (1.5 * size)).clamp(0, 1)
    base = p["c0"][:, None, None] + (p["c1"] - p["c0"])[:, None, None] * ramp[..., None]  # [n, H, W, 3]
    sa = p["stripe_angle"][:, None, None]
    u = p["stripe_freq"][:, None, None] * (x * torch.cos(sa) + y * torch.sin(sa))
    amp = p["stripe_amp"][:, None, None]
    sin_u, cos_u = amp * torch.sin(u), amp * torch.cos(u)  # [n, H, W]
    coord = y[:, 0]  # [H] pixel centres (rows and columns alike)
    out = torch.empty((T, size, size, 3), dtype=torch.uint8, device=device)
    for lo in range(0, T, chunk):
        t = torch.arange(lo, min(T, lo + chunk), device=device)
        scene = torch.searchsorted(cuts, t, right=True) - 1
        local_t = (t - cuts[scene]).float()
        w = (p["stripe_speed"][scene] * local_t)[:, None, None]
        stripes = sin_u[scene] * torch.cos(w) + cos_u[scene] * torch.sin(w)  # [t, H, W]
        img = (base[scene] + stripes[..., None]).round_().clamp_(0, 235).to(torch.uint8)
        pos = _bounce(p["obj_pos"][scene] + p["obj_vel"][scene] * local_t[:, None, None]) * size
        for j in range(p["obj_on"].shape[1]):
            dy = (coord[None, :] - pos[:, j, 0, None])[:, :, None]  # [t, H, 1]
            dx = (coord[None, :] - pos[:, j, 1, None])[:, None, :]  # [t, 1, W]
            r = p["obj_radius"][scene, j][:, None, None]
            disc = dy * dy + dx * dx <= r * r
            box = (dy.abs() <= r) & (dx.abs() <= r)
            on = p["obj_on"][scene, j][:, None, None]
            mask = torch.where(p["obj_box"][scene, j][:, None, None], box, disc) & on
            colour = p["obj_colour"][scene, j].round().to(torch.uint8)[:, None, None, :]
            img = torch.where(mask[..., None], colour, img)
        out[lo:lo + len(t)] = img
    needles, cards = _bank(size, str(device))
    for sample, offset in zip(samples, starts):
        for group, label in sample.needles:
            first = int(offset) + FRAMES_PER_GROUP * group
            out[first:first + FRAMES_PER_GROUP] = needles[label]
        for group, colour in sample.cards:
            first = int(offset) + FRAMES_PER_GROUP * group
            out[first:first + FRAMES_PER_GROUP] = cards[colour]
    return out


def score(prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def needle_blocks(sample: NeedleSample, layout, group_token) -> Optional[dict]:
    """Where the sample's needles and cards sit in a Spava layout: {"needles": [...],
    "cards": [...]} of "anchor" or the virtual block index of each item's first token.
    group_token: temporal group -> index of its first video token in the prompt (the
    NeedlePrompter's `group_token`). None for layouts without blocks (full, ring)."""
    if not hasattr(layout, "block_range"):
        return None
    def where(group: int):
        tok = group_token(group)
        if tok < layout.anchor_len:
            return "anchor"
        return (tok - layout.anchor_len) // layout.block_len
    return {"needles": [where(g) for g, _ in sample.needles], "cards": [where(g) for g, _ in sample.cards]}
