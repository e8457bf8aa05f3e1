"""The Triton kernel behind `ops.attention.merge_partials(..., impl="triton")` (imported lazily:
triton is optional).

One pass over K <= MAX_PARTS attention partials: each program takes BLOCK_R rows (a row is one
(s, b, h) of the [s, b, h, d] layout), reads the K log-sum-exps of each row, then each
partial's output row once (bf16, fp16 or fp32, any strides), and writes the merged row once,
cast to the destination's dtype on the store, and the merged lse in float32:

    lse = m + log(sum_i exp(lse_i - m)),  m = max_i lse_i
    out = sum_i out_i * exp(lse_i - lse)

all in float32 (the torch path's formula). Rows whose every lse_i is -inf come out as 0 with
lse -inf. More than MAX_PARTS partials are merged by the caller in groups (`launch`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

#: partials one launch merges; more are merged in groups of this many, the running result
#: (float32) being the first partial of the next group
MAX_PARTS = 4


@triton.jit
def _lse(L, sl_s, sl_b, sl_h, s, b, h, rmask):
    return tl.load(L + s * sl_s + b * sl_b + h * sl_h, mask=rmask, other=float("-inf")).to(tl.float32)


@triton.jit
def _term(acc, O, so_s, so_b, so_h, so_d, s, b, h, offs_d, mask, w):
    ptrs = O + (s * so_s + b * so_b + h * so_h)[:, None] + offs_d[None, :] * so_d
    o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return acc + o * w[:, None]


def _merge_kernel(Out, Lse, R, B, H,
                  st_s, st_b, st_h, st_d,
                  O0, L0, a0_s, a0_b, a0_h, a0_d, l0_s, l0_b, l0_h,
                  O1, L1, a1_s, a1_b, a1_h, a1_d, l1_s, l1_b, l1_h,
                  O2, L2, a2_s, a2_b, a2_h, a2_d, l2_s, l2_b, l2_h,
                  O3, L3, a3_s, a3_b, a3_h, a3_d, l3_s, l3_b, l3_h,
                  K: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    h = r % H
    sb = r // H
    b = sb % B
    s = sb // B
    # the K lse's of each row, their max and log-sum-exp (float32)
    x0 = _lse(L0, l0_s, l0_b, l0_h, s, b, h, rmask)
    m = x0
    if K > 1:
        x1 = _lse(L1, l1_s, l1_b, l1_h, s, b, h, rmask)
        m = tl.maximum(m, x1)
    if K > 2:
        x2 = _lse(L2, l2_s, l2_b, l2_h, s, b, h, rmask)
        m = tl.maximum(m, x2)
    if K > 3:
        x3 = _lse(L3, l3_s, l3_b, l3_h, s, b, h, rmask)
        m = tl.maximum(m, x3)
    m = tl.where(m == float("-inf"), 0.0, m)  # all -inf: every exp below is 0
    total = tl.exp(x0 - m)
    if K > 1:
        total += tl.exp(x1 - m)
    if K > 2:
        total += tl.exp(x2 - m)
    if K > 3:
        total += tl.exp(x3 - m)
    lse = m + tl.log(total)  # log(0) = -inf for the rows with no keys
    safe = tl.where(lse == float("-inf"), 0.0, lse)
    offs_d = tl.arange(0, BLOCK_D)
    if D == BLOCK_D:  # masks constant along d keep the loads wide
        mask = rmask[:, None] & (offs_d[None, :] >= 0)
    else:
        mask = rmask[:, None] & (offs_d[None, :] < D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc = _term(acc, O0, a0_s, a0_b, a0_h, a0_d, s, b, h, offs_d, mask, tl.exp(x0 - safe))
    if K > 1:
        acc = _term(acc, O1, a1_s, a1_b, a1_h, a1_d, s, b, h, offs_d, mask, tl.exp(x1 - safe))
    if K > 2:
        acc = _term(acc, O2, a2_s, a2_b, a2_h, a2_d, s, b, h, offs_d, mask, tl.exp(x2 - safe))
    if K > 3:
        acc = _term(acc, O3, a3_s, a3_b, a3_h, a3_d, s, b, h, offs_d, mask, tl.exp(x3 - safe))
    out_ptrs = Out + (s * st_s + b * st_b + h * st_h)[:, None] + offs_d[None, :] * st_d
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + r, lse, mask=rmask)


#: (BLOCK_R, num_warps) the benchmark tries (tools/bench_attention.py --merge); DEFAULT_CONFIG
#: is used otherwise, until a device run picks one
CONFIGS = ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8), (128, 8))
DEFAULT_CONFIG = (32, 4)
#: the one config the interpreter runs (small tiles, so tests exercise several programs)
INTERPRET_CONFIG = (8, 1)


@functools.lru_cache(maxsize=None)
def kernel(interpret: bool):
    """The launchable kernel: compiled, or interpreted on the CPU."""
    if interpret:
        if not triton.knobs.runtime.interpret:
            raise ValueError("merge_partials: the Triton kernel on CPU tensors runs in triton's interpreter, "
                             "which needs TRITON_INTERPRET=1 set before triton is first imported")
        return triton.jit(_merge_kernel)
    # the row count varies per call: compile once for all of them
    return triton.jit(_merge_kernel, do_not_specialize=("R",))


def interpreter_ready() -> bool:
    """Whether triton runs in its interpreter here (TRITON_INTERPRET=1 before its first import)."""
    return bool(triton.knobs.runtime.interpret)


def _launch_group(parts, out, lse, interpret: bool, config):
    """One launch: parts (<= MAX_PARTS) of (o [s, b, h, d], l [s, b, h]) into out [s, b, h, d]
    and lse [s, b, h] (contiguous float32)."""
    s, b, h, d = out.shape
    rows = s * b * h
    block_r, warps = config or (INTERPRET_CONFIG if interpret else DEFAULT_CONFIG)
    args = []
    for i in range(MAX_PARTS):
        o, l = parts[min(i, len(parts) - 1)]  # unused slots repeat the last partial (never read)
        args += [o, l, *o.stride(), *l.stride()]
    grid = (triton.cdiv(rows, block_r),)
    kernel(interpret)[grid](out, lse, rows, b, h, *out.stride(), *args, K=len(parts), D=d,
                            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_R=block_r,
                            num_warps=warps)


def launch(parts, out: torch.Tensor, lse: torch.Tensor, interpret: bool, config=None):
    """parts: (o [s, b, h, d], l [s, b, h]) each, any strides, o in bf16 / fp16 / fp32, l in
    float32; out [s, b, h, d] any float dtype and strides; lse [s, b, h] contiguous float32.
    config: (BLOCK_R, num_warps) instead of DEFAULT_CONFIG (benchmarks). More than MAX_PARTS
    partials: merged MAX_PARTS at a time into a float32 running result."""
    parts = list(parts)
    if not out.numel():
        return out, lse
    while len(parts) > MAX_PARTS:
        head_out = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        head_lse = torch.empty_like(lse)
        _launch_group(parts[:MAX_PARTS], head_out, head_lse, interpret, config)
        parts = [(head_out, head_lse)] + parts[MAX_PARTS:]
    _launch_group(parts, out, lse, interpret, config)
    return out, lse
