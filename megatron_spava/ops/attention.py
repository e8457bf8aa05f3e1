"""The one attention primitive Spava is built from, and the LSE merge.

`attend(q, k, v, causal=...)` returns the attention output together with its
log-sum-exp, on whichever kernel suits the device. Every Spava row is computed as one
or more such partials merged by `merge_partials`, so only two masks are ever asked of
a kernel: none, and square (top-left) causal. Every backend supports both.

Shapes follow Megatron's order. q: [sq, b, hq, d]; k, v: [sk, b, hk, d] with
hq % hk == 0 (query head h reads KV head h // (hq // hk), Megatron's and HF's GQA
grouping). Returns out [sq, b, hq, d] in q's dtype and lse [sq, b, hq] in float32,
natural log. Inputs may be strided views (last dim contiguous).

Kernels (SpavaConfig.kernel):
  cpu_flash  PyTorch's CPU flash kernel (aten._scaled_dot_product_flash_attention_for_cpu):
             native GQA, returns the LSE. The CPU default.
  flash      SDPA's FlashAttention-2 kernel (aten._scaled_dot_product_flash_attention).
  cudnn      SDPA's cuDNN kernel (aten._scaled_dot_product_cudnn_attention).
  efficient  SDPA's memory-efficient kernel; also runs float32 on CUDA.
  flex       torch.compile'd FlexAttention.
  math       float32 matmul + softmax; any device, for checks (materialises scores).
Kernels without native GQA get K/V repeated per query head; `GQA_NATIVE` lists which
do not need it. "auto" picks `AUTO_CUDA[dtype]` on CUDA (chosen by
tools/bench_attention.py; see BENCHMARKS.md) and cpu_flash on CPU.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Partial = Tuple[torch.Tensor, torch.Tensor]  # (out [s, b, h, d], lse [s, b, h])

#: Kernel picked by "auto" on CUDA, per dtype. Measured by tools/bench_attention.py.
AUTO_CUDA: Dict[torch.dtype, str] = {
    torch.bfloat16: "cudnn",
    torch.float16: "cudnn",
    torch.float32: "efficient",
}


def _cpu_flash(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _flash(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _cudnn(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _efficient(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    return res[0], res[1]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)  # recompiles once as dynamic when shapes change


@functools.lru_cache(maxsize=64)
def _causal_block_mask(sq: int, sk: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, None, None, sq, sk, device=device)


def _flex(q, k, v, causal, scale):
    mask = _causal_block_mask(q.shape[2], k.shape[2], str(q.device)) if causal else None
    gqa = q.shape[1] != k.shape[1]
    try:  # torch >= 2.9 spells the LSE request as an AuxRequest
        from torch.nn.attention.flex_attention import AuxRequest
        out, aux = _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa,
                                    return_aux=AuxRequest(lse=True))
        return out, aux.lse
    except ImportError:
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa,
                                return_lse=True)


def _math(q, k, v, causal, scale):
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = hq // hk
    qf = q.float().reshape(b, hk, group * sq, d)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [b, hk, g*sq, sk]
    if causal:
        rows = torch.arange(group * sq, device=q.device) % sq
        cols = torch.arange(sk, device=q.device)
        scores = scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.reshape(b, hq, sq, d).to(q.dtype), lse.reshape(b, hq, sq)


_KERNELS: Dict[str, Callable] = {
    "cpu_flash": _cpu_flash,
    "flash": _flash,
    "cudnn": _cudnn,
    "efficient": _efficient,
    "flex": _flex,
    "math": _math,
}

#: Kernels that read grouped K/V directly, without repeating it per query head.
GQA_NATIVE = {"cpu_flash", "cudnn", "flash", "flex", "math"}


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete kernel name "auto" stands for on this device and dtype."""
    if kernel != "auto":
        if kernel not in _KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose from {sorted(_KERNELS)}")
        return kernel
    if device.type == "cuda":
        return AUTO_CUDA.get(dtype, "math")
    return "cpu_flash" if device.type == "cpu" else "math"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
           scale: float | None = None, kernel: str = "auto") -> Partial:
    """Attention of q over k/v, with its log-sum-exp.

    q: [sq, b, hq, d]; k, v: [sk, b, hk, d]. causal: top-left causal mask, needs sq == sk.
    Returns (out [sq, b, hq, d] in q.dtype, lse [sq, b, hq] float32). An empty key set
    gives out = 0 and lse = -inf, so it merges as "no contribution".
    """
    sq, b, hq, d = q.shape
    sk, hk = k.shape[0], k.shape[2]
    if causal and sq != sk:
        raise ValueError(f"attend: causal needs as many keys as queries, got {sq} and {sk}")
    scale = d ** -0.5 if scale is None else scale
    if sk == 0 or sq == 0:
        return (q.new_zeros(sq, b, hq, d),
                torch.full((sq, b, hq), float("-inf"), device=q.device, dtype=torch.float32))
    name = resolve_kernel(kernel, q.device, q.dtype)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d] views
    if hq != hk and name not in GQA_NATIVE:
        kb, vb = (t.repeat_interleave(hq // hk, dim=1) for t in (kb, vb))
    out, lse = _KERNELS[name](qb, kb, vb, causal, scale)
    lse = lse.reshape(b, hq, -1)[..., :sq]  # some kernels pad or add a trailing 1
    return out.permute(2, 0, 1, 3), lse.permute(2, 0, 1).float()


def merge_partials(parts: Sequence[Partial]) -> Partial:
    """Merge attention partials over disjoint key sets into attention over their union.

    parts: (out [s, b, h, d], lse [s, b, h]) each. Returns (out float32, lse float32):
    lse = logsumexp_i(lse_i), out = sum_i out_i * exp(lse_i - lse). Rows whose every
    partial is empty (lse = -inf) come out as 0 with lse = -inf.
    """
    if len(parts) == 1:
        return parts[0][0].float(), parts[0][1].float()
    lses = torch.stack([lse.float() for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    out = None
    for (o, _), lse_i in zip(parts, lses):
        term = o.float() * torch.exp(lse_i - safe).unsqueeze(-1)
        out = term if out is None else out.add_(term)
    return out, lse


def attend_many(q: torch.Tensor, keys: List[Tuple[torch.Tensor, torch.Tensor, bool]], *,
                scale: float | None, kernel: str) -> Partial:
    """Attention of q over several key sets at once: attend to each (k, v, causal) and
    merge. Shapes as `attend`; returns float32 (out, lse)."""
    parts = [attend(q, k, v, causal=causal, scale=scale, kernel=kernel)
             for k, v, causal in keys if k.shape[0] > 0]
    if not parts:  # no keys at all: out 0, lse -inf
        parts = [attend(q, keys[0][0], keys[0][1], scale=scale, kernel=kernel)]
    return merge_partials(parts)
