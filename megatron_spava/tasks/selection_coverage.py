"""Which needle tokens Spava's passing selection keeps, per decoder layer, block and KV head,
the measured recall, and the accuracy, under any selection score of the table
(megatron_spava.algos.spava.selection.SCORERS) or an oracle that puts every needle token into its
block's passing block first.

    python tools/selection_coverage.py                                   # shipped model, lse, 4K, CP 2
    python tools/selection_coverage.py --spava-selection mean --tasks ordering counting --samples 8
    python tools/selection_coverage.py --oracle --tasks ordering

For every sample (the needle eval sets of megatron_spava/tasks, seed --seed) it runs Spava
(the --spava-* options, default budgets) on --cp CPU ranks (gloo) and subscribes to the
selection hook (`algos.spava.selection.record_selection`): at every layer and every selected block
that holds needle tokens, it records the fraction of those tokens that each score of the
table would have kept (`coverage`, per KV head, with the run's pool width and budget), the
fraction the run kept (`kept`), and which needles they belong to (`needles`: per needle,
its fraction kept, mean over KV heads). It also reports the measured recall per layer
(`algos.spava.selection.measure_recall`). A block of l tokens keeping p of them keeps p / l of any
tokens at random (printed beside it).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


import torch


def rules() -> tuple:
    """The scores whose coverage is measured: every entry of the table (but this tool's oracle)."""
    from megatron_spava.algos.spava.selection import SCORERS
    return tuple(name for name in SCORERS if name != "oracle")


def build_parser() -> argparse.ArgumentParser:
    from megatron_spava.arguments import add_spava_args
    from megatron_spava.tasks import TASKS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="needle checkpoint (default: the shipped model)")
    p.add_argument("--oracle", action="store_true",
                   help="needle tokens first, then the --spava-selection score")
    p.add_argument("--tokens", type=int, default=4096, help="video tokens (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=["ordering", "counting"], choices=TASKS)
    p.add_argument("--samples", type=int, default=8, help="per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="eval-set seed (default: %(default)s)")
    p.add_argument("--cp", type=int, default=2, help="CPU ranks = CP size (default: %(default)s)")
    p.add_argument("--json", help="write every sample's answer and coverage records here")
    add_spava_args(p, algorithm=False)
    return p


def coverage(records: list) -> dict:
    """{(rule, layer or 'all'): [coverage per head and block]} from coverage records."""
    out = collections.defaultdict(list)
    for r in records:
        for rule, per_head in {**r["coverage"], "kept": r["kept"]}.items():
            out[(rule, r["layer"])].extend(per_head)
            out[(rule, "all")].extend(per_head)
    return out


def _block_record(event: dict, needles: dict, config) -> dict:
    """Coverage of the needle tokens inside the event's block, or None if there are none.
    needles: token position -> needle number (order in the video)."""
    from megatron_spava.algos.spava import selection
    g0, g1 = event["block_range"]
    inside = sorted(t for t in needles if g0 <= t < g1)
    if not inside:
        return None
    pos = torch.tensor([t - g0 for t in inside], dtype=torch.long)
    keys, probes, budget = event["keys"], event["probes"], event["indices"].shape[-1]
    hk = keys.shape[2]

    def kept_of(index):  # [hk, n]: is each needle token among the kept, per head
        return torch.stack([torch.isin(pos, index[0, h]) for h in range(hk)]).float()

    cover = {rule: kept_of(selection.selection_scores(keys, probes, config.pool_kernel, event["scale"], rule)
                           .topk(budget, -1).indices).mean(1).tolist()
             for rule in rules()}
    kept = kept_of(event["indices"])  # what the run kept
    ids = torch.tensor([needles[t] for t in inside])
    return {"layer": event["layer"], "vblock": event["block"], "needle_tokens": len(inside),
            "block_len": g1 - g0, "budget": budget, "coverage": cover, "kept": kept.mean(1).tolist(),
            "needles": {int(n): float(kept[:, ids == n].mean()) for n in ids.unique()}}


def run_rank(args: dict) -> dict:
    """On one CP rank: every sample under Spava with the chosen selection. Returns answers,
    coverage records and the measured recall per sample."""
    import torch.distributed as dist

    from megatron_spava import cpu_compat
    from megatron_spava.arguments import spava_config_from_args
    from megatron_spava.inference.generate import generate
    from megatron_spava.launch import model_parallel_state
    from megatron_spava.algos.spava import selection
    from megatron_spava.tasks import eval_set, render_frames
    from megatron_spava.tasks.evaluate import _build_model
    from megatron_spava.tasks.model import ASSET_DIR, needle_prompter

    cpu_compat.apply()
    ns = argparse.Namespace(**args)
    config = spava_config_from_args(ns)
    ckpt = args["checkpoint"] or ASSET_DIR
    prompter = needle_prompter(ckpt)  # the checkpoint's family's (config.json model_type)
    rank = dist.get_rank()
    state = {"needles": {}, "order": [], "call": 0}
    if args["oracle"]:  # needle tokens first: a score that knows the block from the call order
        base = selection.get_scorer(config.selection)

        def oracle(k_block, probes, scale):
            scores = base(k_block, probes, scale).clone()
            g0, g1 = state["order"][state["call"] % len(state["order"])]
            state["call"] += 1
            state["scored"][(g0, g1)] += 1
            inside = [t - g0 for t in state["needles"] if g0 <= t < g1]
            if inside:
                scores[:, :, inside] = float("inf")
            return scores
        selection.register_scorer("oracle", oracle)
        config = config.replace(selection="oracle")
    group = model_parallel_state(1, args["cp"]).get_context_parallel_group()
    model = _build_model(ckpt, args["cp"], torch.device("cpu"), torch.float32)
    out = []
    for s in eval_set(args["tasks"], args["tokens"], args["samples"], seed=args["seed"]):
        state["needles"] = {prompter.group_token(g) + i: n for n, (g, _) in enumerate(s.needles)
                            for i in range(prompter.tokens_per_group)}
        inputs = prompter.inputs(s, render_frames(s))
        records = []

        def on(event):
            if event["kind"] != "block":
                return
            if args["oracle"]:  # the oracle's guess of the block must be the one reported
                # every block reported was scored by the oracle as that block (its score calls
                # may run ahead of the reports: a rank's blocks are scored, then reported)
                block = tuple(event["block_range"])
                state["reported"][block] += 1
                assert state["reported"][block] <= state["scored"][block], (block, state["scored"])
            rec = _block_record(event, state["needles"], config)
            if rec is not None:
                records.append(rec)
        state["order"] = _selected_blocks(model, inputs, args["cp"], config, rank)
        state["call"], state["scored"], state["reported"] = 0, collections.Counter(), collections.Counter()
        with selection.measure_recall() as recall, selection.subscribe(on):
            g = generate(model, inputs, algo="spava", config=config, cp_group=group,
                         device=torch.device("cpu"), max_new_tokens=10, group=group)
        pred = prompter.decode(g.tokens).strip()
        out.append({"task": s.task, "index": s.index, "answer": s.answer, "prediction": pred,
                    "right": pred == s.answer, "needle_frames": [g for g, _ in s.needles],
                    "where": _where(s, g.layout, prompter), "records": records,
                    "recall": {str(k): v for k, v in recall.items()}})
    return {"samples": out}


def _where(s, layout, prompter):
    from megatron_spava.tasks.needles import needle_blocks
    return needle_blocks(s, layout, prompter.group_token)


def _selected_blocks(model, inputs, cp, config, rank):
    """The [lo, hi) of the blocks this rank selects, in the order spava_attn_func selects
    them (its blocks in local order, without the last block)."""
    from megatron_spava.algos import plan_layout
    ids = inputs.input_ids
    lq = model.query_length(ids)
    layout = plan_layout("spava", context_len=ids.shape[1] - lq, query_len=lq, cp_size=cp, config=config)
    return [layout.block_range(v) for v in layout.blocks_of(rank) if v != layout.num_blocks - 1]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_spava.tasks import selection_coverage  # run_rank by its module's name (not __main__'s)
    from megatron_spava.testing import run_ranks
    results = run_ranks(selection_coverage.run_rank, args.cp, vars(args), timeout=3600)
    recs = [r for res in results for s in res["samples"] for r in s["records"]]
    merged = coverage(recs)
    samples = results[0]["samples"]
    label = ("oracle+" if args.oracle else "") + args.spava_selection
    for s in samples:
        print(f"{s['task']:9s} {'right' if s['right'] else 'WRONG':5s} answer {s['answer']!r:30s} "
              f"spava ({label}) {s['prediction']!r}")
    layers = sorted({k[1] for k in merged if k[1] != "all"})
    chance = sum(r["budget"] / r["block_len"] for r in recs) / max(1, len(recs))
    print(f"\nneedle tokens kept by each score at this run's pool width and budget (mean over KV heads, "
          f"blocks, samples; chance {chance:.2f}); 'kept': what this run kept:")
    print("| score | " + " | ".join(f"layer {l}" for l in layers) + " | all |")
    print("|---|" + "---|" * (len(layers) + 1))
    for rule in (*rules(), "kept"):
        cells = [merged[(rule, l)] for l in layers] + [merged[(rule, "all")]]
        print(f"| {rule} | " + " | ".join(f"{sum(c) / len(c):.2f}" if c else "-" for c in cells) + " |")
    totals = collections.defaultdict(lambda: [0.0, 0])
    for res in results:
        for s in res["samples"]:
            for layer, (t, c) in s["recall"].items():
                totals[layer][0] += t
                totals[layer][1] += c
    print("\nmeasured recall (share of the question's attention mass on a block kept), per layer: "
          + ", ".join(f"layer {l} {t / c:.3f}" for l, (t, c) in sorted(totals.items(), key=lambda kv: int(kv[0]))
                      if c))
    print()
    for task in args.tasks:
        mine = [s for s in samples if s["task"] == task]
        print(f"{task}: {sum(s['right'] for s in mine)}/{len(mine)} right with {label}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ranks": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
