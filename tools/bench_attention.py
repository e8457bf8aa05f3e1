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
"""

from __future__ import annotations

import argparse
import json
import statistics

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
    return p.parse_args(argv)


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
