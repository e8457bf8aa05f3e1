"""The log-sum-exp selection score of a block's keys (SPAVA.md section 2 step 1, `lse`), in one
pass over the keys, and the row-normalised score `rownorm` in two.

    lse:     s[t, h] = logsumexp over (j, g) of scale * q[j, g] . k[t, h]
    rownorm: s[t, h] = logsumexp over (j, g) of (scale * q[j, g] . k[t, h] - row_lse[j, g, h]),
             row_lse[j, g, h] = logsumexp over the block's keys t' of scale * q[j, g] . k[t', h]

over the l_q query tokens j and the heads g of KV head h's GQA group (query heads
h * G ... h * G + G - 1, G = Hq // Hk, as in `algos.spava.selection`).

On a CUDA device with triton installed `lse` is one Triton kernel: each program holds a tile of
keys of one KV head and walks the l_q * G probe rows in tiles, with an online max / sum in
fp32 and the dot products on the tensor cores; the l_b x l_q x G logits are never written to
memory. `rownorm` is two calls of the same kernel: row_lse with the roles swapped (the probe
rows are the "keys" of their KV head, the block's keys the "probes", G = 1), then the per-key
score with row_lse as a per-row offset subtracted inside the kernel (`row_offset`). Elsewhere
(CPU, no triton) both are torch over key chunks of bounded size. All compute in fp32 from q's
and k's dtype (bf16, fp16 or fp32 operands; fp32 operands use tf32x3 on the GPU).
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


def lse_scores(q: torch.Tensor, k: torch.Tensor, scale: float, *, row_offset: Optional[torch.Tensor] = None,
               impl: str = "auto", config: Optional[tuple] = None) -> torch.Tensor:
    """Log-sum-exp scores of the keys `k` against the probe queries `q`, in float32.

    q: [l_q, Hq, d] or [l_q, b, Hq, d]; k: [l_b, Hk, d] or [l_b, b, Hk, d] (the attention's
    [s, b, h, d] layout), same dtype and device, Hq % Hk == 0, any strides (slices and
    views of a fused QKV tensor are read in place). scale > 0: the attention's softmax scale.

    Returns s: [l_b, Hk] (3-D inputs) or [l_b, b, Hk] (4-D inputs), float32, with
    s[t, (b,) h] = logsumexp_{j, g} scale * q[j, (b,) h * G + g] . k[t, (b,) h]; -inf where
    l_q == 0. The result is a view of a contiguous [b, Hk, l_b] buffer:
    `s.permute(1, 2, 0)` (4-D) or `s.t()` (3-D) gives that buffer back without a copy.

    row_offset: None (the plain score), or float32 [Hk, R] (3-D inputs) / [b, Hk, R] (4-D),
    R = l_q * G, row r = j * G + g, on k's device, any strides: o[(b,) h, r] is subtracted
    from row r's scaled logits, s[t, (b,) h] = logsumexp_{j, g} (scale * q[j, (b,) h * G + g]
    . k[t, (b,) h] - o[(b,) h, j * G + g]) (the second pass of `rownorm_scores`).

    impl: "auto" (the Triton kernel for CUDA tensors where triton imports, else torch),
    "triton" (on CPU tensors it runs in triton's interpreter: slow, for tests) or "torch".
    config: (BLOCK_N, BLOCK_M, num_warps, num_stages) for the compiled kernel instead of the
    autotuner's choice (benchmarks).
    """
    q4, k4 = _check(q, k, scale, impl)
    l_q, b, hq, d = q4.shape
    l_b, _, hk, _ = k4.shape
    offset = None
    if row_offset is not None:
        want = (b, hk, l_q * (hq // hk))
        offset = row_offset.unsqueeze(0) if q.dim() == 3 else row_offset
        if tuple(offset.shape) != want or offset.dtype != torch.float32 or offset.device != k.device:
            raise ValueError(f"lse_scores: row_offset must be float32 {want[1:] if q.dim() == 3 else want} on "
                             f"{k.device}, got {row_offset.dtype} {tuple(row_offset.shape)} on {row_offset.device}")
    out = torch.empty(b, hk, l_b, dtype=torch.float32, device=k.device)
    _scores_into(q4, k4, float(scale), out, _resolve(impl, k), config, offset)
    return out.permute(2, 0, 1) if k.dim() == 4 else out[0].t()


def rownorm_scores(q: torch.Tensor, k: torch.Tensor, scale: float, *, impl: str = "auto",
                   config: Optional[tuple] = None) -> torch.Tensor:
    """Row-normalised scores of the keys `k` (one whole block) against the probe queries `q`,
    in float32: each probe row's softmax over the block's keys, summed over the rows, in log:

        s[t, h] = logsumexp_{j, g} (scale * q[j, h * G + g] . k[t, h] - row_lse[h, j * G + g]),
        row_lse[h, j * G + g] = logsumexp_{t'} scale * q[j, h * G + g] . k[t', h]

    so sum_t exp(s[t, h]) = l_q * G per KV head (`algos.spava.selection`'s "rownorm").
    Shapes, layout of the result (a view of a contiguous [b, Hk, l_b] buffer), impl and config
    as `lse_scores`; -inf where l_q == 0.

    Two passes of `lse_scores`'s dispatch (Triton: two kernel calls, no logits in memory;
    torch: key chunks of float32 logits, at most _LOGITS_PER_CHUNK). First row_lse [b, Hk, R]
    (R = l_q * G) with the roles swapped: the probe rows, regrouped into a [R, b, Hk, d] copy
    (the only copy: l_q * Hq * d elements), are the "keys" and the block's keys, read in
    place, the "probes" (G = 1). Then the per-key score with row_lse as `row_offset`.
    """
    q4, k4 = _check(q, k, scale, impl, "rownorm_scores")
    l_q, b, hq, d = q4.shape
    l_b, _, hk, _ = k4.shape
    impl, scale = _resolve(impl, k), float(scale)
    out = torch.empty(b, hk, l_b, dtype=torch.float32, device=k.device)
    if l_b:
        # probe rows as keys: [l_q, b, Hk, G, d] -> [l_q, G, b, Hk, d] -> [R, b, Hk, d], r = j * G + g
        rows = q4.unflatten(2, (hk, hq // hk)).permute(0, 3, 1, 2, 4).reshape(l_q * (hq // hk), b, hk, d)
        row_lse = torch.empty(b, hk, rows.shape[0], dtype=torch.float32, device=k.device)
        _scores_into(k4, rows, scale, row_lse, impl, config, None)
        _scores_into(q4, k4, scale, out, impl, config, row_lse)
    return out.permute(2, 0, 1) if k.dim() == 4 else out[0].t()


def _resolve(impl: str, k: torch.Tensor) -> str:
    """"auto" -> "triton" for CUDA tensors where triton imports, else "torch"."""
    if impl == "auto":
        return "triton" if k.is_cuda and triton_available() else "torch"
    return impl


def _scores_into(q4: torch.Tensor, k4: torch.Tensor, scale: float, out: torch.Tensor, impl: str,
                 config: Optional[tuple], offset: Optional[torch.Tensor]) -> None:
    """The one dispatch: q4 [l_q, b, hq, d], k4 [l_b, b, hk, d], out [b, hk, l_b] float32,
    offset None or float32 [b, hk, l_q * G]; impl "triton" or "torch"."""
    if not k4.shape[0]:
        return
    if impl == "triton":
        from . import _lse_score_triton
        if q4.stride(-1) != 1:
            q4 = q4.contiguous()
        if k4.stride(-1) != 1:
            k4 = k4.contiguous()
        # Triton launches on the current device: make it k's (a rank may hold another)
        with torch.cuda.device(k4.device) if k4.is_cuda else contextlib.nullcontext():
            _lse_score_triton.launch(q4, k4, out, scale, interpret=not k4.is_cuda, config=config,
                                     row_offset=offset)
    else:
        _lse_torch(q4, k4, scale, out, offset)


def _check(q: torch.Tensor, k: torch.Tensor, scale: float, impl: str, who: str = "lse_scores"):
    """Validate; return 4-D views [l, b, h, d] of q and k. Raises ValueError in one line,
    naming `who`."""
    if impl not in _IMPLS:
        raise ValueError(f"{who}: impl must be one of {_IMPLS}, got {impl!r}")
    if q.dim() != k.dim() or q.dim() not in (3, 4):
        raise ValueError(f"{who}: q and k must both be [l, h, d] or [l, b, h, d], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    q4, k4 = (q.unsqueeze(1), k.unsqueeze(1)) if q.dim() == 3 else (q, k)
    if q4.shape[1] != k4.shape[1] or q4.shape[3] != k4.shape[3]:
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if k4.shape[2] == 0 or q4.shape[2] % k4.shape[2]:
        raise ValueError(f"{who}: {q4.shape[2]} query heads are not a multiple of {k4.shape[2]} KV heads")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{who}: q and k must share a dtype in float32/bfloat16/float16, got "
                         f"{q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"{who}: q on {q.device} and k on {k.device}")
    if not scale > 0:
        raise ValueError(f"{who}: scale must be > 0, got {scale}")
    if impl == "triton" and not triton_available():
        raise ValueError(f"{who}: impl='triton' needs the triton package (pip install triton)")
    return q4, k4


def _probe_matrix(q4: torch.Tensor, hk: int, scale: float) -> torch.Tensor:
    """q4 [l_q, b, hq, d] -> float32 [b, hk, d, R], R = l_q * G: column r = j * G + g is
    scale * q[j, b, h * G + g] (row (j, g) with g fastest), pre-scaled."""
    l_q, b, hq, d = q4.shape
    return (q4.float().reshape(l_q, b, hk, hq // hk, d).permute(1, 2, 4, 0, 3)
            .reshape(b, hk, d, l_q * (hq // hk)) * scale)


def _key_chunks(k4: torch.Tensor, rows: int):
    """k4 [l_b, b, hk, d] -> (t, float32 keys [b, hk, c, d]) over chunks of c keys whose
    logits against `rows` probe rows per KV head stay under _LOGITS_PER_CHUNK."""
    l_b, b, hk, _ = k4.shape
    step = max(1, _LOGITS_PER_CHUNK // max(1, b * hk * rows))
    for t in range(0, l_b, step):
        yield t, k4[t:t + step].permute(1, 2, 0, 3).float()


def _lse_torch(q4: torch.Tensor, k4: torch.Tensor, scale: float, out: torch.Tensor,
               offset: Optional[torch.Tensor] = None) -> None:
    """The torch path: fp32 logits over key chunks of at most _LOGITS_PER_CHUNK, into out
    [b, hk, l_b]; offset None or float32 [b, hk, R] subtracted from row r's logits."""
    hk = k4.shape[2]
    probes = _probe_matrix(q4, hk, scale)  # [b, hk, d, R]
    for t, keys in _key_chunks(k4, probes.shape[-1]):
        logits = torch.matmul(keys, probes)  # [b, hk, chunk, R]
        if offset is not None:
            logits = logits - offset.unsqueeze(2)
        out[..., t:t + keys.shape[2]] = torch.logsumexp(logits, dim=-1)
