"""Run megatron-core's local (non-TE) layers and dist checkpointing without CUDA.

megatron-core 0.16.1 hard-codes CUDA in a few places reached even with
`use_cpu_initialization=True`: `torch.cuda.current_device()` (rotary `inv_freq`, some
buffers), the default causal mask built on "cuda", and `torch.cuda.synchronize()` in the
dist-checkpoint writer. `apply()` redirects those to the CPU, and only when CUDA is
absent; on a GPU machine it does nothing. Call it before building models in a process
that runs on CPU (tests, the CPU demo, the conversion tools).
"""

from __future__ import annotations

import functools

import torch

_APPLIED = False


def apply() -> bool:
    """Patch megatron-core for CPU if CUDA is unavailable. Returns whether it patched."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask
    _APPLIED = True
    return True
