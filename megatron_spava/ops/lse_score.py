"""The log-sum-exp selection score of a block's keys (SPAVA.md section 2 step 1, `lse`), in one
pass over the keys.

    s[t, h] = logsumexp over (j, g) of scale * q[j, g] . k[t, h]

over the l_q query tokens j and the heads g of KV head h's GQA group (query heads
h * G ... h * G + G - 1, G = Hq // Hk, as in `algos.spava.selection`).

On a CUDA device with triton installed this is one Triton kernel: each program holds a tile of
keys of one KV head and walks the l_q * G probe rows in tiles, with an online max / sum in
fp32 and the dot products on the tensor cores; the l_b x l_q x G logits are never written to
memory. Elsewhere (CPU, no triton) it is torch over key chunks of bounded size. Both compute
in fp32 from q's and k's dtype (bf16, fp16 or fp32 operands; fp32 operands use tf32x3 on the
GPU).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

#: the torch path computes at most this many logits at a time
_LOGITS_PER_CHUNK = 1 << 24

_IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether `import triton` works here (the kernel's only dependency beyond torch)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def lse_scores(q: torch.Tensor, k: torch.Tensor, scale: float, *, impl: str = "auto",
               config: Optional[tuple] = None) -> torch.Tensor:
    """Log-sum-exp scores of the keys `k` against the probe queries `q`, in float32.

    q: [l_q, Hq, d] or [l_q, b, Hq, d]; k: [l_b, Hk, d] or [l_b, b, Hk, d] (the attention's
    [s, b, h, d] layout), same dtype and device, Hq % Hk == 0, any strides (slices and
    views of a fused QKV tensor are read in place). scale > 0: the attention's softmax scale.

    Returns s: [l_b, Hk] (3-D inputs) or [l_b, b, Hk] (4-D inputs), float32, with
    s[t, (b,) h] = logsumexp_{j, g} scale * q[j, (b,) h * G + g] . k[t, (b,) h]; -inf where
    l_q == 0. The result is a view of a contiguous [b, Hk, l_b] buffer:
    `s.permute(1, 2, 0)` (4-D) or `s.t()` (3-D) gives that buffer back without a copy.

    impl: "auto" (the Triton kernel for CUDA tensors where triton imports, else torch),
    "triton" (on CPU tensors it runs in triton's interpreter: slow, for tests) or "torch".
    config: (BLOCK_N, BLOCK_M, num_warps, num_stages) for the compiled kernel instead of the
    autotuner's choice (benchmarks).
    """
    q4, k4 = _check(q, k, scale, impl)
    l_q, b, hq, d = q4.shape
    l_b, _, hk, _ = k4.shape
    out = torch.empty(b, hk, l_b, dtype=torch.float32, device=k.device)
    if impl == "auto":
        impl = "triton" if k.is_cuda and triton_available() else "torch"
    if l_b:
        if impl == "triton":
            from . import _lse_score_triton
            if q4.stride(-1) != 1:
                q4 = q4.contiguous()
            if k4.stride(-1) != 1:
                k4 = k4.contiguous()
            # Triton launches on the current device: make it k's (a rank may hold another)
            with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
                _lse_score_triton.launch(q4, k4, out, float(scale), interpret=not k.is_cuda, config=config)
        else:
            _lse_torch(q4, k4, float(scale), out)
    return out.permute(2, 0, 1) if k.dim() == 4 else out[0].t()


def _check(q: torch.Tensor, k: torch.Tensor, scale: float, impl: str):
    """Validate; return 4-D views [l, b, h, d] of q and k. Raises ValueError in one line."""
    if impl not in _IMPLS:
        raise ValueError(f"lse_scores: impl must be one of {_IMPLS}, got {impl!r}")
    if q.dim() != k.dim() or q.dim() not in (3, 4):
        raise ValueError(f"lse_scores: q and k must both be [l, h, d] or [l, b, h, d], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    q4, k4 = (q.unsqueeze(1), k.unsqueeze(1)) if q.dim() == 3 else (q, k)
    if q4.shape[1] != k4.shape[1] or q4.shape[3] != k4.shape[3]:
        raise ValueError(f"lse_scores: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if k4.shape[2] == 0 or q4.shape[2] % k4.shape[2]:
        raise ValueError(f"lse_scores: {q4.shape[2]} query heads are not a multiple of {k4.shape[2]} KV heads")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"lse_scores: q and k must share a dtype in float32/bfloat16/float16, got "
                         f"{q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"lse_scores: q on {q.device} and k on {k.device}")
    if not scale > 0:
        raise ValueError(f"lse_scores: scale must be > 0, got {scale}")
    if impl == "triton" and not triton_available():
        raise ValueError("lse_scores: impl='triton' needs the triton package (pip install triton)")
    return q4, k4


def _lse_torch(q4: torch.Tensor, k4: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """The torch path: fp32 logits over key chunks of at most _LOGITS_PER_CHUNK, into out
    [b, hk, l_b]."""
    l_q, b, hq, d = q4.shape
    l_b, _, hk, _ = k4.shape
    rows = l_q * (hq // hk)
    # [b, hk, d, rows]: row (j, g) with g fastest, pre-scaled
    probes = (q4.float().reshape(l_q, b, hk, hq // hk, d).permute(1, 2, 4, 0, 3)
              .reshape(b, hk, d, rows) * scale)
    step = max(1, _LOGITS_PER_CHUNK // max(1, b * hk * rows))
    for t in range(0, l_b, step):
        keys = k4[t:t + step].permute(1, 2, 0, 3).float()  # [b, hk, chunk, d]
        out[..., t:t + step] = torch.logsumexp(torch.matmul(keys, probes), dim=-1)
