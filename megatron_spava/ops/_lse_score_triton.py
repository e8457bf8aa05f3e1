"""The Triton kernel behind `ops.lse_score.lse_scores` (imported lazily: triton is optional).

One program per (tile of BLOCK_N keys, KV head, batch). It loads its key tile once, then
walks the KV head's R = l_q * G probe rows (query token j, group head g; g fastest) in tiles
of BLOCK_M: S = K_tile @ Q_tile^T on the tensor cores (fp32 accumulation), then an online
max / sum of exp2 per key in fp32. The logits never leave registers. Per key:

    s[t] = ln 2 * (m + log2 sum_r exp2(c * (x_r - m))),  x_r = q_r . k_t,  c = scale * log2(e)

with m the running max of x (c > 0, so max of x is the max of the scaled logits).

With HAS_OFFSET (a constexpr: without it the kernel compiles as if the switch were not
there), each probe row r of KV head h has an offset o[b, h, r] (float32) subtracted from its
scaled logits, s[t] = logsumexp_r (scale * q_r . k_t - o_r): inside the tile loop x_r becomes
x_r - o_r / scale (in the units of the raw dots, so the running max and the final formula
stay the same). This is the second pass of the `rownorm` score (`ops.lse_score.rownorm_scores`).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _rows_tile(k, q_base, start, R, G, stride_qs, stride_qh, stride_qd, m_i, l_i, qk_scale,
               o_base, stride_or, inv_scale,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
               HAS_OFFSET: tl.constexpr):
    """One tile of BLOCK_M probe rows from `start` against the key tile k: the updated running
    max m_i (of the raw dots) and sum l_i (of exp2(c * (x - m_i))) per key. MASKED: the last,
    partial tile (rows >= R are left out); the full tiles before it need no masks.
    HAS_OFFSET: x_r -= o_r * inv_scale, with o_r read at o_base + r * stride_or (float32)."""
    r = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    j = r // G
    g = r - j * G
    q_ptrs = q_base + j[:, None] * stride_qs + g[:, None] * stride_qh + offs_d[None, :] * stride_qd
    if MASKED:
        mask = r[:, None] < R
    else:
        mask = r[:, None] >= 0
    if D != BLOCK_D:  # the head dim is padded to a power of two
        mask = mask & (offs_d[None, :] < D)
    if MASKED or D != BLOCK_D:
        q = tl.load(q_ptrs, mask=mask, other=0.0)
    else:
        q = tl.load(q_ptrs)
    if UPCAST:
        q = q.to(tl.float32)
    x = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M] fp32
    if HAS_OFFSET:  # the row's offset, in raw-dot units: c * (x - o / scale) = scale * x * log2(e) - o * log2(e)
        if MASKED:
            o = tl.load(o_base + r * stride_or, mask=r < R, other=0.0)
        else:
            o = tl.load(o_base + r * stride_or)
        x = x - (o * inv_scale)[None, :]
    if MASKED:
        x = tl.where(r[None, :] < R, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    p = tl.exp2(x * qk_scale - (m_new * qk_scale)[:, None])
    l_new = l_i * tl.exp2((m_i - m_new) * qk_scale) + tl.sum(p, 1)
    return m_new, l_new


def _lse_kernel(Q, K, S, R, L_B, G,
                stride_qb, stride_qs, stride_qh, stride_qd,
                stride_kb, stride_ks, stride_kh, stride_kd,
                stride_sb, stride_sh, stride_st,
                qk_scale, R_KEY, LB_KEY,
                O, stride_ob, stride_oh, stride_or, inv_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                HAS_OFFSET: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = (K + b * stride_kb + h * stride_kh
              + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    if D == BLOCK_D:  # no padding of the head dim: masks constant along d keep loads wide
        k = tl.load(k_ptrs, mask=offs_n[:, None] < L_B, other=0.0)
    else:
        k = tl.load(k_ptrs, mask=(offs_n[:, None] < L_B) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * G * stride_qh
    o_base = O
    if HAS_OFFSET:
        o_base = O + b * stride_ob + h * stride_oh
    r_full = (R // BLOCK_M) * BLOCK_M
    for start in range(0, r_full, BLOCK_M):
        m_i, l_i = _rows_tile(k, q_base, start, R, G, stride_qs, stride_qh, stride_qd, m_i, l_i, qk_scale,
                              o_base, stride_or, inv_scale,
                              D, BLOCK_D, BLOCK_M, PRECISION, UPCAST, False, HAS_OFFSET)
    if r_full < R:
        m_i, l_i = _rows_tile(k, q_base, r_full, R, G, stride_qs, stride_qh, stride_qd, m_i, l_i, qk_scale,
                              o_base, stride_or, inv_scale,
                              D, BLOCK_D, BLOCK_M, PRECISION, UPCAST, True, HAS_OFFSET)
    s = (m_i * qk_scale + tl.log2(l_i)) * 0.6931471805599453
    tl.store(S + b * stride_sb + h * stride_sh + offs_n * stride_st, s, mask=offs_n < L_B)


# (BLOCK_N, BLOCK_M, num_warps, num_stages); tried by the autotuner on a GPU.
CONFIGS = ((128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 3), (256, 64, 8, 3),
           (256, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3))
#: the one config the interpreter runs (small tiles, so tests exercise several of each)
INTERPRET_CONFIG = (16, 16, 1, 1)


@functools.lru_cache(maxsize=None)
def kernel(interpret: bool):
    """The launchable kernel: autotuned over CONFIGS (compiled), or interpreted on the CPU.

    Autotuning is keyed on the power-of-two buckets of R and l_b (R_KEY, LB_KEY), head dim,
    HAS_OFFSET and dtypes, so a new query or block length within a bucket does not tune again."""
    if interpret:
        if not triton.knobs.runtime.interpret:
            raise ValueError("lse_scores: the Triton kernel on CPU tensors runs in triton's interpreter, "
                             "which needs TRITON_INTERPRET=1 set before triton is first imported")
        return triton.jit(_lse_kernel)
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_M": m}, num_warps=w, num_stages=s)
               for n, m, w, s in CONFIGS]
    return triton.autotune(configs=configs, key=["R_KEY", "LB_KEY", "BLOCK_D", "HAS_OFFSET"])(_plain_jit())


def launch(q, k, out, scale: float, interpret: bool, config=None, row_offset=None):
    """q: [l_q, b, hq, d], k: [l_b, b, hk, d] (any strides), out: [b, hk, l_b] float32.
    config: (BLOCK_N, BLOCK_M, num_warps, num_stages) to bypass the autotuner (benchmarks).
    row_offset: None, or float32 [b, hk, l_q * (hq // hk)] (any strides; row r = j * G + g),
    subtracted from row r's scaled logits (HAS_OFFSET)."""
    l_q, b, hq, d = q.shape
    l_b, _, hk, _ = k.shape
    g = hq // hk
    rows = l_q * g
    block_d = max(16, triton.next_power_of_2(d))
    # fp32 operands: three tf32 products (near-fp32 accuracy on the tensor cores); the
    # setting is unused for 16-bit operands.
    precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
    # triton's interpreter multiplies bf16 tiles as their uint16 bit patterns (numpy has no
    # bf16): there the tiles are upcast to fp32 first, which is exact for the products.
    upcast = interpret and q.dtype == torch.bfloat16
    has_offset = row_offset is not None
    offset_args = ((row_offset, row_offset.stride(0), row_offset.stride(1), row_offset.stride(2), 1.0 / scale)
                   if has_offset else (None, 0, 0, 0, 1.0))
    args = (q, k, out, rows, l_b, g,
            q.stride(1), q.stride(0), q.stride(2), q.stride(3),
            k.stride(1), k.stride(0), k.stride(2), k.stride(3),
            out.stride(0), out.stride(1), out.stride(2),
            scale * LOG2E, triton.next_power_of_2(max(rows, 1)), triton.next_power_of_2(max(l_b, 1)),
            *offset_args)
    if interpret or config is not None:
        n, m, w, s = config or INTERPRET_CONFIG
        fn = kernel(True) if interpret else _plain_jit()
        fn[(triton.cdiv(l_b, n), hk, b)](*args, D=d, BLOCK_D=block_d, BLOCK_N=n, BLOCK_M=m,
                                          PRECISION=precision, UPCAST=upcast, HAS_OFFSET=has_offset,
                                          num_warps=w, num_stages=s)
    else:
        grid = lambda meta: (triton.cdiv(l_b, meta["BLOCK_N"]), hk, b)  # noqa: E731
        kernel(False)[grid](*args, D=d, BLOCK_D=block_d, PRECISION=precision, UPCAST=False,
                            HAS_OFFSET=has_offset)
    return out


def best_config():
    """The config the autotuner chose last, as (BLOCK_N, BLOCK_M, num_warps, num_stages)."""
    c = getattr(kernel(False), "best_config", None)
    return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) if c else None


#: lengths vary per call: compile once for all of them (strides keep their specialisation, but
#: the offset's head and batch strides are multiples of the row count)
_NOT_SPECIALIZED = ("R", "L_B", "G", "R_KEY", "LB_KEY", "stride_ob", "stride_oh")


@functools.lru_cache(maxsize=None)
def _plain_jit():
    return triton.jit(_lse_kernel, do_not_specialize=_NOT_SPECIALIZED)
