"""Spava prefill-attention demo: one attention layer over a long synthetic prompt.

Runs Spava on W context-parallel ranks (default 2, CPU/gloo) and compares it with exact
full causal attention over the whole prompt on one process: time, error and tokens per
rank. Launch with torchrun, or run it plainly and it launches its own ranks:

    megatron-spava-attention-demo                    # 2 CPU ranks, built-in defaults
    torchrun --nproc-per-node 2 -m megatron_spava.attention_demo --context-len 32768

The synthetic prompt is "needle" shaped, like a long video with a few relevant frames:
one key in 1024 aligns with the question, so the attention that matters is sparse
and the error numbers mean something. --data random gives unstructured Gaussian q/k/v.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from .config import SpavaConfig, round_up
from .algos.spava import SpavaLayout, spava_attn_func
from .launch import RankError, distributed_timeout, init_distributed, relaunch, under_torchrun
from .profiling import sync
from .testing.reference import random_qkv, relative_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-spava-attention-demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2,
                   help="ranks to launch when not started by torchrun (default: %(default)s)")
    p.add_argument("--context-len", type=int, default=16384,
                   help="context tokens n before the question (default: %(default)s)")
    p.add_argument("--query-len", type=int, default=64,
                   help="question tokens l_q at the end (default: %(default)s)")
    p.add_argument("--q-heads", type=int, default=8, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads, GQA (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="attention dtype (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: gloo ranks; cuda: one GPU per rank over NCCL (default: %(default)s)")
    p.add_argument("--data", choices=["needle", "random"], default="needle",
                   help="synthetic q/k/v: sparse relevant keys, or Gaussian (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per algorithm; the median is reported (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    from .launch import add_distributed_timeout_arg
    add_distributed_timeout_arg(p)
    return p


def needle_qkv(total: int, context: int, hq: int, hk: int, d: int, seed: int):
    """q [S, 1, hq, d], k/v [S, 1, hk, d] float32 where 1 key in 1024 of the context
    points along a per-KV-head direction that every query leans towards."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(hk, d, generator=gen), dim=-1)
    q = 0.5 * torch.randn(total, 1, hq, d, generator=gen) + 4.0 * u.repeat_interleave(hq // hk, 0)
    k = 0.5 * torch.randn(total, 1, hk, d, generator=gen)
    v = torch.randn(total, 1, hk, d, generator=gen)
    # q . k_needle ~ 10 sqrt(d): a needle outscores a background key by ~10 after scaling
    k[torch.randperm(context, generator=gen)[: max(1, context // 1024)]] += 2.5 * d ** 0.5 * u
    return q, k, v


def _timed(fn, repeats: int, group, device: torch.device):
    """Median and all wall times (s) of fn() over `repeats` runs (after one warm-up run),
    each the slowest rank's."""
    times, result = [], fn()
    for _ in range(repeats):
        sync(device)
        dist.barrier(group)
        start = time.perf_counter()
        result = fn()
        sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(float(elapsed))
    return statistics.median(times), times, result


def _gather_global(out: torch.Tensor, idx: torch.Tensor, total: int, group) -> torch.Tensor:
    """Assemble every rank's local rows into [total, ...] on all ranks."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=out.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([idx.numel()], device=out.device), group=group)
    longest = int(max(sizes))
    pad_out = out.new_zeros(longest, *out.shape[1:])
    pad_out[: out.shape[0]] = out
    pad_idx = idx.new_full((longest,), -1)
    pad_idx[: idx.numel()] = idx
    outs = [torch.empty_like(pad_out) for _ in range(world)]
    idxs = [torch.empty_like(pad_idx) for _ in range(world)]
    dist.all_gather(outs, pad_out, group=group)
    dist.all_gather(idxs, pad_idx, group=group)
    full = out.new_zeros(total, *out.shape[1:])
    for o, i in zip(outs, idxs):
        keep = i >= 0
        full[i[keep]] = o[keep]
    return full


def run(args) -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) \
        if args.device == "cuda" else torch.device("cpu")
    n, lq = args.context_len, args.query_len
    total = n + lq
    if args.data == "needle":
        q, k, v = (t.to(device, dtype) for t in needle_qkv(total, n, args.q_heads, args.kv_heads,
                                                            args.head_dim, args.seed))
    else:
        q, k, v = random_qkv(total, 1, args.q_heads, args.kv_heads, args.head_dim,
                             seed=args.seed, dtype=dtype, device=device)

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    # Exact reference: full causal attention over the whole prompt on one process, using
    # every core the ranks share.
    log(f"[1/2] full attention over {total} tokens on one process ...")
    ref, full_time, full_times = None, None, []
    if rank == 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        for i in range(args.repeats + 1):  # the first run warms up
            sync(device)
            start = time.perf_counter()
            ref = torch.nn.functional.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, enable_gqa=args.q_heads != args.kv_heads)
            sync(device)
            if i:
                full_times.append(time.perf_counter() - start)
        ref = ref.permute(2, 0, 1, 3)
        full_time = statistics.median(full_times)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.barrier(group)

    rows = [dict(algo="full (1 process)", ranks=1, tokens_per_rank=total, time_s=full_time,
                 times_s=full_times, speedup=1.0, err_all=0.0, err_query=0.0)]
    variants = [("spava", SpavaConfig()),
                ("star (no passing)", SpavaConfig(passing=False)),
                ("spava, full budget", SpavaConfig(passing_len=round_up(n, 128)))]
    log(f"[2/2] Spava on {world} ranks: " + ", ".join(name for name, _ in variants) + " ...")
    for name, cfg in variants:
        layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=cfg)
        idx = layout.local_indices(rank).to(device)
        ql, kl, vl = q[idx], k[idx], v[idx]
        med, times, out = _timed(
            lambda: spava_attn_func(ql, kl, vl, layout=layout, cp_group=group), args.repeats, group,
            device)
        full_out = _gather_global(out, idx, total, group)
        if rank == 0:
            rows.append(dict(
                algo=name, ranks=world, tokens_per_rank=int(idx.numel()), time_s=med, times_s=times,
                speedup=full_time / med, err_all=relative_error(full_out, ref),
                err_query=relative_error(full_out[n:], ref[n:]),
                anchor_len=layout.anchor_len, passing_len=layout.passing_len,
                block_len=layout.block_len))
    return rows


def print_table(rows, args, world):
    print()
    print(f"Spava prefill attention: n={args.context_len} context + {args.query_len} query "
          f"tokens, {args.q_heads}/{args.kv_heads} heads x {args.head_dim}, {args.dtype}, "
          f"data={args.data}, seed={args.seed}, {world} {args.device} ranks, "
          f"median of {args.repeats}")
    header = f"{'algorithm':<20} {'ranks':>5} {'tokens/rank':>11} {'time ms':>9} {'speedup':>8} " \
             f"{'rel err all':>12} {'rel err query':>14}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['algo']:<20} {r['ranks']:>5} {r['tokens_per_rank']:>11} {1e3 * r['time_s']:>9.1f} "
              f"{r['speedup']:>7.2f}x {r['err_all']:>12.2e} {r['err_query']:>14.2e}")
    spava = rows[1]
    print(f"\nSpava budgets: anchor {spava['anchor_len']}, block {spava['block_len']}, passing "
          f"{spava['passing_len']} per block and KV head. Errors are ||out - full|| / ||full|| "
          f"against the full-attention output above; query rows are exact by construction.")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    try:  # every rank would raise the same error; say it once, before launching
        if args.q_heads % args.kv_heads:
            raise ValueError(f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads}")
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        distributed_timeout(args)
        SpavaLayout.plan(context_len=args.context_len, query_len=args.query_len, cp_size=world)
    except ValueError as err:
        parser.error(str(err))
    if not under_torchrun():
        try:
            relaunch("megatron_spava.attention_demo", args.nproc, argv)
        except RankError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 1
        return 0
    init_distributed(args.device, timeout=distributed_timeout(args))
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        rows = run(args)
        if dist.get_rank() == 0:
            print_table(rows, args, dist.get_world_size())
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(args=vars(args), results=rows), f, indent=2)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
