"""Video question answering on megatron-core, one loop for every model family:
frame-parallel vision, context-parallel prefill into a distributed KV cache, exact greedy
decode.

    out = generate(model, inputs, algo="spava", cp_group=cp, max_new_tokens=16)
    out.tokens, out.ttft_s, out.decode_s, out.first_logits

    context, query = split_prompt(model, inputs.input_ids)
    outs = answer_questions(model, replace(inputs, input_ids=context), [q1, q2], cp_group=cp)
                                                  # one video prefill, several questions

The model (Qwen25VLModel, InternVL3Model: `models.common.VideoLanguageModel`) supplies what
differs between families; inputs are its family's type (`video.inputs`):
  model.cfg.eos_token_ids
  model.query_length(input_ids [1, S]) -> l_q: the default query, the tokens after the video
  model.prompt_positions(input_ids [1, S], inputs, max_new_tokens=, rope_convention=)
      -> positions, with positions.take(idx) the position ids the model's forward takes for
      the prompt tokens at global indices idx (Qwen2.5-VL: 3-D M-RoPE [3, 1, s]; InternVL3:
      1-D [s]) and positions.decode(step) those of decoded token `step` (0-based). Raises
      ValueError (before any collective) for a prompt that does not fit its video.
  model.encode_video(inputs, cp_group) -> vision embeddings [n_vision_tokens, hidden] on
      every rank, each encoding a slice of the frames (cp_group None: all of them)
  model.vision_ordinals(input_ids [b, S]) -> [b, S]: the row of the vision embeddings each
      token takes, -1 for text
  model.decoder_input(input_ids [b, s], vision_embeds, ordinals [b, s]) -> [s, b, hidden]
  model(decoder_input [s, b, hidden], position_ids, logits_rows=) -> logits [b, s', vocab]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..algos import plan_layout
from ..config import SpavaConfig
from ..context import cp_request
from ..distributed import all_reduce, broadcast, global_rank_world, group_rank_world, is_emulated
from ..profiling import sync
from .kv_cache import DistributedKVCache


@dataclass
class GenerationOutput:
    tokens: List[int]
    first_logits: Tensor  # [vocab] float32: logits of the prompt's last token (same on every rank)
    ttft_s: float  # vision + prefill until the first token is known everywhere
    decode_s: float  # the remaining tokens
    layout: object = None
    timings: dict = field(default_factory=dict)


def _pick_once(logits_row: Optional[Tensor], device: torch.device, group=None) -> int:
    """Greedy token chosen on the rank(s) holding the last position and broadcast to every
    rank of `group` (default: the world; others pass None)."""
    choice = torch.tensor([-1 if logits_row is None else int(logits_row.argmax())], device=device)
    all_reduce(choice, "max", group)
    return int(choice)


def split_prompt(model, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """(context [1, n], query [1, l_q]) of a prompt [1, S]: the query is what follows the
    video (question + assistant prefix), by `model.query_length` (the model or its config)."""
    if not hasattr(model, "query_length"):
        raise TypeError("split_prompt(model, input_ids): the model (or its config) decides "
                        "where the query starts")
    n = input_ids.shape[1] - model.query_length(input_ids)
    return input_ids[:, :n], input_ids[:, n:]


def _encode_video(model, inputs, cp_group, config: SpavaConfig):
    """Vision embeddings on every rank: frame-parallel over the CP group, or (frame_parallel
    off) the whole video on every rank."""
    return model.encode_video(inputs, cp_group if config.frame_parallel else None)


def _positions(model, ids: Tensor, inputs, max_new_tokens: int, rope_convention: Optional[str],
               prompt_cache: Optional[dict] = None):
    """model.prompt_positions of the prompt ids [1, S] (host), from prompt_cache (see
    `generate`) when it holds them for this model, token ids, max_new_tokens and
    rope_convention."""
    key = ("positions", id(model), ids.numpy().tobytes(), max_new_tokens, rope_convention)
    if prompt_cache is not None and key in prompt_cache:
        return prompt_cache[key]
    positions = model.prompt_positions(ids, inputs, max_new_tokens=max_new_tokens,
                                       rope_convention=rope_convention)
    if prompt_cache is not None:
        prompt_cache[key] = positions
    return positions


def _local_input(model, inputs, ids: Tensor, idx: Tensor, cp_group, config: SpavaConfig, device,
                 start: float, prompt_cache: Optional[dict] = None) -> Tuple[Tensor, float, float]:
    """(this rank's decoder input [s_local, 1, hidden] for the prompt ids [1, S] at its local
    indices idx, the vision seconds, the part of them spent before `start`).

    The vision seconds run from `start` (host clock, after a device sync) to the embeddings.
    prompt_cache (see `generate`): embeddings found there under (model, cp_group if
    frame-parallel, frame_parallel) are reused, and their seconds are those of the call that
    encoded them (all spent before `start`); new ones are stored."""
    key = ("vision", id(model), id(cp_group) if config.frame_parallel else None, config.frame_parallel)
    cached = None if prompt_cache is None else prompt_cache.get(key)
    if cached is None:
        embeds = _encode_video(model, inputs, cp_group, config)
        sync(device)
        vision_s, earlier = time.perf_counter() - start, 0.0
        if prompt_cache is not None:
            prompt_cache[key] = (embeds, vision_s)
    else:
        embeds, vision_s = cached
        earlier = vision_s
    ordinals = model.vision_ordinals(ids)
    # without a cache, the vision embeddings [n_vision_tokens, hidden] are not needed once the
    # local rows are placed (decoder_input copies them)
    x = model.decoder_input(ids[:, idx].to(device), embeds, ordinals[:, idx].to(device))
    return x, vision_s, earlier


@torch.no_grad()
def generate(model, inputs, *, algo: str = "spava",
             config: Optional[SpavaConfig] = None, cp_group: Optional[dist.ProcessGroup] = None,
             max_new_tokens: int = 16, query_len: Optional[int] = None,
             rope_convention: Optional[str] = None, eos_token_ids: Optional[Sequence[int]] = None,
             device: Optional[torch.device] = None,
             group: Optional[dist.ProcessGroup] = None,
             prompt_cache: Optional[dict] = None) -> GenerationOutput:
    """Greedy answer to one video prompt; every rank of the model's TP x CP grid calls it
    with the same inputs (the model family's input type). Stops at an EOS token or after
    max_new_tokens.

    The query is the last `query_len` tokens (default: `model.query_length`, those after
    the video). rope_convention: the model's position rule where it has a choice
    (Qwen2.5-VL: "qwen", the default, or "hf"). With config.fuse_query (default) context
    and query are prefilled in one pass and the passing blocks are selected with the
    query; without it, the context
    is prefilled alone and the query runs over the KV cache (`answer_questions`).
    config.frame_parallel: the vision encoder runs on each rank's slice of the frames.
    group: the ranks answering this prompt together (its TP x CP grid), over which the
    chosen tokens and the first-token logits are shared; default the whole world. Pass it
    when data-parallel replicas answer different prompts at the same time. An emulated rank
    (`distributed.EmulatedGroup`, one rank of a W-rank layout run alone) passes its group
    both as cp_group and group.
    prompt_cache: a dict the caller keeps across calls on the same video (`inputs`' pixels
    and grid), e.g. every algorithm evaluated on one prompt, for work that depends on the
    prompt alone: the vision embeddings, encoded once per (model, cp_group,
    config.frame_parallel), and the rope positions, computed once per (model, token ids,
    max_new_tokens, rope_convention). Reused values are those computing again would give
    (the encoder is deterministic, the positions a function of the ids and the grid); a
    reused encoding counts its first encoding's seconds in ttft_s and timings["vision_s"].
    The dict holds them (embeddings on the device) until the caller drops it. Default:
    compute both in every call.
    """
    cfg = model.cfg
    config = SpavaConfig() if config is None else config
    ids = inputs.input_ids.cpu()  # token bookkeeping on the host; only local rows go to the GPU
    S = ids.shape[1]
    lq = query_len if query_len is not None else model.query_length(ids)
    if not config.fuse_query:  # two passes: the context, then the query over the cache
        return answer_questions(
            model, replace(inputs, input_ids=ids[:, :S - lq]), [ids[:, S - lq:]], algo=algo,
            config=config, cp_group=cp_group, max_new_tokens=max_new_tokens,
            rope_convention=rope_convention, eos_token_ids=eos_token_ids, device=device,
            group=group, prompt_cache=prompt_cache)[0]
    device = device or next(model.parameters()).device
    rank, world = group_rank_world(cp_group)
    eos = set(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
    positions = _positions(model, ids, inputs, max_new_tokens, rope_convention, prompt_cache)
    layout = plan_layout(algo, context_len=S - lq, query_len=lq, cp_size=world, config=config)
    idx = layout.local_indices(rank)
    # The first token comes from the prefill itself: a cache is kept only for later ones.
    cache = DistributedKVCache(layout, rank, world, max_new_tokens) if max_new_tokens > 1 else None

    sync(device)
    start = time.perf_counter()
    x, vision_s, earlier = _local_input(model, inputs, ids, idx, cp_group, layout.config, device, start,
                                        prompt_cache)
    holds_last = bool((idx == S - 1).any())
    row = int((idx == S - 1).nonzero()[0]) if holds_last else 0  # others compute a dummy row
    with cp_request(layout, cache=cache):
        logits = model(x, positions.take(idx), logits_rows=torch.tensor([row]))
    token, first_logits = _first_token(logits[0, 0].float() if holds_last else None, logits.shape[-1],
                                       device, group)
    sync(device)
    ttft = time.perf_counter() - start + earlier

    tokens, decode_s = _decode(model, layout, cache, token, positions, max_new_tokens, eos,
                               device, rank, group)
    return GenerationOutput(tokens=tokens, first_logits=first_logits, ttft_s=ttft,
                            decode_s=decode_s, layout=layout,
                            timings={"vision_s": vision_s, "prefill_llm_s": ttft - vision_s})


@torch.no_grad()
def answer_questions(model, inputs, queries: Sequence[Tensor], *,
                     algo: str = "spava", config: Optional[SpavaConfig] = None,
                     cp_group: Optional[dist.ProcessGroup] = None, max_new_tokens: int = 16,
                     rope_convention: Optional[str] = None, eos_token_ids: Optional[Sequence[int]] = None,
                     device: Optional[torch.device] = None,
                     group: Optional[dist.ProcessGroup] = None,
                     prompt_cache: Optional[dict] = None) -> List[GenerationOutput]:
    """Prefill one video's context once and answer several queries over it.

    inputs: the context alone: input_ids [1, n] (the prompt before the query: system
      prompt, video, ...) and its video; `split_prompt` cuts a full prompt.
    queries: token ids [1, l_q] (or [l_q]) per query, each appended to the context
      (question + assistant prefix; no video tokens).
    The context is prefilled alone (a layout with query_len=0: Spava's passing blocks are
    selected with the anchor-tail probe, see SpavaConfig.fuse_query) into the distributed
    KV cache. Each query then runs as a second pass over the cache (exact attention over
    the cached keys), its answer is decoded greedily, and the cache is rolled back to the
    context alone before the next query. Every rank of the TP x CP grid calls it with the
    same inputs. Returns one GenerationOutput per query; its ttft_s and timings (vision_s,
    context_s, query_s) count what that answer cost: vision and the context prefill for
    the first query, the query pass alone for later ones (the context is cached).
    group, prompt_cache: as in `generate` (the ranks sharing tokens and logits, default the
    world; vision embeddings and positions reused across calls on one video).
    """
    cfg = model.cfg
    device = device or next(model.parameters()).device
    rank, world = group_rank_world(cp_group)
    ctx = inputs.input_ids.cpu()
    n = ctx.shape[1]
    queries = [torch.as_tensor(q).reshape(1, -1).cpu() for q in queries]
    if not queries or any(q.numel() == 0 for q in queries):
        raise ValueError("answer_questions needs at least one query, each of at least one token")
    if any(bool((model.vision_ordinals(q) >= 0).any()) for q in queries):
        raise ValueError("a query holds video tokens: the video belongs to the context (inputs)")
    eos = set(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
    layout = plan_layout(algo, context_len=n, query_len=0, cp_size=world, config=config)
    idx = layout.local_indices(rank)
    cache = DistributedKVCache(layout, rank, world,
                               max_new_tokens=max(q.shape[1] for q in queries) + max_new_tokens)
    # positions of each whole prompt; the context's are the same in all (they depend only on
    # the tokens before them)
    rope = [_positions(model, torch.cat([ctx, q], dim=1), inputs, max_new_tokens, rope_convention,
                       prompt_cache) for q in queries]

    sync(device)
    start = time.perf_counter()
    x, vision_s, earlier = _local_input(model, inputs, ctx, idx, cp_group, layout.config, device, start,
                                        prompt_cache)
    with cp_request(layout, cache=cache):  # fills the cache; its one logits row is unused
        model(x, rope[0].take(idx), logits_rows=torch.tensor([0]))
    sync(device)
    context_s = time.perf_counter() - start + earlier - vision_s
    context_only = cache.snapshot()

    outputs = []
    for i, (q, positions) in enumerate(zip(queries, rope)):
        cache.restore(context_only)
        start = time.perf_counter()
        lq = q.shape[1]
        cache.begin_tokens(lq)  # the query's K/V go to the least-loaded rank
        with cp_request(layout, cache=cache, decode=True):
            logits = model(model.decoder_input(q.to(device)), positions.take(torch.arange(n, n + lq)),
                           logits_rows=torch.tensor([lq - 1]))
        # every rank holds the query rows
        token, first_logits = _first_token(logits[0, 0].float(), logits.shape[-1], device, group)
        sync(device)
        query_s = time.perf_counter() - start
        tokens, decode_s = _decode(model, layout, cache, token, positions, max_new_tokens, eos,
                                   device, rank, group)
        first = i == 0
        timings = {"vision_s": vision_s if first else 0.0, "context_s": context_s if first else 0.0,
                   "query_s": query_s}
        timings["prefill_llm_s"] = timings["context_s"] + query_s
        outputs.append(GenerationOutput(tokens=tokens, first_logits=first_logits,
                                        ttft_s=sum(timings[k] for k in ("vision_s", "context_s", "query_s")),
                                        decode_s=decode_s, layout=layout, timings=timings))
    return outputs


def _decode(model, layout, cache, token: int, positions, max_new_tokens: int, eos, device,
            rank: int, group=None) -> Tuple[List[int], float]:
    """Greedy decode from the first token over the distributed cache: (tokens, seconds).
    positions: the prompt's (`model.prompt_positions`); decoded tokens follow it."""
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
        with cp_request(layout, cache=cache, decode=True):
            logits = model(x, positions.decode(step))
        token = _pick_once(logits[0, -1].float() if rank == 0 else None, device, group)
    sync(device)
    return tokens, time.perf_counter() - start


def _first_token(row: Optional[Tensor], vocab: int, device: torch.device, group=None) -> Tuple[int, Tensor]:
    """(greedy first token, the prompt's last-token logits [vocab] float32 on the host), the
    same on every rank of `group` (default: the world). row: those logits on the ranks
    holding the prompt's last row, None elsewhere; they are broadcast from the lowest global
    rank holding them and the token is read off the broadcast copy."""
    if (dist.is_available() and dist.is_initialized()) or is_emulated(group):
        me, size = global_rank_world(group)
        src = all_reduce(torch.tensor([me if row is not None else size], device=device), "min", group)
        # (an emulated rank that does not hold the row gets a buffer of the true shape)
        buf = row.clone() if me == int(src) else torch.zeros(vocab, device=device)
        row = broadcast(buf, int(src), group)
    row = row.cpu()
    return int(row.argmax()), row
