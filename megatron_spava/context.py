"""How the per-request layout reaches Megatron's modules without changing their signatures.

Megatron builds one core-attention module per layer at model construction and calls
it with (query, key, value, attention_mask, ...) only; the rotary embedding is called
with a sequence length. Neither call can carry a per-request layout. So the caller
activates a request around the forward:

    with cp_request(layout, positions=local_positions):
        logits = model(tokens, position_ids, None)

and `SpavaCoreAttention` and the Spava rotary embeddings read it with
`current_request()`. `megatron_spava.batch.get_batch_on_this_cp_rank` returns everything
the `with` needs.

Lifecycle (what sets a request, what resets it):
  cp_request(...)   sets it for its `with` block (a `contextvars.ContextVar`: scoped to
                    the block and to the thread or task, nested blocks shadow outer ones,
                    reset on leaving, exceptions included). Prefer it.
  activate(...)     for loops that fetch a batch in one function and run the model in
                    another (Megatron-LM's get_batch / forward_step): sets a request that
                    stays active until the next activate() replaces it or deactivate()
                    clears it. A cp_request block shadows it while open.
  deactivate()      clears what activate() set.
Decode steps also need the cache's bookkeeping: `cache.begin_token()` once per step on
every rank before the forward (the cache raises otherwise, see inference/kv_cache.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class CPRequest:
    """One request's context-parallel state.

    layout: the algorithm's layout (`megatron_spava.algos.plan_layout`).
    positions: LongTensor [s_local], the global position of every local token, for 1-D
      RoPE (not needed for M-RoPE, whose ids the model receives directly).
    cache: a `megatron_spava.inference.DistributedKVCache`: prefill fills it, decode reads
      and extends it. None: no caching.
    decode: this forward adds tokens after the prefill over `cache` (a decode step, or a
      query over a cached context): m new tokens, the same on every rank; call
      `cache.begin_tokens(m)` before it.
    """

    layout: object
    positions: Optional[torch.Tensor] = None
    cache: Optional[object] = None
    decode: bool = False


_ACTIVE: contextvars.ContextVar[Optional[CPRequest]] = contextvars.ContextVar(
    "megatron_spava_request", default=None)  # set by cp_request
_ACTIVATED: contextvars.ContextVar[Optional[CPRequest]] = contextvars.ContextVar(
    "megatron_spava_activated_request", default=None)  # set by activate


@contextlib.contextmanager
def cp_request(layout, *, positions: Optional[torch.Tensor] = None, cache=None,
               decode: bool = False) -> Iterator[CPRequest]:
    """Make `layout` (and the local tokens' global `positions`, the KV cache, the decode
    flag) the active request."""
    request = CPRequest(layout, positions, cache, decode)
    token = _ACTIVE.set(request)
    try:
        yield request
    finally:
        _ACTIVE.reset(token)


def activate(layout, *, positions: Optional[torch.Tensor] = None, cache=None,
             decode: bool = False) -> CPRequest:
    """Make a request active without a `with` block, replacing the one the previous
    activate() set; it stays active until the next activate() or deactivate(). For loops
    that fetch a batch in one function and run the model in another, as Megatron-LM's
    get_batch/forward_step do; prefer `cp_request` elsewhere."""
    request = CPRequest(layout, positions, cache, decode)
    _ACTIVATED.set(request)
    return request


def deactivate() -> None:
    """Clear the request activate() set (no-op if none). cp_request blocks are unaffected."""
    _ACTIVATED.set(None)


def current_request() -> Optional[CPRequest]:
    """The active request: the innermost open cp_request, else the activated one, else
    None."""
    request = _ACTIVE.get()
    return request if request is not None else _ACTIVATED.get()


def require_request(cp_group, who: str) -> Optional[CPRequest]:
    """The active request; None is allowed only without context parallelism. Raises
    RuntimeError (on every rank: all of them run the same forward) otherwise."""
    request = current_request()
    if request is None and cp_group is not None and cp_group.size() > 1:
        raise RuntimeError(
            f"{who}: no context-parallel request is active. Shard the batch with "
            f"megatron_spava.batch.get_batch_on_this_cp_rank and run the forward inside "
            f"`with megatron_spava.context.cp_request(layout, positions=...)`")
    return request
