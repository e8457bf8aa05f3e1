#!/usr/bin/env python3
"""Measured recall of every selection score on random inputs: no trained model needed.

    python tools/selection_recall.py                         # 8K tokens, CP 2, 4x2 heads
    python tools/selection_recall.py --tokens 32768 --cp 4 --planted 16 --json recall.json

Draws q, k, v (Gaussian, seeded), plants --planted keys per block that one query token of
one head wants (k[t, h] += --strength * that query / |query|: a needle only a few query rows
attend to), runs Spava's attention on --cp CPU ranks (gloo) once per selection score of the
table (megatron_spava.algos.spava.selection.SCORERS), and reports the measured recall
(`algos.spava.selection.measure_recall`): per selected block and KV head, the share of the
question's exact attention mass on the block that the kept keys carry, averaged. Beside it,
a random pick's expected share (budget / block length) and the fraction of planted keys kept.
"""

from __future__ import annotations

import argparse
import json
import sys


import torch


def build_parser() -> argparse.ArgumentParser:
    from megatron_spava.arguments import add_spava_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="context tokens (default: %(default)s)")
    p.add_argument("--query-len", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--cp", type=int, default=2, help="CPU ranks = CP size (default: %(default)s)")
    p.add_argument("--q-heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--planted", type=int, default=8, help="planted keys per block (default: %(default)s)")
    p.add_argument("--strength", type=float, default=12.0,
                   help="a planted key's logit against its query, in units of 1 (default: %(default)s)")
    p.add_argument("--selections", nargs="+", default=None, help="scores to measure (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    add_spava_args(p, algorithm=False)
    return p


def inputs(args: dict, layout):
    """q, k, v [S, 1, h, d] and the planted key positions {(t, kv head)}."""
    from megatron_spava.testing.reference import random_qkv
    n, lq, hq, hk, d = args["tokens"], args["query_len"], args["q_heads"], args["kv_heads"], args["head_dim"]
    q, k, v = random_qkv(n + lq, 1, hq, hk, d, seed=args["seed"])
    gen = torch.Generator().manual_seed(args["seed"] + 1)
    planted = set()
    group = hq // hk
    for u in range(layout.num_blocks):
        lo, hi = layout.block_range(u)
        for _ in range(args["planted"]):
            t = int(torch.randint(lo, hi, (1,), generator=gen))
            j = int(torch.randint(n, n + lq, (1,), generator=gen))
            head = int(torch.randint(0, hq, (1,), generator=gen))
            want = q[j, 0, head]
            k[t, 0, head // group] += args["strength"] * want / want.norm() * d ** 0.5 / want.norm()
            planted.add((t, head // group))
    return q, k, v, planted


def run_rank(args: dict, score: str) -> dict:
    import torch.distributed as dist

    from megatron_spava import SpavaLayout, spava_attn_func
    from megatron_spava.arguments import spava_config_from_args
    from megatron_spava.algos.spava import selection
    rank, world = dist.get_rank(), dist.get_world_size()
    config = spava_config_from_args(argparse.Namespace(**args)).replace(selection=score)
    layout = SpavaLayout.plan(context_len=args["tokens"], query_len=args["query_len"], cp_size=world,
                              config=config)
    q, k, v, planted = inputs(args, layout)
    idx = layout.local_indices(rank)
    with selection.measure_recall() as recall, selection.record_selection() as events:
        spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    kept = total = 0
    chance = []
    for e in events:
        if e["kind"] != "block":
            continue
        lo, hi = e["block_range"]
        chance.append(e["indices"].shape[-1] / (hi - lo))
        for h in range(k.shape[2]):
            mine = {t for t, hh in planted if hh == h and lo <= t < hi}
            total += len(mine)
            kept += len(mine & {lo + i for i in e["indices"][0, h].tolist()})
    (s, c), = recall.values()
    return dict(sum=s, count=c, planted_kept=kept, planted=total, chance=chance,
                budget=layout.passing_len, block_len=layout.block_len)


def measure(args: dict) -> list:
    """One row per selection score: recall, chance, planted keys kept."""
    from megatron_spava.algos.spava.selection import SCORERS
    from megatron_spava.testing import run_ranks
    import selection_recall
    rows = []
    for score in args["selections"] or list(SCORERS):
        parts = run_ranks(selection_recall.run_rank, args["cp"], args, score, timeout=1800)
        s, c = sum(p["sum"] for p in parts), sum(p["count"] for p in parts)
        chance = [x for p in parts for x in p["chance"]]
        planted = sum(p["planted"] for p in parts)
        rows.append(dict(selection=score, recall=s / c, chance=sum(chance) / len(chance),
                         planted_kept=sum(p["planted_kept"] for p in parts) / max(1, planted),
                         budget=parts[0]["budget"], block_len=parts[0]["block_len"]))
    return rows


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    rows = measure(args)
    print(f"{args['tokens']} context tokens, {args['query_len']}-token query, CP {args['cp']}, "
          f"hq={args['q_heads']} hk={args['kv_heads']} d={args['head_dim']}, {args['planted']} planted keys "
          f"per block, budget {rows[0]['budget']} of {rows[0]['block_len']}-token blocks")
    print("| selection | measured recall | random pick | planted keys kept |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['selection']} | {r['recall']:.3f} | {r['chance']:.3f} | {r['planted_kept']:.2f} |")
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(dict(args=args, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
