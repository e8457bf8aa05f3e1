"""One rank's share of one Spava attention layer, on one GPU, under each selection score.

    python tools/bench_spava_rank.py --total 131072 262144 --query-len 512 64 --cp 4

Runs `spava_attn_func` itself, as rank r of a CP group of --cp ranks, on that rank's local
q / k / v (random, bf16, 7B shape: 28 query heads, 4 KV heads, head_dim 128; context =
total - query tokens, SPAVA.md's default budgets). One GPU holds one rank, so the three
communication calls of the layer are local stand-ins that give the rank a buffer of the
right size and layout: the layer runs with `cp_group=EmulatedGroup(r, W)`
(megatron_spava.distributed, the one seam every collective goes through; the prefill
benchmark's --emulate-rank uses the same):

- the rank's index and the group's size come from the group, not a process group;
- the all-gather of the passing blocks copies this rank's passing block into all W slots;
- the all-gather of the query rows' partials packs this rank's partial like the real one
  and copies it into all W slots.

So the timed region is everything the rank computes in the layer: the selection (score,
max-pool, top-k, gather) of its blocks, the query rows' partial attention over its keys,
the anchor rows, its two blocks' causal attention, their attention to the exchanged prefix,
the LSE merges and the query merge, plus those local copies (a few MB). Not in it: the
all-gathers' transfers and any wait for other ranks, the QKV / output projections and the
MLP (core attention only), RoPE. The data in the exchanged slots is this rank's own, which
changes no shape or cost. Each rank's time is reported; the layer waits for the slowest.

Clocks, as tools/bench_selection.py: idle (events around one call from an idle GPU) and gpu
(the call queued behind `torch.cuda._sleep`, so the host has queued it before the GPU starts:
the GPU's own time). "selection ms" is the layer's own `profiling.region("selection")`
inside the gpu-clock calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from megatron_spava.perf.kernels import time_ms

from megatron_spava import SpavaConfig, SpavaLayout, profiling, spava_attn_func
from megatron_spava.distributed import EmulatedGroup


def gpu_time_ms(fn, repeats, warmup, sleep_cycles):
    """(median ms of fn on the GPU alone, median ms of its "selection" region): each call
    queued behind torch.cuda._sleep(sleep_cycles); events around fn only."""
    for _ in range(warmup):
        fn()
    times, sel = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        profiling.start()
        start.record()
        fn()
        end.record()
        end.synchronize()
        regions = profiling.stop()
        times.append(start.elapsed_time(end))
        sel.append(regions.get("selection", 0.0) * 1e3)
    return statistics.median(times), statistics.median(sel)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total", type=int, nargs="+", default=[131072, 262144], help="context + query tokens")
    p.add_argument("--query-len", type=int, nargs="+", default=[512, 64])
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--selection", nargs="+", default=["lse", "mean"])
    p.add_argument("--ranks", type=int, nargs="*", help="default: every rank")
    p.add_argument("--q-heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sleep-ms", type=float, default=30.0, help="GPU busy time queued before each gpu-clock call")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_spava_rank: needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hk, d = args.q_heads, args.kv_heads, args.head_dim
    sleep_cycles = int(args.sleep_ms * 1.98e6)  # about sleep_ms at an H100 / H200's max SM clock
    name = torch.cuda.get_device_name()
    print(f"{name}, bf16, hq={hq} hk={hk} d={d}, CP {args.cp}: one rank's core attention per layer "
          f"(no communication: local stand-ins)", flush=True)
    rows = []
    for total in args.total:
        for lq in args.query_len:
            for sel in args.selection:
                layout = SpavaLayout.plan(context_len=total - lq, query_len=lq, cp_size=args.cp,
                                          config=SpavaConfig(selection=sel))
                for rank in (args.ranks if args.ranks else range(args.cp)):
                    s = layout.local_len(rank)
                    g = torch.Generator(device=dev).manual_seed(rank)
                    q = torch.randn(s, 1, hq, d, device=dev, dtype=dt, generator=g)
                    k = torch.randn(s, 1, hk, d, device=dev, dtype=dt, generator=g)
                    v = torch.randn(s, 1, hk, d, device=dev, dtype=dt, generator=g)
                    group = EmulatedGroup(rank, args.cp)
                    fn = lambda: spava_attn_func(q, k, v, layout=layout, cp_group=group)  # noqa: E731
                    idle = time_ms(fn, args.repeats, args.warmup)[0]
                    gpu, sel_ms = gpu_time_ms(fn, args.repeats, 0, sleep_cycles)
                    row = dict(total=total, query_len=lq, selection=sel, rank=rank, local_len=s,
                               anchor_len=layout.anchor_len, block_len=layout.block_len,
                               passing_len=layout.passing_len, idle_ms=idle, gpu_ms=gpu, selection_gpu_ms=sel_ms)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del q, k, v
    print(f"\n{name}, bf16, hq={hq} hk={hk} d={d}, CP {args.cp}, default budgets; medians of {args.repeats}; "
          "one rank's core attention per layer, no communication")
    print("| total | query | rank | local tokens | selection | idle ms | gpu ms | selection (gpu) ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['total']} | {r['query_len']} | {r['rank']} | {r['local_len']} | {r['selection']} | "
              f"{r['idle_ms']:.2f} | {r['gpu_ms']:.2f} | {r['selection_gpu_ms']:.3f} |")
    print("\nSlowest rank, lse against mean")
    print("| total | query | mean idle ms | lse idle ms | lse / mean | mean gpu ms | lse gpu ms | lse / mean | "
          "lse - mean gpu ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for total in args.total:
        for lq in args.query_len:
            worst = {}
            for sel in ("mean", "lse"):
                mine = [r for r in rows if r["total"] == total and r["query_len"] == lq and r["selection"] == sel]
                if mine:
                    worst[sel] = (max(r["idle_ms"] for r in mine), max(r["gpu_ms"] for r in mine))
            if len(worst) == 2:
                (mi, mg), (li, lg) = worst["mean"], worst["lse"]
                print(f"| {total} | {lq} | {mi:.2f} | {li:.2f} | {li / mi:.3f} | {mg:.2f} | {lg:.2f} | {lg / mg:.3f} | "
                      f"{lg - mg:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
