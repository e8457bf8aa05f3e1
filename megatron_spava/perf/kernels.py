"""Kernel floors at a model's shapes: one layer's four GEMMs alone, and one causal attention
call alone (our kernel, and with TE its DotProductAttention). tools/bench_layers.py and the
prefill benchmark's roofline rates time them. `shape`: megatron-core names (hidden_size,
kv_channels, num_attention_heads, num_query_groups, ffn_hidden_size)."""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), times


def gemm_floor_ms(shape, S, dtype, device, warmup, repeats):
    """Time of one layer's four GEMMs alone, at the layer's shapes."""
    h, d = shape["hidden_size"], shape["kv_channels"]
    hq, hk, f = shape["num_attention_heads"], shape["num_query_groups"], shape["ffn_hidden_size"]
    x = torch.randn(S, h, device=device, dtype=dtype)
    a = torch.randn(S, hq * d, device=device, dtype=dtype)
    m = torch.randn(S, f, device=device, dtype=dtype)
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.01
               for n, k in (((hq + 2 * hk) * d, h), (h, hq * d), (2 * f, h), (h, f))]
    inputs = [x, a, x, m]
    flops = sum(2 * S * w.shape[0] * w.shape[1] for w in weights)

    def run():
        for i, w in zip(inputs, weights):
            torch.nn.functional.linear(i, w)

    ms, _ = _median_ms(run, device, warmup, repeats)
    return ms, flops


def fp8_gemm_floor_ms(shape, S, device, warmup, repeats):
    """Time of one layer's four GEMMs alone in FP8 (e4m3 inputs, per-tensor scales, bf16
    out: `torch._scaled_mm`, the kernel family TE's FP8 linears call on Hopper), at the
    layer's shapes; casts not timed. CUDA only."""
    h, d = shape["hidden_size"], shape["kv_channels"]
    hq, hk, f = shape["num_attention_heads"], shape["num_query_groups"], shape["ffn_hidden_size"]
    e4m3 = torch.float8_e4m3fn
    one = torch.ones((), device=device)
    x = torch.randn(S, h, device=device).to(e4m3)
    a = torch.randn(S, hq * d, device=device).to(e4m3)
    m = torch.randn(S, f, device=device).to(e4m3)
    weights = [(torch.randn(n, k, device=device) * 0.01).to(e4m3)
               for n, k in (((hq + 2 * hk) * d, h), (h, hq * d), (2 * f, h), (h, f))]
    inputs = [x, a, x, m]
    flops = sum(2 * S * w.shape[0] * w.shape[1] for w in weights)

    def run():
        for i, w in zip(inputs, weights):
            torch._scaled_mm(i, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    ms, _ = _median_ms(run, device, warmup, repeats)
    return ms, flops


def copy_rate(device, nbytes: int, warmup: int = 1, repeats: int = 3) -> float:
    """Device-memory copy rate, bytes read + written per second, of one copy of `nbytes`
    (the floor of memory-bound work: LSE merges, the selection's read of K)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _ = _median_ms(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * 4 / (ms / 1e3)


def attention_floor_ms(shape, S, dtype, device, warmup, repeats, te: bool):
    """Causal attention alone at length S: {kernel: ms} for our cuDNN (or CPU) kernel and,
    with TE, TE's DotProductAttention."""
    from megatron_spava.ops.attention import attend
    hq, hk, d = shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"]
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(S, 1, hq, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(S, 1, hk, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(S, 1, hk, d, device=device, dtype=dtype, generator=gen)
    kernel = "cudnn" if device.type == "cuda" else "auto"
    out = {f"sdpa_{kernel}": _median_ms(lambda: attend(q, k, v, causal=True, kernel=kernel),
                                        device, warmup, repeats)[0]}
    if te:
        import transformer_engine.pytorch as te_pt
        dpa = te_pt.DotProductAttention(hq, d, num_gqa_groups=hk, attn_mask_type="causal",
                                        qkv_format="sbhd", attention_dropout=0.0)
        out["te_dot_product_attention"] = _median_ms(lambda: dpa(q, k, v), device, warmup, repeats)[0]
    flops = 2 * S * S * hq * d  # QK^T and PV, causal half: 4 S^2 h d / 2
    return out, flops


def time_ms(fn, repeats, warmup, sleep_cycles: int = 0):
    """(median, min, max) milliseconds of `fn` on the GPU, between CUDA events.
    sleep_cycles > 0: each call is queued behind a torch.cuda._sleep of that many cycles
    (4e6: ~2 ms), so the host has queued all of fn before the GPU reaches it and the events
    time the GPU alone, not the host's launch rate."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def cpu_time_ms(fn, repeats, warmup):
    """time_ms's (median, min, max) milliseconds on the CPU, by the host clock (a benchmark's
    --device cpu smoke run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def merge_inputs(kind: str, rows: int, heads: int, d: int, parts: int, device, seed: int = 0):
    """The partials and destination of one of Spava's LSE merges, as the layer has them.

    kind "block": a block's rows, `parts` bf16 partials as `attend` returns them (out
    [rows, 1, heads, d], lse [rows, 1, heads] a view of [1, heads, rows]), merged into a bf16
    slice of the layer's output. kind "query": the query rows, `parts` = W float32 partials
    packed with their lse in one gathered buffer ([W * rows, 1, heads, d + 1], as
    `distributed.gather_partials` leaves it), merged into a bf16 slice.
    Returns (partials, destination, bytes a single pass must move: partials and lse read once,
    the destination written once)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "block":
        ps = [(torch.randn(rows, 1, heads, d, device=device, generator=gen).to(torch.bfloat16),
               (torch.randn(1, heads, rows, device=device, generator=gen) * 3).permute(2, 0, 1))
              for _ in range(parts)]
    elif kind == "query":
        packed = torch.randn(parts * rows, 1, heads, d + 1, device=device, generator=gen)
        ps = [(p[..., :-1], p[..., -1]) for p in packed.view(parts, rows, 1, heads, d + 1)]
    else:
        raise ValueError(f"merge_inputs: kind must be 'block' or 'query', got {kind!r}")
    dest = torch.empty(2 * rows, 1, heads, d, device=device, dtype=torch.bfloat16)[rows:]
    nbytes = sum(o.numel() * o.element_size() + l.numel() * 4 for o, l in ps) + dest.numel() * 2
    return ps, dest, nbytes


def merge_times(kind: str, rows: int, heads: int, d: int, parts: int, device, timer, warmup: int,
                repeats: int, configs=()):
    """Time `ops.attention.merge_partials` on one merge of `merge_inputs`: the torch path, and
    the Triton kernel at its default config and at each of `configs` ((BLOCK_R, num_warps)),
    where it runs (CUDA tensors, or CPU tensors in triton's interpreter). timer(fn, repeats,
    warmup) -> (median ms, ...). Before timing, the kernel's output is checked against the
    torch path's (at most two bf16 roundings apart: triton's interpreter stores bf16 by
    truncation). Returns {"torch": ms, "triton": ms or None,
    "configs": {config: ms}, "bytes": ..., "max_rel_diff": ...}."""
    from megatron_spava.ops.attention import merge_partials, resolve_merge
    ps, dest, nbytes = merge_inputs(kind, rows, heads, d, parts, device)
    res = dict(kind=kind, rows=rows, heads=heads, head_dim=d, parts=parts, bytes=nbytes,
               torch=timer(lambda: merge_partials(ps, out=dest), repeats, warmup)[0],
               triton=None, configs={}, max_rel_diff=None)
    try:
        resolve_merge("triton", dest.device)
    except ValueError as err:
        res["triton_error"] = str(err)
        return res
    ref = merge_partials(ps, out=torch.empty_like(dest))[0].float()
    got = merge_partials(ps, out=torch.empty_like(dest), impl="triton")[0].float()
    res["max_rel_diff"] = float(((got - ref).abs() / ref.abs().clamp_min(1e-3)).max())
    if not res["max_rel_diff"] <= 2 ** -6:
        raise AssertionError(f"merge {kind} rows={rows}: the Triton kernel differs from the torch path "
                             f"by {res['max_rel_diff']:.2e} (relative)")
    res["triton"] = timer(lambda: merge_partials(ps, out=dest, impl="triton"), repeats, warmup)[0]
    for config in configs:
        res["configs"][str(config)] = timer(lambda c=config: merge_partials(ps, out=dest, impl="triton", config=c),
                                            repeats, warmup)[0]
    return res
