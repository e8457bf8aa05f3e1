"""Peak-memory estimates of the main job, checked before any rank starts.

  estimate_host_bytes(video_tokens, ranks, weight_bytes, tp, cuda_build)  -> bytes, all processes
  estimate_gpu_bytes(cfg, context_len, tp, cp, dtype_bytes, weight_bytes, shard) -> bytes per GPU
  check_memory(...)  ValueError with the estimate, what the machine has and the flag to change

Host: the needle video is rendered in the launching process (uint8 frames) and every rank
decodes it and turns it into the processor's float32 pixels, so host memory grows with the
video tokens times the ranks; each rank also holds its copy of the weights (1/TP of them).
The per-token and base terms were measured (2026-12-06, CPU, 2 gloo ranks, the shipped tiny
model, `--random-weights --compare none`, peak RSS of the whole process tree sampled every
0.1 s): 1.54 GiB at 1024 tokens, 2.01 GiB at 8192, 4.67 GiB at 32768, growing faster than
linearly (116 KB per token between the last two), with torch's CPU build; with its CUDA build
(Python 3.12, megatron-core 0.19.2) 2.56 GiB at 1024 tokens, the difference being the CUDA
libraries every process maps (HOST_CUDA_BUILD_PER_PROCESS). The estimate is rounded up from those; it is a guard against runs that cannot fit
(e.g. --needle-tokens 100000000 asks for terabytes), not an accounting.

GPU: the weights on each GPU (1/TP, and 1/CP with --shard-weights), the KV cache of this
rank's tokens for every layer, and the activations of one layer over them (hidden states,
the MLP's intermediate, the attention's output and the logits of the last rows).
"""

from __future__ import annotations

from typing import Optional

GIB = float(1 << 30)
#: Host bytes per video token and rank (the decoded frames, the processor's float32
#: pixels and their patches, the vision tower's activations), rounded up from the measurement.
HOST_BYTES_PER_TOKEN_PER_RANK = 55_000
#: Host bytes per video token in the launching process (the rendered uint8 frames: 8 tokens
#: per 112 x 112 frame) and its writer.
HOST_BYTES_PER_TOKEN_PARENT = 6_000
#: A rank's memory before any video (Python, torch, megatron-core, the tiny model).
HOST_BASE_PER_RANK = 600 << 20
HOST_BASE_PARENT = 500 << 20
#: What a CUDA build of torch adds to every process that imports it (its libraries, mapped
#: even on a machine without a GPU): measured 2026-12-06 with torch 2.13.0, 283 MiB after
#: `import torch` and 351 MiB after megatron-core and transformers too (CPU build: 219 / 371
#: MiB in all; CUDA build: 502 / 722 MiB). The main job runs 1 + ranks such processes.
HOST_CUDA_BUILD_PER_PROCESS = 400 << 20


def _cuda_build() -> bool:
    import torch
    return torch.version.cuda is not None


def estimate_host_bytes(video_tokens: int, ranks: int, weight_bytes: int = 0, tp: int = 1,
                        cuda_build: Optional[bool] = None) -> int:
    """Peak host memory of the main job, all processes together. Pure given `cuda_build`
    (whether torch is a CUDA build; None: this installation's)."""
    if cuda_build is None:
        cuda_build = _cuda_build()
    extra = HOST_CUDA_BUILD_PER_PROCESS if cuda_build else 0
    per_rank = (HOST_BASE_PER_RANK + extra + HOST_BYTES_PER_TOKEN_PER_RANK * video_tokens
                + weight_bytes // max(tp, 1))
    return HOST_BASE_PARENT + extra + HOST_BYTES_PER_TOKEN_PARENT * video_tokens + ranks * per_rank


def estimate_gpu_bytes(cfg, context_len: int, tp: int, cp: int, dtype_bytes: int, weight_bytes: int,
                       shard: bool = False) -> int:
    """Peak memory of one GPU for a prefill of `context_len` tokens at TP x CP. Pure.
    cfg: a family config (num_layers, hidden_size, intermediate_size, num_heads,
    num_kv_heads, head_dim, vocab_size; a missing one counts as 0)."""
    get = lambda name: int(getattr(cfg, name, 0) or 0)  # noqa: E731
    layers, hidden, ffn, vocab = get("num_layers"), get("hidden_size"), get("intermediate_size"), get("vocab_size")
    kv_heads = max(1, get("num_kv_heads") // max(tp, 1))
    head_dim = get("head_dim") or (hidden // max(get("num_heads"), 1))
    tokens = -(-context_len // max(cp, 1))  # this rank's share
    weights = weight_bytes // max(tp, 1) // (max(cp, 1) if shard else 1)
    kv = 2 * layers * tokens * kv_heads * head_dim * dtype_bytes
    activations = tokens * (4 * hidden + 2 * ffn // max(tp, 1)) * max(dtype_bytes, 4)
    return weights + kv + activations + 2 * 1024 * vocab * 4


def host_memory_bytes() -> Optional[int]:
    """Memory this machine has for the job: what is available now (psutil), else None."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def check_host_memory(video_tokens: int, ranks: int, weight_bytes: int = 0, tp: int = 1,
                      available: Optional[int] = None, flag: str = "--needle-tokens") -> None:
    """ValueError, before any rank starts, when the estimate exceeds the memory available."""
    available = host_memory_bytes() if available is None else available
    if available is None:
        return
    need = estimate_host_bytes(video_tokens, ranks, weight_bytes, tp)
    if need > available:
        raise ValueError(f"this run needs about {need / GIB:.1f} GiB of host memory ({video_tokens} video "
                         f"tokens on {ranks} ranks) but {available / GIB:.1f} GiB is available: lower "
                         f"{flag} (or run on fewer ranks per machine)")


def check_gpu_memory(cfg, context_len: int, tp: int, cp: int, dtype_bytes: int, weight_bytes: int,
                     shard: bool, total: int, flag: str = "--needle-tokens") -> None:
    """ValueError when one GPU's estimate exceeds `total` bytes (the GPU's memory)."""
    need = estimate_gpu_bytes(cfg, context_len, tp, cp, dtype_bytes, weight_bytes, shard)
    if need > total:
        raise ValueError(f"this run needs about {need / GIB:.1f} GiB per GPU at TP {tp} x CP {cp} but a GPU "
                         f"has {total / GIB:.1f} GiB: lower {flag}, raise --context-parallel-size, or "
                         f"pass --shard-weights")
