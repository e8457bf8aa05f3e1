"""Training-side helpers for the needle model on HF transformers (no megatron-core needed):
batches of rendered samples as HF inputs, teacher-forced exact-match scoring, and a batched
vision attention for equal windows.

A greedy answer equals the reference iff, fed the reference prefix, the model's argmax
is the next reference token at every answer position including the final <|im_end|>; so
`answer_exact` (one teacher-forced forward) measures exactly what greedy decoding would
score, without a decode loop.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .model import NeedlePrompter
from .needles import NeedleSample, render_videos


@dataclass
class Batch:
    """HF model inputs (`model(**batch.model_inputs())`) and where the answers are.

    input_ids [b, S] right-padded; pixel_values_videos [N, 1176]; video_grid_thw [b, 3];
    position_ids [3, b, S] (M-RoPE, Qwen's original convention, as our Megatron model uses);
    answer_start [b]: index of each row's first answer token; answer_len [b] (answer tokens
    including <|im_end|>).
    """

    input_ids: torch.Tensor
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    position_ids: torch.Tensor
    answer_start: torch.Tensor
    answer_len: torch.Tensor
    tasks: List[str]

    def model_inputs(self, one_video: bool = True) -> dict:
        """HF forward kwargs. one_video: hand the vision encoder all samples' groups as one
        video (t = all groups): every temporal group is its own attention segment, so the
        embeddings are the same, and HF's per-video Python loops run once instead of once
        per sample. The positions are given, so HF never needs the per-sample grids."""
        grid = self.video_grid_thw
        if one_video:
            grid = torch.cat([grid[:, :1].sum(0, keepdim=True), grid[:1, 1:]], dim=1)
        return dict(input_ids=self.input_ids, pixel_values_videos=self.pixel_values_videos,
                    video_grid_thw=grid, position_ids=self.position_ids)


@dataclass
class BatchPlan:
    """The host-side part of a batch (no pixels): what `plan_batch` computes, so that a
    thread can prepare the next batch while the GPU trains on this one."""

    samples: List[NeedleSample]
    params: List[dict]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    video_grid_thw: torch.Tensor
    answer_start: torch.Tensor
    answer_len: torch.Tensor


def plan_batch(samples: Sequence[NeedleSample], prompter: NeedlePrompter, hf_config) -> BatchPlan:
    """Token ids (right-padded), M-RoPE positions, grids and haystack parameters of a batch.
    prompter: any family's NeedlePrompter (`model.needle_kit`)."""
    from .needles import haystack_params

    h, w = prompter.frame_grid
    grid = torch.tensor([[s.groups, h, w] for s in samples])
    per_group = prompter.tokens_per_group
    rows, starts, lens = [], [], []
    for s in samples:
        prompt = prompter.prompt_ids(s.task, s.groups * per_group)
        answer = prompter.answer_ids(s.answer)
        rows.append(prompt + answer)
        starts.append(len(prompt))
        lens.append(len(answer))
    S = max(map(len, rows))
    ids = torch.full((len(rows), S), prompter.pad, dtype=torch.long)
    positions = torch.zeros(3, len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        # Rows differ only in their text lengths: each distinct row shape's positions once.
        key = (type(prompter).__module__, prompter.prefix_len, tuple(grid[i].tolist()), len(r))
        row = _POSITIONS.get(key)
        if row is None:
            row = _POSITIONS[key] = prompter.positions(ids[i:i + 1, :len(r)], grid[i:i + 1], hf_config)
        positions[:, i, :len(r)] = row
    return BatchPlan(list(samples), [haystack_params(s) for s in samples], ids, positions, grid,
                     torch.tensor(starts), torch.tensor(lens))


def make_batch(samples: Sequence[NeedleSample], prompter: NeedlePrompter, hf_config, device,
               frame_noise: int = 0, generator: torch.Generator = None,
               plan: BatchPlan = None) -> Batch:
    """Render `samples` on `device` and build one right-padded batch. frame_noise: uniform
    integer noise in [-frame_noise, frame_noise] added to every pixel (robustness to video
    compression); `generator` (on `device`) draws it. plan: `plan_batch(samples, ...)` if
    already computed."""
    device = torch.device(device)
    plan = plan or plan_batch(samples, prompter, hf_config)
    frames = render_videos(plan.samples, device, params=plan.params)  # all at once: [sum T, H, W, 3]
    if frame_noise:
        noise = torch.randint(-frame_noise, frame_noise + 1, frames.shape, device=device,
                              generator=generator, dtype=torch.int16)
        frames = (frames.to(torch.int16) + noise).clamp_(0, 255).to(torch.uint8)
    # Every video has whole temporal groups, so the patches of the concatenated frames are
    # the concatenation of each video's patches (the processor's order is group-major).
    pixels, whole = prompter.pixels(frames)
    if whole[0, 1:].tolist() != plan.video_grid_thw[0, 1:].tolist():
        raise ValueError(f"frames of {tuple(frames.shape[1:3])} give a {whole[0, 1:].tolist()} patch "
                         f"grid; the needle model's prompts assume {plan.video_grid_thw[0, 1:].tolist()}")
    return Batch(input_ids=plan.input_ids.to(device), pixel_values_videos=pixels.to(device),
                 video_grid_thw=plan.video_grid_thw.to(device), position_ids=plan.position_ids.to(device),
                 answer_start=plan.answer_start, answer_len=plan.answer_len,
                 tasks=[s.task for s in plan.samples])


#: (family's prompter, prefix, grid, row length) -> positions [3, length]: rows of one family
#: with equal lengths have equal positions (text counts up, the groups are the same)
_POSITIONS: dict = {}


def answer_logits(logits: torch.Tensor, batch: Batch):
    """(logits [n, V] predicting every answer token, targets [n], row of each [n])."""
    rows, cols = [], []
    for i, (start, length) in enumerate(zip(batch.answer_start.tolist(), batch.answer_len.tolist())):
        rows += [i] * length
        cols += list(range(start - 1, start - 1 + length))  # position j predicts token j + 1
    rows_t = torch.tensor(rows, device=logits.device)
    cols_t = torch.tensor(cols, device=logits.device)
    return logits[rows_t, cols_t], batch.input_ids[rows_t, cols_t + 1], rows_t


def loss_and_exact(logits: torch.Tensor, batch: Batch):
    """Mean cross-entropy over answer tokens, and a bool [b]: every answer token is the argmax."""
    pred, target, rows = answer_logits(logits, batch)
    loss = F.cross_entropy(pred.float(), target)
    wrong = torch.zeros(len(batch.tasks), device=logits.device)
    wrong.index_add_(0, rows, (pred.argmax(-1) != target).float())
    return loss, wrong == 0


#: HF vision attention classes whose segments (cu_seqlens) `batch_vision_attention` batches
VISION_ATTENTION = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention")


def batch_vision_attention(model) -> int:
    """Make HF's Qwen2.5-VL / Qwen3-VL vision attention run all its segments in one SDPA
    call when they have equal lengths (here every temporal group is a window, or for
    Qwen3-VL a frame, of the same size); HF otherwise loops over the segments in Python.
    Other cases fall back to HF's forward. Same math (tested against HF's forward).
    Returns the number of modules patched."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in VISION_ATTENTION:
            continue
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        original = module.forward

        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, *args,
                    _original=original, _rotary=rotary, **kwargs):
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            L = int(lengths[0])
            if args or position_embeddings is None or not bool((lengths == L).all()):
                return _original(hidden_states, cu_seqlens, position_embeddings, *args, **kwargs)
            n = hidden_states.shape[0]
            q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = position_embeddings
            q, k = _rotary(q, k, cos, sin)
            q, k, v = (t.reshape(n // L, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
            return self.proj(out.transpose(1, 2).reshape(n, -1))

        module.forward = types.MethodType(forward, module)
        count += 1
    return count
