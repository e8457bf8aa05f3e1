#!/usr/bin/env python3
"""Measure the attention kernels Spava can use, on one CUDA GPU, and pick the fastest.

For each kernel of megatron_spava.ops.attention (called through `attend`, so layout
handling and any GQA repeat are counted), and for PyTorch's public SDPA pinned to its
cuDNN backend (the baseline), it reports median time and TFLOP/s on:
  causal      one square causal attention of --seq-len tokens (a block's own rows);
  prefix      --seq-len / 4 query rows over 3/4 * --seq-len fully visible keys (a block's
              rows over its passing blocks and anchor: no mask).
Shapes default to Qwen2.5-VL-7B's language model: 28 query heads, 4 KV heads, head_dim
128, bf16. Each kernel is first checked against float32 math on a small problem, GQA
included; a kernel that fails the check is reported and not timed.

    python tools/bench_attention.py --seq-len 65536 --json out.json

FLOPs: 4 * b * hq * sq * sk * d, halved for causal (the work a causal kernel must do).

--merge times the LSE merge of attention partials instead (`ops.attention.merge_partials`,
SpavaConfig.merge_kernel): the torch path against the fused Triton kernel (its default config
and each of `_merge_triton.CONFIGS`), on Spava's two merges at a rank's shapes: a block's rows
(--merge-rows, two bf16 partials from `attend`, into the bf16 output) and the query rows
(--merge-query-rows, --cp float32 partials packed in the gathered buffer, into the bf16
output). Beside each: its floor, the bytes one pass must move (partials and lse read once,
the output written once) over the measured copy rate. GPU clock: each call queued behind
torch.cuda._sleep, as in a layer whose earlier kernels keep the GPU busy.

    python tools/bench_attention.py --merge --merge-rows 16384 32768 --merge-query-rows 64 512 --cp 4

--device cpu is a smoke run of --merge (times mean nothing; the kernel runs only under
TRITON_INTERPRET=1, in triton's interpreter).
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_spava.perf.kernels import time_ms
from megatron_spava.ops.attention import GQA_NATIVE, _KERNELS, attend
from megatron_spava.testing.reference import relative_error

KERNELS = ["cudnn", "flash", "flex", "efficient"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=65536, help="tokens (default: %(default)s)")
    p.add_argument("--q-heads", type=int, default=28, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs, median kept (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: %(default)s)")
    p.add_argument("--kernels", nargs="+", default=KERNELS, help="kernels to measure")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--merge", action="store_true",
                   help="time the LSE merge (torch vs the Triton kernel) instead of the attention kernels")
    p.add_argument("--merge-rows", type=int, nargs="+", default=[16384, 32768],
                   help="--merge: a block's rows (default: %(default)s, a rank's blocks at 128K / 256K, CP 4)")
    p.add_argument("--merge-query-rows", type=int, nargs="+", default=[64, 512],
                   help="--merge: query rows (default: %(default)s)")
    p.add_argument("--cp", type=int, default=4, help="--merge: partials of the query merge (default: %(default)s)")
    p.add_argument("--layers", type=int, default=28,
                   help="--merge: layers of the per-prefill estimate (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="--merge only: cpu for a smoke run (default: %(default)s)")
    return p.parse_args(argv)


def bench_merge(args):
    """--merge: the table of merge times against their floors (module docstring)."""
    from megatron_spava.ops.lse_score import triton_available
    from megatron_spava.perf.kernels import copy_rate, cpu_time_ms, merge_times
    if triton_available():
        from megatron_spava.ops import _merge_triton
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(0).name
        timer = lambda fn, r, w: time_ms(fn, r, w, sleep_cycles=4_000_000)  # noqa: E731
    else:
        name, timer = "cpu (smoke run)", cpu_time_ms
    rate = copy_rate(device, (1 << 30) if device.type == "cuda" else (16 << 20))
    hq, d = args.q_heads, args.head_dim
    configs = _merge_triton.CONFIGS if device.type == "cuda" and triton_available() else ()
    default = _merge_triton.DEFAULT_CONFIG if triton_available() else "n/a"
    print(f"device: {name}, torch {torch.__version__}; copy rate {rate / 1e9:.0f} GB/s (read + write); "
          f"Triton kernel default config {default}")
    rows = []
    for kind, sizes, parts in (("block", args.merge_rows, 2), ("query", args.merge_query_rows, args.cp)):
        for n in sizes:
            r = merge_times(kind, n, hq, d, parts, device, timer, args.warmup, args.repeats, configs)
            r["floor_ms"] = r["bytes"] / rate * 1e3
            if r["configs"]:
                best = min(r["configs"], key=r["configs"].get)
                r["best_config"], r["best_ms"] = best, r["configs"][best]
            rows.append(r)
            print(json.dumps(r), flush=True)
    clock = "GPU-clock medians" if device.type == "cuda" else "medians"
    print(f"\n{name}, hq={hq} d={d}; {clock} of {args.repeats}; floor = bytes / copy rate")
    print("| merge | rows | partials | MB moved | floor ms | torch ms | triton ms | best config ms | "
          "torch / floor | triton / floor | torch / triton |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tri, floor = r["triton"], r["floor_ms"]
        best = f"{r['best_ms']:.4f} {r['best_config']}" if "best_ms" in r else "-"
        tri_ms, tri_ratio, speedup = (("-", "-", "-") if tri is None else
                                      (f"{tri:.4f}", f"{tri / floor:.2f}", f"{r['torch'] / tri:.2f}"))
        print(f"| {r['kind']} | {r['rows']} | {r['parts']} | {r['bytes'] / 1e6:.1f} | {floor:.4f} | "
              f"{r['torch']:.4f} | {tri_ms} | {best} | {r['torch'] / floor:.2f} | {tri_ratio} | {speedup} |")
    query = [r for r in rows if r["kind"] == "query"]
    if query:
        q = max(query, key=lambda r: r["rows"])
        for b in (r for r in rows if r["kind"] == "block"):
            est = {impl: args.layers * (2 * b[impl] + q[impl]) for impl in ("torch", "triton")
                   if b[impl] is not None and q[impl] is not None}
            floor = args.layers * (2 * b["floor_ms"] + q["floor_ms"])
            print(f"per prefill (estimate, {args.layers} layers x (2 block merges of {b['rows']} rows + one query "
                  f"merge of {q['rows']})): " + ", ".join(f"{k} {v:.1f} ms" for k, v in est.items())
                  + f"; floor {floor:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=name, torch=torch.__version__, copy_rate=rate, merges=rows), f, indent=2)


def rand(shape, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)


def check(kernel, hq, hk, d):
    """Relative error of out and max |lse error| against float32 math, GQA, both masks."""
    worst = 0.0
    for causal, sq, sk in ((True, 777, 777), (False, 300, 1100)):
        q, k, v = rand((sq, 1, hq, d), 1), rand((sk, 1, hk, d), 2), rand((sk, 1, hk, d), 3)
        out, lse = attend(q, k, v, causal=causal, kernel=kernel)
        ref, ref_lse = attend(q.float(), k.float(), v.float(), causal=causal, kernel="math")
        err = relative_error(out, ref)
        lse_err = float((lse - ref_lse).abs().max())
        if not (err < 1e-2 and lse_err < 2e-2):
            raise AssertionError(f"causal={causal}: rel err {err:.2e}, lse err {lse_err:.2e}")
        worst = max(worst, err)
    return worst


def native_gqa_ok(kernel, hq, hk, d):
    """Whether the raw kernel reads grouped K/V correctly without a repeat (so it could be
    listed in GQA_NATIVE). Returns True/False, or the error text."""
    try:
        q, k, v = rand((1, hq, 500, d), 11), rand((1, hk, 500, d), 12), rand((1, hk, 500, d), 13)
        out, _ = _KERNELS[kernel](q, k, v, True, d ** -0.5)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(hq // hk, 1), v.float().repeat_interleave(hq // hk, 1),
            is_causal=True)
        return relative_error(out, ref) < 1e-2
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return bench_merge(args)
    s, hq, hk, d = args.seq_len, args.q_heads, args.kv_heads, args.head_dim
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    shapes = {"causal": (s, s, True), "prefix": (s // 4, 3 * s // 4, False)}
    results = []

    def record(name, shape, fn, note=""):
        sq, sk, causal = shapes[shape]
        flops = 4 * hq * sq * sk * d / (2 if causal else 1)
        try:
            med, lo, hi = time_ms(fn, args.repeats, args.warmup)
        except Exception as err:  # a kernel that cannot run this shape is reported, not fatal
            results.append(dict(kernel=name, shape=shape, error=f"{type(err).__name__}: {err}"[:300]))
            print(f"{name:>14} {shape:>7}  failed: {results[-1]['error']}")
            return
        results.append(dict(kernel=name, shape=shape, sq=sq, sk=sk, causal=causal, median_ms=med,
                            min_ms=lo, max_ms=hi, tflops=flops / med / 1e9, note=note))
        print(f"{name:>14} {shape:>7}  {med:9.3f} ms  {flops / med / 1e9:7.1f} TFLOP/s {note}")

    # Baseline: public SDPA, cuDNN backend, K/V with as many heads as q (it has no GQA path
    # we can count on), in the [b, h, s, d] layout it prefers.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for shape, (sq, sk, causal) in shapes.items():
        qb, kb, vb = rand((1, hq, sq, d), 4), rand((1, hq, sk, d), 5), rand((1, hq, sk, d), 6)

        def baseline(qb=qb, kb=kb, vb=vb, causal=causal):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=causal)
        record("sdpa_cudnn", shape, baseline, "(baseline, MHA K/V)")
        del qb, kb, vb

    native = {kernel: native_gqa_ok(kernel, hq, hk, d) for kernel in args.kernels}
    print(f"native GQA (no K/V repeat) works: {native}; listed as native now: {sorted(GQA_NATIVE)}")
    for kernel in args.kernels:
        try:
            err = check(kernel, hq, hk, d)
        except Exception as exc:
            results.append(dict(kernel=kernel, check=f"{type(exc).__name__}: {exc}"[:300]))
            print(f"{kernel:>14} check failed: {results[-1]['check']}")
            continue
        for shape, (sq, sk, causal) in shapes.items():
            q, k, v = rand((sq, 1, hq, d), 7), rand((sk, 1, hk, d), 8), rand((sk, 1, hk, d), 9)
            record(kernel, shape, lambda q=q, k=k, v=v, causal=causal: attend(
                q, k, v, causal=causal, kernel=kernel), f"(Spava attend, GQA {hq}/{hk}, check {err:.1e})")
            del q, k, v
        torch.cuda.empty_cache()

    timed = [r for r in results if "tflops" in r and r["kernel"] != "sdpa_cudnn"]
    best = {}
    for shape in shapes:
        rows = [r for r in timed if r["shape"] == shape]
        if rows:
            best[shape] = max(rows, key=lambda r: r["tflops"])["kernel"]
    print(f"fastest per shape: {best}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=props.name, torch=torch.__version__,
                           results=results, fastest=best, native_gqa=native), f, indent=2)


if __name__ == "__main__":
    main()
