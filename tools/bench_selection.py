"""Time the passing-block selection of one block on one CUDA GPU: SPAVA.md's mean probe, the
log-sum-exp score over materialised fp32 logit chunks (the torch path of selection "lse",
`ops.selection.lse_scores_torch`) and the same score from the fused Triton kernel (`ops.lse_score.lse_scores`: one pass
over the keys, no logits in memory), beside the block's own causal attention (the work the
selection sits next to).

    python tools/bench_selection.py --block-len 16384 32768 65536 --query-len 64 512

Shapes default to Qwen2.5-VL-7B's language model (28 query heads, 4 KV heads, head_dim 128,
bf16); the budget is SPAVA.md's default for a context of 2 * CP * block tokens at CP = 4.
Medians of --repeats runs (CUDA events). Each selection column is the whole selection
(score, max-pool, top-k, gather); "fused score" is the kernel alone.

Before timing, each size checks the kernel against the torch path of ops.selection on the same
inputs (max |score difference| and the share of the top-k selection both keep). Beside the
kernel: its floor, the largest of FLOPs (2 l_q Hq l_b d) over the measured bf16 matmul rate,
bytes (k read once, q read once, s written) over the measured copy bandwidth, and the
exponentials (l_q Hq l_b, one per logit) over the SFU rate (16 ex2 per SM per clock, the
CUDA programming guide's number for compute capability 9.0, at the card's max SM clock).
Target (issue 23): fused selection <= max(1.5 x mean probe, 5% of the block's attention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_ms  # noqa: E402

from megatron_spava.algos.spava import SpavaLayout  # noqa: E402
from megatron_spava.ops.attention import attend  # noqa: E402
from megatron_spava.ops.lse_score import lse_scores  # noqa: E402
from megatron_spava.ops.selection import gather_top, lse_scores_torch, select_passing  # noqa: E402


def fused_select(q_query, k, v, budget, pool_kernel, scale):
    """The selection with the fused kernel's scores: [budget, b, hk, 2d], as select_passing."""
    scores = lse_scores(q_query, k, scale).permute(1, 2, 0)  # [b, hk, l], no copy
    scores = F.max_pool1d(scores, pool_kernel, stride=1, padding=pool_kernel // 2)
    return gather_top(k, v, scores, budget)


def cpu_time_ms(fn, repeats, warmup):
    """time_ms's (median, min, max) on the CPU (--device cpu: a smoke run of this script)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def ceilings(dev, timer, repeats=10):
    """Measured bf16 matmul TFLOP/s and copy GB/s (read + write), and the SFU ex2 rate /s
    (16 per SM per clock; on the CPU a stand-in of 1e12 /s)."""
    n, nbytes = (8192, 1 << 30) if dev.type == "cuda" else (512, 1 << 24)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm = timer(lambda: a @ a, repeats, 3)[0]
    x = torch.empty(nbytes, device=dev, dtype=torch.uint8)
    y = torch.empty_like(x)
    cp = timer(lambda: y.copy_(x), repeats, 3)[0]
    del a, x, y
    sfu, mhz = 1e12, 0.0
    if dev.type == "cuda":
        try:
            mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                                        f"--id={torch.cuda.current_device()}"], capture_output=True,
                                       text=True, timeout=30).stdout.split()[0])
        except Exception:
            mhz = 1755.0  # H100 SXM's max SM clock is 1980; a low guess raises the floor less
        sfu = torch.cuda.get_device_properties(0).multi_processor_count * 16 * mhz * 1e6
    return dict(matmul_tflops=2 * n ** 3 / mm / 1e9, copy_gbs=2 * nbytes / cp / 1e6,
                sfu_ex2_per_s=sfu, sm_mhz=mhz)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-len", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--query-len", type=int, nargs="+", default=[64, 512], help="query tokens (default: %(default)s)")
    p.add_argument("--q-heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cp", type=int, default=4, help="for the default budget (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda",
                   help="cuda (default), or cpu for a smoke run (torch paths; no meaningful times)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    dev, dt = torch.device(args.device), torch.bfloat16
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_selection: needs a CUDA GPU (or --device cpu for a smoke run)")
    timer = time_ms if dev.type == "cuda" else cpu_time_ms
    kern = None
    if dev.type == "cuda":
        from megatron_spava.ops import _lse_score_triton as kern
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    hq, hk, d = args.q_heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    ceil = ceilings(dev, timer)
    print(f"{device_name}, bf16, hq={hq} hk={hk} d={d}; measured: bf16 matmul "
          f"{ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbs']:.0f} GB/s; SFU "
          f"{ceil['sfu_ex2_per_s'] / 1e12:.2f} T ex2/s at {ceil['sm_mhz']:.0f} MHz")
    rows = []
    for l in args.block_len:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(l, 1, hk, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(l, 1, hk, d, device=dev, dtype=dt, generator=g)
        q = torch.randn(l, 1, hq, d, device=dev, dtype=dt, generator=g)
        attn = timer(lambda: attend(q, k, v, causal=True), args.repeats, args.warmup)[0]
        del q
        for lq in args.query_len:
            qq = torch.randn(lq, 1, hq, d, device=dev, dtype=dt, generator=g)
            # SPAVA.md's default budget for the context whose 2 * CP blocks are this long
            budget = SpavaLayout.plan(context_len=2 * args.cp * l, query_len=lq, cp_size=args.cp).passing_len
            # correctness, same inputs: the kernel against ops.selection's torch path (fp32 logits)
            ref = lse_scores_torch(k, qq, scale)[0]  # [hk, l], no pool
            got = lse_scores(qq, k, scale).permute(1, 2, 0)[0]  # the first call tunes this size
            tuning = {str(c): v for c, v in (getattr(kern.kernel(False), "configs_timings", None) or {}).items()} \
                if kern else {}
            max_diff = float((got - ref).abs().max())
            pool = lambda s: F.max_pool1d(s, 5, stride=1, padding=2)  # noqa: E731
            keep_ref = pool(ref[None]).topk(budget, dim=-1).indices[0]
            keep_got = pool(got[None]).topk(budget, dim=-1).indices[0]
            overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(keep_ref, keep_got)) / keep_ref.numel()
            if not (max_diff < 2e-2 and torch.isfinite(got).all()):
                raise AssertionError(f"l={l} lq={lq}: fused scores differ from the torch path by {max_diff:.3e}")
            t = {}
            t["mean"] = timer(lambda: select_passing(k, v, qq, budget, 5, scale, "mean"),
                                args.repeats, args.warmup)[0]
            t["lse_torch"] = timer(lambda: gather_top(k, v, F.max_pool1d(lse_scores_torch(k, qq, scale), 5, stride=1,
                                                                         padding=2), budget),
                                     args.repeats, args.warmup)[0]
            t["lse_fused"] = timer(lambda: fused_select(qq, k, v, budget, 5, scale), args.repeats, args.warmup)[0]
            t["fused_score"] = timer(lambda: lse_scores(qq, k, scale), args.repeats, args.warmup)[0]
            flops = 2 * lq * hq * l * d
            nbytes = (l * hk * d + lq * hq * d) * 2 + l * hk * 4
            exps = lq * hq * l
            floors = dict(flops_ms=flops / (ceil["matmul_tflops"] * 1e9), bytes_ms=nbytes / (ceil["copy_gbs"] * 1e6),
                          exp_ms=exps / ceil["sfu_ex2_per_s"] * 1e3)
            target = max(1.5 * t["mean"], 0.05 * attn)
            row = dict(block_len=l, query_len=lq, budget=budget, mean_ms=t["mean"], lse_torch_ms=t["lse_torch"],
                       lse_fused_ms=t["lse_fused"], fused_score_ms=t["fused_score"], attention_ms=attn,
                       target_ms=target, met=t["lse_fused"] <= target, floor_ms=max(floors.values()),
                       max_abs_diff=max_diff, topk_overlap=overlap, config=kern.best_config() if kern else None,
                       tuning_ms=tuning, **floors)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{device_name}, bf16, hq={hq} hk={hk} d={d}, CP {args.cp} default budget; "
          "ms are medians; target = max(1.5 x mean, 5% of attention)")
    print("| block | query | budget | mean probe ms | lse torch ms | lse fused ms | fused/mean | fused/attn | "
          "target ms | met | fused score ms | floor ms (flops / bytes / exp) | config | max diff | top-k kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_len']} | {r['query_len']} | {r['budget']} | {r['mean_ms']:.3f} | {r['lse_torch_ms']:.3f} | "
              f"{r['lse_fused_ms']:.3f} | {r['lse_fused_ms'] / r['mean_ms']:.2f} | "
              f"{100 * r['lse_fused_ms'] / r['attention_ms']:.1f}% | {r['target_ms']:.3f} | "
              f"{'yes' if r['met'] else 'NO'} | {r['fused_score_ms']:.3f} | {r['floor_ms']:.3f} "
              f"({r['flops_ms']:.3f} / {r['bytes_ms']:.4f} / {r['exp_ms']:.3f}) | {r['config']} | "
              f"{r['max_abs_diff']:.1e} | {r['topk_overlap']:.3f} |")
    print("| block | block causal attention ms |\n|---|---|")
    for l in args.block_len:
        print(f"| {l} | {next(r['attention_ms'] for r in rows if r['block_len'] == l):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, args=vars(args), ceilings=ceil, rows=rows), f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
