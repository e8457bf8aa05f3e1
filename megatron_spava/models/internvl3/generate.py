"""Video question answering with InternVL3 on megatron-core: frame-parallel vision,
context-parallel prefill into a distributed KV cache, exact greedy decode. The same loop
as `qwen2_5_vl.generate` with 1-D positions (the two are to become one generic loop).

    out = generate(model, InternVLInputs(input_ids, pixel_values), algo="spava", cp_group=cp)
    out.tokens, out.ttft_s, out.decode_s, out.first_logits
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
from ..qwen2_5_vl.generate import GenerationOutput, _broadcast_from_holder, _pick_once
from .model import InternVL3Model, encode_frames_frame_parallel, image_ordinals


@dataclass
class InternVLInputs:
    """One prompt (batch 1) as HF's InternVLProcessor produces it for a video.

    input_ids [1, S] (every frame `Frame{i}: <img><IMG_CONTEXT>*256</img>`);
    pixel_values [F, 3, 448, 448] (one tile per frame, normalised).
    """

    input_ids: Tensor
    pixel_values: Tensor


def query_length(input_ids: Tensor, image_token_id: int) -> int:
    """Query tokens = those after the `</img>` that closes the last frame (the question and
    the assistant prefix): everything past the last <IMG_CONTEXT> and the token after it."""
    hits = (input_ids[0] == image_token_id).nonzero()
    if hits.numel() == 0:
        raise ValueError("the prompt has no image context token: no video in it")
    return max(0, input_ids.shape[1] - int(hits[-1]) - 2)


@torch.no_grad()
def generate(model: InternVL3Model, inputs: InternVLInputs, *, algo: str = "spava",
             config: Optional[SpavaConfig] = None, cp_group: Optional[dist.ProcessGroup] = None,
             max_new_tokens: int = 16, query_len: Optional[int] = None,
             eos_token_ids: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
             frame_parallel: bool = True) -> GenerationOutput:
    """Greedy answer to one video prompt; every rank of the model's TP x CP grid calls it
    with the same inputs. Stops at an EOS token or after max_new_tokens.
    frame_parallel: CP ranks encode disjoint frame slices (else each encodes every frame)."""
    cfg = model.cfg
    device = device or next(model.parameters()).device
    rank, world = group_rank_world(cp_group)
    ids = inputs.input_ids.cpu()  # token bookkeeping on the host; only local rows go to the GPU
    S = ids.shape[1]
    cfg.check_prompt_length(S + max_new_tokens)
    frames = inputs.pixel_values.shape[0]
    if int((ids == cfg.image_token_id).sum()) != frames * cfg.tokens_per_tile:
        raise ValueError(f"the prompt has {int((ids == cfg.image_token_id).sum())} image tokens for "
                         f"{frames} frames of {cfg.tokens_per_tile}")
    lq = query_len if query_len is not None else query_length(ids, cfg.image_token_id)
    eos = set(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
    layout = plan_layout(algo, context_len=S - lq, query_len=lq, cp_size=world, config=config)
    idx = layout.local_indices(rank)
    cache = DistributedKVCache(layout, rank, world, max_new_tokens) if max_new_tokens > 1 else None

    sync(device)
    start = time.perf_counter()
    embeds = encode_frames_frame_parallel(model, inputs.pixel_values, cp_group if frame_parallel else None)
    sync(device)
    vision_s = time.perf_counter() - start
    x = model.decoder_input(ids[:, idx].to(device), embeds,
                            image_ordinals(ids, cfg.image_token_id)[:, idx].to(device))
    del embeds
    holds_last = bool((idx == S - 1).any())
    row = int((idx == S - 1).nonzero()[0]) if holds_last else 0  # others compute a dummy row
    with cp_request(layout, positions=idx, cache=cache):
        logits = model(x, logits_rows=torch.tensor([row]))
    last = logits[0, 0].float() if holds_last else None
    token = _pick_once(last, device)
    first_logits = _broadcast_from_holder(last, logits.shape[-1], holds_last, device)
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
        with cp_request(layout, positions=torch.tensor([S + step]), cache=cache, decode=True):
            logits = model(x)
        token = _pick_once(logits[0, -1].float() if rank == 0 else None, device)
    sync(device)
    return GenerationOutput(tokens=tokens, first_logits=first_logits, ttft_s=ttft,
                            decode_s=time.perf_counter() - start, layout=layout,
                            timings={"vision_s": vision_s, "prefill_llm_s": ttft - vision_s})
