"""Opt-in GPU timing of named regions with CUDA events (no host synchronisation).

    from megatron_spava import profiling
    profiling.start()                 # begin collecting
    ... run ...
    totals = profiling.stop()         # {"attention": seconds, "selection": seconds, ...}

`with profiling.region("name", tensor):` records a pair of events on the current CUDA
stream when collection is on and `tensor` is on a GPU, the host clock around the block when
it is on the CPU; when collection is off it does nothing.
tools/bench_prefill.py uses it to report attention's and selection's share of the LLM.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Tuple

import torch

_EVENTS: Optional[Dict[str, List[Tuple[torch.cuda.Event, torch.cuda.Event]]]] = None


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op off CUDA), before reading a host clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def start() -> None:
    global _EVENTS
    _EVENTS = {}


def stop() -> Dict[str, float]:
    """Synchronise once and return the total seconds per region name; stops collecting."""
    global _EVENTS
    events, _EVENTS = _EVENTS or {}, None
    if any(isinstance(a, torch.cuda.Event) for pairs in events.values() for a, _ in pairs):
        torch.cuda.synchronize()
    return {name: sum(a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a for a, b in pairs)
            for name, pairs in events.items()}


@contextlib.contextmanager
def region(name: str, like: torch.Tensor):
    """Time the block under `name` while collection is on: CUDA events on `like`'s GPU
    stream, the host clock (perf_counter) when `like` is on the CPU."""
    if _EVENTS is None:
        yield
        return
    if not like.is_cuda:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _EVENTS.setdefault(name, []).append((t0, time.perf_counter()))
        return
    pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    _EVENTS.setdefault(name, []).append(pair)
    pair[0].record()
    try:
        yield
    finally:
        pair[1].record()
