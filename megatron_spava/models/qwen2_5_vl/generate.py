"""Video question answering with Qwen2.5-VL on megatron-core: frame-parallel vision,
context-parallel prefill into a distributed KV cache, exact greedy decode.

    out = generate(model, inputs, algo="spava", cp_group=cp, max_new_tokens=16)
    out.tokens, out.ttft_s, out.decode_s, out.first_logits
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ...algos import plan_layout
from ...config import SpavaConfig
from ...context import cp_request
from ...distributed import group_rank_world
from ...inference import DistributedKVCache
from ...profiling import sync
from .model import Qwen25VLModel, encode_video_frame_parallel, video_ordinals
from .rope import decode_positions, rope_index


@dataclass
class VideoQAInputs:
    """One prompt (batch 1) as the processor produces it.

    input_ids [1, S]; pixel_values_videos [N, patch_dim]; video_grid_thw [n_videos, 3];
    second_per_grid_ts [n_videos] (seconds per temporal group).
    """

    input_ids: Tensor
    pixel_values_videos: Tensor
    video_grid_thw: Tensor
    second_per_grid_ts: Optional[Tensor] = None


@dataclass
class GenerationOutput:
    tokens: List[int]
    first_logits: Tensor  # [vocab] float32: logits of the prompt's last token (same on every rank)
    ttft_s: float  # vision + prefill until the first token is known everywhere
    decode_s: float  # the remaining tokens
    layout: object = None
    timings: dict = field(default_factory=dict)


def query_length(input_ids: Tensor, vision_end_token_id: int) -> int:
    """Query tokens = those after the last <|vision_end|> (question + assistant prefix)."""
    ends = (input_ids[0] == vision_end_token_id).nonzero()
    if ends.numel() == 0:
        raise ValueError("the prompt has no <|vision_end|>: no video in it")
    return input_ids.shape[1] - int(ends[-1]) - 1


def _pick_once(logits_row: Optional[Tensor], device: torch.device, group=None) -> int:
    """Greedy token chosen on the rank(s) holding the last position and broadcast to every
    rank of `group` (default: the world; others pass None)."""
    choice = torch.tensor([-1 if logits_row is None else int(logits_row.argmax())], device=device)
    if dist.is_initialized():
        dist.all_reduce(choice, op=dist.ReduceOp.MAX, group=group)
    return int(choice)


@torch.no_grad()
def generate(model: Qwen25VLModel, inputs: VideoQAInputs, *, algo: str = "spava",
             config: Optional[SpavaConfig] = None, cp_group: Optional[dist.ProcessGroup] = None,
             max_new_tokens: int = 16, query_len: Optional[int] = None,
             rope_convention: str = "qwen", eos_token_ids: Optional[Sequence[int]] = None,
             device: Optional[torch.device] = None, vision_group="cp",
             group: Optional[dist.ProcessGroup] = None) -> GenerationOutput:
    """Greedy answer to one video prompt; every rank of the model's TP x CP grid calls it
    with the same inputs. Stops at an EOS token or after max_new_tokens.
    vision_group: the group that shares the vision encoding ("cp": frame parallelism over
    the CP group; None: every rank encodes the whole video).
    group: the ranks answering this prompt together (its TP x CP grid), over which the
    chosen tokens and the first-token logits are shared; default the whole world. Pass it
    when data-parallel replicas answer different prompts at the same time."""
    cfg = model.cfg
    device = device or next(model.parameters()).device
    rank, world = group_rank_world(cp_group)
    ids = inputs.input_ids.cpu()  # token bookkeeping on the host; only local rows go to the GPU
    S = ids.shape[1]
    lq = query_len if query_len is not None else query_length(ids, cfg.vision_end_token_id)
    eos = set(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
    positions, deltas = rope_index(
        ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second,
        video_grid_thw=inputs.video_grid_thw, second_per_grid_ts=inputs.second_per_grid_ts,
        convention=rope_convention)
    layout = plan_layout(algo, context_len=S - lq, query_len=lq, cp_size=world, config=config)
    idx = layout.local_indices(rank)
    # The first token comes from the prefill itself: a cache is kept only for later ones.
    cache = DistributedKVCache(layout, rank, world, max_new_tokens) if max_new_tokens > 1 else None

    sync(device)
    start = time.perf_counter()
    embeds = encode_video_frame_parallel(model.visual, inputs.pixel_values_videos,
                                         inputs.video_grid_thw,
                                         cp_group if vision_group == "cp" else vision_group)
    sync(device)
    vision_s = time.perf_counter() - start
    ordinals = video_ordinals(ids, cfg.video_token_id)
    x = model.decoder_input(ids[:, idx].to(device), embeds, ordinals[:, idx].to(device))
    del embeds  # [n_video_tokens, hidden]: not needed once the local rows are placed
    holds_last = bool((idx == S - 1).any())
    row = int((idx == S - 1).nonzero()[0]) if holds_last else 0  # others compute a dummy row
    with cp_request(layout, cache=cache):
        logits = model(x, positions[:, :, idx].to(device), logits_rows=torch.tensor([row]))
    last = logits[0, 0].float() if holds_last else None
    token = _pick_once(last, device, group)
    first_logits = _broadcast_from_holder(last, logits.shape[-1], holds_last, device, group)
    sync(device)
    ttft = time.perf_counter() - start

    tokens: List[int] = []
    start = time.perf_counter()
    for step in range(max_new_tokens):
        if token in eos:
            break
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        cache.begin_token()
        x = model.decoder_input(torch.tensor([[token]], device=device))
        pos = decode_positions(positions, deltas, step, S).to(device)
        with cp_request(layout, cache=cache, decode=True):
            logits = model(x, pos)
        token = _pick_once(logits[0, -1].float() if rank == 0 else None, device, group)
    sync(device)
    return GenerationOutput(tokens=tokens, first_logits=first_logits, ttft_s=ttft,
                            decode_s=time.perf_counter() - start, layout=layout,
                            timings={"vision_s": vision_s, "prefill_llm_s": ttft - vision_s})


def _broadcast_from_holder(row: Optional[Tensor], vocab: int, holds: bool,
                           device: torch.device, group=None) -> Tensor:
    """The last-token logits on every rank of `group` (default: the world), broadcast from
    the lowest global rank holding it."""
    if not dist.is_initialized():
        return row.cpu()
    me = dist.get_rank()
    src = torch.tensor([me if holds else dist.get_world_size()], device=device)
    dist.all_reduce(src, op=dist.ReduceOp.MIN, group=group)
    buf = row.clone() if me == int(src) else torch.empty(vocab, device=device)
    dist.broadcast(buf, int(src), group=group)
    return buf.cpu()
