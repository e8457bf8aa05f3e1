"""Correctness of TP x CP grids against TP=1 x CP=1: prefill + greedy decode of one synthetic
video prompt (tools/bench_prefill.py's) under every (grid, algorithm), first-token logits
and answer tokens compared with exact attention on one rank.

    python tools/tp_cp_check.py --nproc 4                                  # CPU, tiny shape, gloo
    torchrun --standalone --nproc-per-node 4 tools/tp_cp_check.py --device cuda --bf16 \\
        --shape 3b --tokens 16384 --transformer-impl transformer_engine \\
        --grids 1x1 2x2 1x4 4x1 --algos spava ring megatron-p2p megatron-a2a --json tpcp.json

Every model is built with the same seed and megatron-core's CPU initialisation (the full
weight is drawn, then each TP rank keeps its slice), so every grid holds the same weights.
Algorithms: spava at full budget (passing_len = the whole block: SPAVA.md section 3's
exactness invariant), ring, megatron-<cp-comm-type> (Transformer Engine's CP attention; needs
TE on CUDA). The reference is `full` at 1x1; with --bf16 a float32 1x1 run also measures the
bf16 noise (the reference's own error), and a run passes when its first-token relative error
is within --noise-factor x that noise (float32: within --tolerance) and its tokens equal the
reference's. Grids smaller than the world run as data-parallel replicas of the same prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist



def _bench_prefill():
    """The prefill benchmark (megatron_spava.perf.bench_prefill): its model builder and variant names."""
    from megatron_spava.perf import bench_prefill
    return bench_prefill


def _grid(text: str):
    try:
        tp, cp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid is TPxCP, e.g. 2x2; got {text!r}")
    if tp < 1 or cp < 1:
        raise argparse.ArgumentTypeError(f"grid sizes must be >= 1, got {text!r}")
    return tp, cp


def parse_args(argv=None):
    bp = _bench_prefill()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(bp.SHAPES), default="tiny", help="(default: %(default)s)")
    from megatron_spava.models.registry import names
    p.add_argument("--model", choices=["auto", *names()], default="auto",
                   help="model family (default: the shape's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights and activations (default: float32)")
    p.add_argument("--tokens", type=int, default=1200, help="prompt length n (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded (default: %(default)s)")
    p.add_argument("--grids", type=_grid, nargs="+", default=[(1, 2), (2, 1), (2, 2), (1, 4)],
                   metavar="TPxCP", help="grids to check (default: 1x2 2x1 2x2 1x4; the tiny shape's "
                                         "2 vision heads rule out TP=4)")
    p.add_argument("--algos", nargs="+", default=["spava", "ring"],
                   help="spava (at full budget), ring, megatron-<cp-comm-type> (default: spava ring)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="float32: largest first-token relative error (default: %(default)s)")
    p.add_argument("--noise-factor", type=float, default=2.0,
                   help="bf16: largest error as a multiple of the bf16 reference's own (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to launch when not under torchrun (default: the largest grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    from megatron_spava.launch import add_distributed_timeout_arg
    add_distributed_timeout_arg(p)
    from megatron_spava.specs import add_transformer_impl_arg
    add_transformer_impl_arg(p)
    args = p.parse_args(argv)
    from megatron_spava.algos.registry import options
    for a in args.algos:
        if a not in ("spava", "ring") and not bp.variant_option(a):
            p.error(f"--algos: {a!r} is not spava, ring" + "".join(
                f" or {name}-<{'|'.join(opts)}>" for name, opts in options().items()))
    from megatron_spava.launch import distributed_timeout
    try:
        distributed_timeout(args)
    except ValueError as err:
        p.error(str(err))
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    cfg = bp.model_config(args.shape, args.model)
    for tp, cp in args.grids:  # before any rank starts: one message, not one per rank
        try:
            cfg.validate(tp)
        except ValueError as err:
            p.error(f"--grids {tp}x{cp}: {err}")
    if any(bp.variant_option(a) for a in args.algos):  # their own (TE) core attention
        from megatron_spava.specs import te_available
        if not te_available() or args.device != "cuda":
            p.error("megatron-<cp-comm-type> is Transformer Engine's attention: it needs TE on CUDA (--device cuda)")
    return args


def _config(algo: str, n: int):
    """The SpavaConfig of a checked algorithm: spava at full budget, the defaults otherwise."""
    from megatron_spava.config import SpavaConfig
    from megatron_spava.config import round_up
    return SpavaConfig(passing_len=round_up(n, 128)) if algo == "spava" else SpavaConfig()


def _runs(args, tp: int, cp: int, algos, dtype_bf16: bool, inputs_for):
    """The algorithms `algos` on one TP x CP grid, sharing one model (so: all of them attention
    functions, or one megatron-<comm>): {algo: (tokens, first-token logits float32 [vocab])}."""
    from megatron_spava.inference.generate import generate
    bp = _bench_prefill()
    module = algos[0] if bp.variant_option(algos[0]) else None  # an <algo>-<option>: its own core attention
    device = args.device_obj
    model, ps = bp.build(args.shape, cp, args.seed, device, tp, args.impl, args.model, variant=module,
                         cpu_init=True, bf16=dtype_bf16)
    inputs = inputs_for(model.cfg)
    out = {}
    for algo in algos:
        name = bp.algo_and_config(algo)[0] if module else algo
        gen = generate(model, inputs, algo=name, config=_config(name, args.tokens),
                       cp_group=ps.get_context_parallel_group(), max_new_tokens=args.new_tokens,
                       eos_token_ids=[], device=device, group=ps.get_tensor_and_context_parallel_group())
        out[algo] = (list(gen.tokens), gen.first_logits.float().cpu())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _model_groups(algos):
    """Algorithms that can share a model: the attention functions together, each
    <algo>-<option> (megatron-<comm>) alone."""
    bp = _bench_prefill()
    ours = [a for a in algos if not bp.variant_option(a)]
    return ([ours] if ours else []) + [[a] for a in algos if bp.variant_option(a)]


def main(argv=None):
    args = parse_args(argv)
    from megatron_spava.launch import RankError, relaunch, report_rank_errors, under_torchrun
    if not under_torchrun():  # launch the ranks: torchrun on this script
        try:
            relaunch("megatron_spava.perf.tp_cp_check", args.nproc or max(tp * cp for tp, cp in args.grids), argv,
                     verbose=False)
        except RankError as err:  # the first rank's error, in one line
            print(f"tp_cp_check: {err}", file=sys.stderr)
            return 1
        return 0
    with report_rank_errors():
        _check(args)
    return 0


class Disagreement(ValueError):
    """Some (grid, algorithm) runs do not agree with TP=1 x CP=1 (raised on every rank)."""


def _check(args) -> None:
    """On every rank: run the grids, print the table (rank 0), write --json; raises
    Disagreement when a run is off."""
    from megatron_spava.launch import distributed_timeout, init_distributed
    from megatron_spava.specs import resolve_transformer_impl
    args.device_obj = init_distributed(args.device, timeout=distributed_timeout(args))
    args.impl = resolve_transformer_impl(args.transformer_impl, args.device_obj)
    world, rank = dist.get_world_size(), dist.get_rank()
    bad = [f"{tp}x{cp}" for tp, cp in args.grids if world % (tp * cp)]
    if bad:
        raise ValueError(f"grids {', '.join(bad)} do not divide the {world} ranks")
    from megatron_spava.perf.inputs import synthetic_inputs
    bp = _bench_prefill()
    cp_max = max(cp for _, cp in args.grids)
    from megatron_spava.algos.registry import prompt_multiple
    m = prompt_multiple(args.algos)  # Megatron's CP: TE cuts the prompt into 2 x CP chunks, every grid
    multiple = m * cp_max if m > 1 else 1
    inputs_for = lambda cfg: synthetic_inputs(cfg, args.tokens, args.seed, multiple)  # noqa: E731
    t0 = time.time()
    ref_tokens, ref = _runs(args, 1, 1, ["full"], args.bf16, inputs_for)["full"]
    noise = None
    if args.bf16:
        _, ref32 = _runs(args, 1, 1, ["full"], False, inputs_for)["full"]
        noise = float((ref - ref32).norm() / ref32.norm())
        ref_for_err = ref32
    else:
        ref_for_err = ref
    bound = args.noise_factor * noise if noise is not None else args.tolerance
    rows = []
    for tp, cp in args.grids:
        results = {}
        for algos in _model_groups(args.algos):
            results.update(_runs(args, tp, cp, algos, args.bf16, inputs_for))
        for algo in args.algos:
            tokens, logits = results[algo]
            err = float((logits - ref_for_err).norm() / ref_for_err.norm())
            same = tokens == ref_tokens
            rows.append(dict(tp=tp, cp=cp, algo=algo, rel_err=err, same_tokens=same,
                             first_diff=next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None),
                             ok=same and err <= bound))
            if rank == 0:
                print(f"TP={tp} x CP={cp} {algo:<20} first-token rel. error {err:.2e} "
                      f"(bound {bound:.2e})  tokens {'same' if same else 'DIFFER'}  "
                      f"{'ok' if rows[-1]['ok'] else 'FAIL'}", flush=True)
    result = dict(shape=args.shape, model=bp.family_of(args.shape, args.model), device=args.device,
                  dtype="bfloat16" if args.bf16 else "float32", transformer_impl=args.impl, world=world,
                  prompt_tokens=int(inputs_for(bp.model_config(args.shape, args.model)).input_ids.shape[1]),
                  new_tokens=args.new_tokens, bf16_noise=noise, bound=bound, reference_tokens=ref_tokens,
                  rows=rows, wall_s=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if rank == 0:
        from megatron_spava.provenance import git_commit
        result["commit"] = git_commit()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(f"{sum(r['ok'] for r in rows)} of {len(rows)} runs agree with TP=1 x CP=1 full attention"
              + (f" (bf16 noise {noise:.2e})" if noise is not None else ""), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    fails = [f"TP={r['tp']} x CP={r['cp']} {r['algo']}" for r in rows if not r["ok"]]
    if fails:  # every rank computed the same rows
        raise Disagreement(f"{len(fails)} of {len(rows)} runs disagree with TP=1 x CP=1 full attention: "
                           + ", ".join(fails))


if __name__ == "__main__":
    sys.exit(main())
