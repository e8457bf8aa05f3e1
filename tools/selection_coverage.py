#!/usr/bin/env python3
"""Which needle tokens Spava's passing selection keeps, per decoder layer, and the accuracy
when the selection is SPAVA.md's mean probe, the log-sum-exp score (SpavaConfig.mean_probe
off) or an oracle that puts every needle token into its block's passing block first.

    python tools/selection_coverage.py                       # shipped model, 4K, CP 2, CPU
    python tools/selection_coverage.py --select oracle --tasks ordering counting --samples 8

For every sample (the needle eval sets of megatron_spava/tasks, seed --seed) it runs Spava
at the default budgets on --cp CPU ranks (gloo) with the chosen selection, and at every
layer and every block that holds needle tokens (except the last block, whose passing block
nobody reads) it records the fraction of those tokens each score would have kept, per KV
head: `mean` (SPAVA.md section 2 steps 1-2), `mean-unpooled` (the same without the
max-pool) and `lse`. Coverage is averaged over heads, blocks and samples; a block of l
tokens keeping p of them keeps p / l of any tokens at random (printed beside it).

It reads the block and query positions from `spava_attn_func`'s frame (its locals
`layout`, `vblock`, `q`, `q_lo`, `q_hi`, `scale`): a diagnostic, tied to that function; it
says so and stops if those names change.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

RULES = ("mean", "mean-unpooled", "lse")
_FRAME_NAMES = ("layout", "vblock", "q", "q_lo", "q_hi", "scale")


def build_parser() -> argparse.ArgumentParser:
    from megatron_spava.tasks import TASKS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="needle checkpoint (default: the shipped model)")
    p.add_argument("--select", choices=("mean", "lse", "oracle"), default="mean",
                   help="the selection the run uses: mean (SPAVA.md), lse (--spava-no-mean-probe), "
                        "oracle (needle tokens first, then the mean score) (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=4096, help="video tokens (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=["ordering", "counting"], choices=TASKS)
    p.add_argument("--samples", type=int, default=8, help="per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="eval-set seed (default: %(default)s)")
    p.add_argument("--cp", type=int, default=2, help="CPU ranks = CP size (default: %(default)s)")
    p.add_argument("--json", help="write every sample's answer and coverage records here")
    return p


def _frame_locals() -> dict:
    frame = inspect.currentframe().f_back.f_back  # the caller of select_passing
    names = frame.f_locals
    missing = [n for n in _FRAME_NAMES if n not in names]
    if frame.f_code.co_name != "spava_attn_func" or missing:
        raise RuntimeError(f"selection_coverage: select_passing was called from {frame.f_code.co_name} "
                           f"without {missing}; this diagnostic follows spava_attn_func's local names")
    return names


def coverage(rank_records: list, calls_per_layer: int) -> dict:
    """{(rule, layer or 'all'): [coverage per head and block]} from one rank's records."""
    out = collections.defaultdict(list)
    for r in rank_records:
        for rule, per_head in r["coverage"].items():
            out[(rule, r["call"] // calls_per_layer)].extend(per_head)
            out[(rule, "all")].extend(per_head)
    return out


def run_rank(args: dict) -> dict:
    """On one CP rank: every sample under Spava with the chosen selection. Returns answers,
    coverage records and this rank's selection calls per layer."""
    import torch.distributed as dist

    from megatron_spava import SpavaConfig, core_attention, cpu_compat
    from megatron_spava.inference.generate import generate
    from megatron_spava.launch import model_parallel_state
    from megatron_spava.ops import selection
    from megatron_spava.tasks import eval_set, render_frames
    from megatron_spava.tasks.evaluate import _build_model
    from megatron_spava.tasks.model import ASSET_DIR, NeedlePrompter

    cpu_compat.apply()
    ckpt = args["checkpoint"] or ASSET_DIR
    prompter = NeedlePrompter(ckpt)
    needles: set = set()
    records: list = []
    calls = [0]

    def select(k_block, v_block, probe, budget, pool_kernel, scale=None):
        f = _frame_locals()
        layout, q = f["layout"], f["q"]
        g0, g1 = layout.block_range(f["vblock"])
        inside = torch.tensor(sorted(t - g0 for t in needles if g0 <= t < g1), dtype=torch.long)
        queries, hk = q[f["q_lo"]:f["q_hi"]], k_block.shape[2]
        mean_probe = selection.query_probe(queries, hk)
        scores = {
            "mean": selection.selection_scores(k_block, mean_probe, pool_kernel),
            "mean-unpooled": selection.selection_scores(k_block, mean_probe, 1),
            "lse": selection.selection_scores(k_block, selection.query_probe(queries, hk, mean=False),
                                              pool_kernel, f["scale"]),
        }
        used = scores["lse" if args["select"] == "lse" else "mean"].clone()
        if args["select"] == "oracle" and len(inside):
            used[:, :, inside] = float("inf")
        if len(inside):
            records.append({"vblock": f["vblock"], "call": calls[0], "needle_tokens": len(inside),
                            "block_len": g1 - g0, "budget": budget,
                            "coverage": {r: [float(torch.isin(inside, s.topk(budget, -1).indices[0, h]).float().mean())
                                             for h in range(hk)] for r, s in scores.items()}})
        calls[0] += 1
        return selection.gather_top(k_block, v_block, used, budget)

    core_attention.select_passing = select
    group = model_parallel_state(1, args["cp"]).get_context_parallel_group()
    model = _build_model(ckpt, args["cp"], torch.device("cpu"), torch.float32)
    config = SpavaConfig()
    out = []
    for s in eval_set(args["tasks"], args["tokens"], args["samples"], seed=args["seed"]):
        needles = {prompter.prefix_len + g * (s.size // 28) ** 2 + i
                   for g, _ in s.needles for i in range((s.size // 28) ** 2)}
        records, calls[0] = [], 0
        g = generate(model, prompter.inputs(s, render_frames(s)), algo="spava", config=config,
                     cp_group=group, device=torch.device("cpu"), max_new_tokens=10, group=group)
        pred = prompter.decode(g.tokens).strip()
        out.append({"task": s.task, "index": s.index, "answer": s.answer, "prediction": pred,
                    "right": pred == s.answer, "records": records})
    from megatron_spava.algos.spava import SpavaLayout
    rank = dist.get_rank()
    layout = SpavaLayout.plan(context_len=1 << 20, query_len=1, cp_size=args["cp"], config=config)
    per_layer = sum(1 for v in layout.blocks_of(rank) if v != layout.num_blocks - 1)
    return {"samples": out, "calls_per_layer": per_layer}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import selection_coverage

    from megatron_spava.testing import run_ranks
    results = run_ranks(selection_coverage.run_rank, args.cp, vars(args), timeout=3600)
    merged = collections.defaultdict(list)
    for res in results:
        for key, values in coverage([r for s in res["samples"] for r in s["records"]],
                                    res["calls_per_layer"]).items():
            merged[key].extend(values)
    samples = results[0]["samples"]
    for s in samples:
        print(f"{s['task']:9s} {'right' if s['right'] else 'WRONG':5s} answer {s['answer']!r:30s} "
              f"spava ({args.select}) {s['prediction']!r}")
    layers = sorted({k[1] for k in merged if k[1] != "all"})
    recs = [r for res in results for s in res["samples"] for r in s["records"]]
    chance = sum(r["budget"] / r["block_len"] for r in recs) / max(1, len(recs))
    print(f"\nneedle tokens kept by each score (mean over KV heads, blocks, samples; "
          f"chance {chance:.2f}):")
    print("| score | " + " | ".join(f"layer {l}" for l in layers) + " | all |")
    print("|---|" + "---|" * (len(layers) + 1))
    for rule in RULES:
        cells = [merged[(rule, l)] for l in layers] + [merged[(rule, "all")]]
        print(f"| {rule} | " + " | ".join(f"{sum(c) / len(c):.2f}" if c else "-" for c in cells) + " |")
    print()
    for task in args.tasks:
        mine = [s for s in samples if s["task"] == task]
        print(f"{task}: {sum(s['right'] for s in mine)}/{len(mine)} right with --select {args.select}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ranks": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
