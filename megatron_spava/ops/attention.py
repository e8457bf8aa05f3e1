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

import contextlib
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


#: Implementations of `merge_partials` (SpavaConfig.merge_kernel): "torch" (elementwise torch
#: ops, any device), "triton" (one fused Triton kernel, `_merge_triton`; on CPU tensors it runs
#: in triton's interpreter: slow, for tests), "auto" (triton for CUDA tensors where triton
#: imports, else torch).
MERGE_IMPLS = ("torch", "triton", "auto")


def resolve_merge(impl: str, device: torch.device) -> str:
    """The implementation ("torch" or "triton") `impl` stands for on `device`. ValueError, in one
    line, where it cannot run: an unknown name, "triton" without the triton package, or
    "triton" on CPU tensors outside triton's interpreter (TRITON_INTERPRET=1)."""
    from .lse_score import triton_available
    if impl not in MERGE_IMPLS:
        raise ValueError(f"merge_partials: impl must be one of {MERGE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("merge_partials: impl='triton' needs the triton package (pip install triton)")
        if device.type != "cuda":
            from . import _merge_triton
            if not _merge_triton.interpreter_ready():
                raise ValueError(f"merge_partials: impl='triton' on {device.type} tensors runs in triton's "
                                 "interpreter, which needs TRITON_INTERPRET=1 set before triton is first "
                                 "imported; use 'torch' or 'auto' there")
    return impl


def merge_partials(parts: Sequence[Partial], *, out: Optional[torch.Tensor] = None,
                   impl: str = "torch", config: Optional[tuple] = None) -> Partial:
    """Merge attention partials over disjoint key sets into attention over their union.

    parts: (out [s, b, h, d] in bf16 / fp16 / fp32, lse [s, b, h] float32) each, any strides.
    Returns (out, lse float32): lse = logsumexp_i(lse_i), out = sum_i out_i * exp(lse_i - lse),
    computed in float32. Rows whose every partial is empty (lse = -inf) come out as 0 with
    lse = -inf (with one partial, the torch path returns it as it is: `attend`'s empty
    partials are 0 already).

    out: where to write the merged output ([s, b, h, d], any float dtype, any strides, e.g. a
    slice of the layer's output): the float32 result is cast on the store, and `out` is
    returned. None: a new float32 tensor.
    impl: one of MERGE_IMPLS ("torch", the default, or the fused "triton" kernel, which reads
    each partial once and writes `out` once; `resolve_merge`). config: the Triton kernel's
    (BLOCK_R, num_warps) (benchmarks).
    """
    impl = resolve_merge(impl, parts[0][0].device)
    if impl == "triton":
        from . import _merge_triton
        o0, l0 = parts[0]
        dest = out if out is not None else torch.empty(o0.shape, dtype=torch.float32, device=o0.device)
        lse = torch.empty(l0.shape, dtype=torch.float32, device=l0.device)
        with torch.cuda.device(o0.device) if o0.is_cuda else contextlib.nullcontext():
            _merge_triton.launch([(o, l.float()) for o, l in parts], dest, lse,
                                 interpret=not o0.is_cuda, config=config)
        return dest, lse
    if len(parts) == 1:
        o, l = parts[0]
        return (o.float() if out is None else out.copy_(o)), l.float()
    # The float32 products come from type promotion (bf16 * fp32 -> fp32: no .float() copies),
    # one exp over all partials, and the last add casts on its store into `out`: the same
    # float32 operations, in the same order, as the float copies, muls, adds and cast before.
    lses = torch.stack([lse for _, lse in parts]).float()
    lse = torch.logsumexp(lses, dim=0)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    weights = torch.exp(lses - safe).unsqueeze(-1)  # [k, s, b, h, 1]
    acc = parts[0][0] * weights[0]
    for (o, _), w in zip(parts[1:-1], weights[1:-1]):
        acc.add_(o * w)
    last = parts[-1][0] * weights[-1]
    if out is None:
        return acc.add_(last), lse
    return torch.add(acc, last, out=out), lse


def attend_many(q: torch.Tensor, keys: List[Tuple[torch.Tensor, torch.Tensor, bool]], *,
                scale: float | None, kernel: str, merge: str = "torch") -> Partial:
    """Attention of q over several key sets at once: attend to each (k, v, causal) and
    merge (`merge_partials` with impl=merge). Shapes as `attend`; returns float32 (out, lse)."""
    parts = [attend(q, k, v, causal=causal, scale=scale, kernel=kernel)
             for k, v, causal in keys if k.shape[0] > 0]
    if not parts:  # no keys at all: out 0, lse -inf
        parts = [attend(q, keys[0][0], keys[0][1], scale=scale, kernel=kernel)]
    return merge_partials(parts, impl=merge)
