"""Time the passing-block selection of one block on one CUDA GPU: SPAVA.md's mean probe
against the log-sum-exp score (SpavaConfig.mean_probe off), beside the block's own causal
attention (the work the selection sits next to).

    python tools/bench_selection.py --block-len 16384 32768 65536 --query-len 64

Shapes default to Qwen2.5-VL-7B's language model (28 query heads, 4 KV heads, head_dim 128,
bf16); the budget is SPAVA.md's default for a context of 2 * CP * block tokens at CP = 4.
Medians of --repeats runs (CUDA events).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_ms  # noqa: E402

from megatron_spava.algos.spava import SpavaLayout  # noqa: E402
from megatron_spava.ops.attention import attend  # noqa: E402
from megatron_spava.ops.selection import query_probe, select_passing  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block-len", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--query-len", type=int, default=64, help="query tokens (default: %(default)s)")
    p.add_argument("--q-heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cp", type=int, default=4, help="for the default budget (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_selection: needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hk, d = args.q_heads, args.kv_heads, args.head_dim
    rows = []
    print(f"{torch.cuda.get_device_name()}, bf16, hq={hq} hk={hk} d={d}, query {args.query_len} tokens")
    print("| block tokens | budget | mean probe ms | log-sum-exp ms | ratio | block causal attention ms |")
    print("|---|---|---|---|---|---|")
    for l in args.block_len:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(l, 1, hk, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(l, 1, hk, d, device=dev, dtype=dt, generator=g)
        q = torch.randn(l, 1, hq, d, device=dev, dtype=dt, generator=g)
        qq = torch.randn(args.query_len, 1, hq, d, device=dev, dtype=dt, generator=g)
        # SPAVA.md's default budget for the context whose 2 * CP blocks are this long
        budget = SpavaLayout.plan(context_len=2 * args.cp * l, query_len=args.query_len,
                                  cp_size=args.cp).passing_len
        times = {}
        for name, mean, scale in (("mean", True, None), ("lse", False, d ** -0.5)):
            times[name] = time_ms(lambda: select_passing(k, v, query_probe(qq, hk, mean=mean), budget, 5, scale),
                                  args.repeats, args.warmup)[0]
        attn = time_ms(lambda: attend(q, k, v, causal=True), args.repeats, args.warmup)[0]
        rows.append(dict(block_len=l, budget=budget, mean_ms=times["mean"], lse_ms=times["lse"], attention_ms=attn))
        print(f"| {l} | {budget} | {times['mean']:.3f} | {times['lse']:.3f} | {times['lse'] / times['mean']:.2f} | {attn:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
