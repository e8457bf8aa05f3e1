"""Time the passing-block selection on one CUDA GPU: SPAVA.md's mean probe, the log-sum-exp
score over materialised fp32 logit chunks (the torch path of selection "lse",
`algos.spava.selection.lse_scores_torch`) and the same score from the fused Triton kernel (selection
"lse" on CUDA, `ops.lse_score.lse_scores`: one pass over the keys, no logits in memory),
beside the block's own causal attention (the work the selection sits next to).

    python tools/bench_selection.py --block-len 16384 32768 65536 --query-len 64 512

Shapes default to Qwen2.5-VL-7B's language model (28 query heads, 4 KV heads, head_dim 128,
bf16); the budget is SPAVA.md's default for a context of 2 * CP * block tokens at CP = 4.
Medians of --repeats runs. Each selection column is the whole selection (score, max-pool,
top-k, gather) through `algos.spava.selection`, the code the attention runs; "fused score" is the
kernel's call alone.

Two clocks:
- idle: CUDA events around one call that starts on an idle GPU (as in the first runs): the
  host's launch work before the first kernel, and any gap where the GPU waits for the host,
  count. A host-bound selection (the mean probe's) is timed by its host work.
- gpu: the same call queued behind `torch.cuda._sleep` (the GPU busy for a few ms while the
  host queues everything), events around the call only: the GPU's own time, as in a layer
  whose earlier kernels keep the GPU busy while the host runs ahead.

Per block: one block alone (`select_passing`). Per rank: the two blocks a rank selects
(zigzag: contiguous, equally long), in one `select_passing_blocks` call (one score call per
block, one max-pool, top-k and gather for both), as the attention does; "per block" is half.
"one call" is not the library's path: the score in one lse call over both blocks, then the
same pool / top-k / gather (what scoring the union would save).

Before timing, each size checks the kernel against the torch path of algos.spava.selection on the same
inputs (max |score difference| and the share of the top-k selection both keep) and that the
two-block call keeps, bit for bit, what the per-block calls keep. Beside the kernel: its
floor, the largest of FLOPs (2 l_q Hq l_b d) over the measured bf16 matmul rate, bytes (k
read once, q read once, s written) over the measured copy bandwidth, and the exponentials
(l_q Hq l_b, one per logit) over the SFU rate (16 ex2 per SM per clock, the CUDA programming
guide's number for compute capability 9.0, at the card's max SM clock). --profile L:LQ
lists, for that size, the CUDA kernels each variant launches (torch.profiler).
Target (issue 23): lse selection <= max(1.5 x mean probe, 5% of the block's attention),
per block; checked here under both clocks, for a block alone and per block of a rank.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from megatron_spava.perf.kernels import cpu_time_ms, time_ms

from megatron_spava.algos.spava import SpavaLayout
from megatron_spava.ops.attention import attend
from megatron_spava.ops.lse_score import lse_scores
from megatron_spava.algos.spava.selection import (SCORERS, gather_top, lse_scores_torch, select_passing,
                                                   select_passing_blocks)


def one_call_select(q_query, k, v, n, budget, pool_kernel, scale):
    """Not the library's path: the lse score of n contiguous equal blocks in ONE kernel call,
    then one pool / top-k / gather, as select_passing_blocks. Returns n [budget, b, hk, 2d]."""
    l, b, hk, d = k.shape[0] // n, k.shape[1], k.shape[2], k.shape[3]
    scores = lse_scores(q_query, k, scale).permute(1, 2, 0)  # [b, hk, n * l]
    pooled = F.max_pool1d(scores.reshape(b, hk * n, l), pool_kernel, stride=1, padding=pool_kernel // 2)
    index = pooled.view(b, hk, n, l).topk(budget, dim=-1, sorted=False).indices
    idx = index.permute(2, 3, 0, 1).unsqueeze(-1).expand(-1, -1, -1, -1, d)
    return list(torch.cat([k.view(n, l, b, hk, d).gather(1, idx), v.view(n, l, b, hk, d).gather(1, idx)],
                          dim=-1).unbind(0))


def gpu_time_ms(fn, repeats, warmup):
    """Median ms of fn on the GPU alone (each call queued behind a ~2 ms sleep; kernels.time_ms)."""
    return time_ms(fn, repeats, warmup, sleep_cycles=4_000_000)


def kernel_profile(fn, reps=5):
    """The CUDA kernels (and memsets / copies) one call of fn launches, from a torch.profiler
    trace of `reps` calls: {"kernels_per_call", "kernel_us_per_call", "syncs_per_call", "kernels":
    [[name, count per call, us per call], ...]}."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    per = {}
    syncs = 0
    for e in trace.get("traceEvents", []):
        cat = str(e.get("cat", "")).lower()
        if cat in ("kernel", "gpu_memset", "gpu_memcpy"):
            c = per.setdefault(e.get("name", "?")[:90], [0, 0.0])
            c[0] += 1
            c[1] += float(e.get("dur", 0))
        elif cat == "cuda_runtime" and any(w in e.get("name", "") for w in ("Synchronize", "cudaMemcpy")):
            syncs += 1
    kernels = sorted(([n, c / reps, t / reps] for n, (c, t) in per.items()), key=lambda r: -r[2])
    return dict(kernels_per_call=sum(r[1] for r in kernels), kernel_us_per_call=sum(r[2] for r in kernels),
                syncs_per_call=syncs / reps, kernels=kernels)


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
    p.add_argument("--profile", default="16384:512",
                   help="BLOCK:QUERY size whose kernels to list per variant ('' for none; default %(default)s)")
    p.add_argument("--scores", nargs="+", default=[], metavar="SCORE",
                   help=f"also time these selection scores through select_passing, the library's path "
                        f"(from {sorted(SCORERS)}; e.g. rownorm rownorm-max: on CUDA their fused path, "
                        f"two calls of the lse kernel)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    unknown = [name for name in args.scores if name not in SCORERS]
    if unknown:
        p.error(f"--scores: unknown {unknown}; choose from {sorted(SCORERS)}")
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
    rows, profiles = [], {}
    for l in args.block_len:
        g = torch.Generator(device=dev).manual_seed(0)
        k2 = torch.randn(2 * l, 1, hk, d, device=dev, dtype=dt, generator=g)  # a rank's two blocks
        v2 = torch.randn(2 * l, 1, hk, d, device=dev, dtype=dt, generator=g)
        k, v = k2[:l], v2[:l]  # one block
        q = torch.randn(l, 1, hq, d, device=dev, dtype=dt, generator=g)
        attn = timer(lambda: attend(q, k, v, causal=True), args.repeats, args.warmup)[0]
        del q
        for lq in args.query_len:
            qq = torch.randn(lq, 1, hq, d, device=dev, dtype=dt, generator=g)
            # SPAVA.md's default budget for the context whose 2 * CP blocks are this long
            budget = SpavaLayout.plan(context_len=2 * args.cp * l, query_len=lq, cp_size=args.cp).passing_len
            # correctness, same inputs: the kernel against algos.spava.selection's torch path (fp32 logits)
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
            bounds = [(0, l), (l, 2 * l)]
            rank_call = {sel: (lambda sel=sel: select_passing_blocks(k2, v2, bounds, qq, budget, 5, scale, sel))
                         for sel in ("mean", "lse")}
            for sel, fn in rank_call.items():  # the two-block call keeps what the per-block calls keep
                alone = [select_passing(k2[a:b], v2[a:b], qq, budget, 5, scale, sel) for a, b in bounds]
                if not all(torch.equal(x, y) for x, y in zip(fn(), alone)):
                    raise AssertionError(f"l={l} lq={lq} {sel}: two blocks together differ from one by one")
            fns = {
                "mean": lambda: select_passing(k, v, qq, budget, 5, scale, "mean"),
                "lse_torch": lambda: gather_top(k, v, F.max_pool1d(lse_scores_torch(k, qq, scale), 5, stride=1,
                                                                   padding=2), budget),
                "lse_fused": lambda: select_passing(k, v, qq, budget, 5, scale, "lse"),
                "fused_score": lambda: lse_scores(qq, k, scale),
                "rank_mean": rank_call["mean"],
                "rank_lse": rank_call["lse"],
                "rank_lse_one_call": lambda: one_call_select(qq, k2, v2, 2, budget, 5, scale),
                **{f"score:{name}": (lambda name=name: select_passing(k, v, qq, budget, 5, scale, name))
                   for name in args.scores},
            }
            t = {name: timer(fn, args.repeats, args.warmup)[0] for name, fn in fns.items()}
            tg = {name: gpu_time_ms(fn, args.repeats, args.warmup)[0] for name, fn in fns.items()
                  if name != "lse_torch"} if dev.type == "cuda" else {}
            if dev.type == "cuda" and args.profile == f"{l}:{lq}":
                profiles[f"{l}:{lq}"] = {name: kernel_profile(fns[name]) for name in
                                         ("mean", "lse_fused", "rank_mean", "rank_lse", "rank_lse_one_call")}
            flops = 2 * lq * hq * l * d
            nbytes = (l * hk * d + lq * hq * d) * 2 + l * hk * 4
            exps = lq * hq * l
            floors = dict(flops_ms=flops / (ceil["matmul_tflops"] * 1e9), bytes_ms=nbytes / (ceil["copy_gbs"] * 1e6),
                          exp_ms=exps / ceil["sfu_ex2_per_s"] * 1e3)
            target = max(1.5 * t["mean"], 0.05 * attn)
            rank_target = max(1.5 * t["rank_mean"], 0.05 * 2 * attn)
            row = dict(block_len=l, query_len=lq, budget=budget, mean_ms=t["mean"], lse_torch_ms=t["lse_torch"],
                       lse_fused_ms=t["lse_fused"], fused_score_ms=t["fused_score"], attention_ms=attn,
                       target_ms=target, met=t["lse_fused"] <= target,
                       rank_mean_ms=t["rank_mean"], rank_lse_ms=t["rank_lse"],
                       rank_lse_one_call_ms=t["rank_lse_one_call"], rank_target_ms=rank_target,
                       rank_met=t["rank_lse"] <= rank_target,
                       gpu_ms={name: v for name, v in tg.items()},
                       gpu_met=(tg["lse_fused"] <= max(1.5 * tg["mean"], 0.05 * attn)) if tg else None,
                       gpu_rank_met=(tg["rank_lse"] <= max(1.5 * tg["rank_mean"], 0.1 * attn)) if tg else None,
                       floor_ms=max(floors.values()),
                       max_abs_diff=max_diff, topk_overlap=overlap, config=kern.best_config() if kern else None,
                       tuning_ms=tuning, scores_ms={name: t[f"score:{name}"] for name in args.scores}, **floors)
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
    if args.scores:
        print("\nOther scores (--scores), one block through select_passing; against the mean probe and "
              "the block's causal attention")
        print("| block | query | score | ms | / mean | / attention |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            for name, ms in r["scores_ms"].items():
                print(f"| {r['block_len']} | {r['query_len']} | {name} | {ms:.3f} | {ms / r['mean_ms']:.2f} | "
                      f"{100 * ms / r['attention_ms']:.1f}% |")
    print("\nPer rank: the two blocks a rank selects, one select_passing_blocks call (idle clock); "
          "target = max(1.5 x mean, 5% of the two blocks' attention)")
    print("| block | query | rank mean ms | rank lse ms | lse / mean | lse per block ms | lse / attention | "
          "target ms | met | one lse call ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_len']} | {r['query_len']} | {r['rank_mean_ms']:.3f} | {r['rank_lse_ms']:.3f} | "
              f"{r['rank_lse_ms'] / r['rank_mean_ms']:.2f} | {r['rank_lse_ms'] / 2:.3f} | "
              f"{100 * r['rank_lse_ms'] / (2 * r['attention_ms']):.1f}% | {r['rank_target_ms']:.3f} | "
              f"{'yes' if r['rank_met'] else 'NO'} | {r['rank_lse_one_call_ms']:.3f} |")
    if any(r["gpu_ms"] for r in rows):
        print("\nGPU clock (queued behind a busy GPU: the GPU's own time); same targets")
        print("| block | query | mean ms | lse ms | lse / mean | met | rank mean ms | rank lse ms | "
              "rank lse / mean | met | one lse call ms | fused score ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            gm = r["gpu_ms"]
            print(f"| {r['block_len']} | {r['query_len']} | {gm['mean']:.3f} | {gm['lse_fused']:.3f} | "
                  f"{gm['lse_fused'] / gm['mean']:.2f} | {'yes' if r['gpu_met'] else 'NO'} | {gm['rank_mean']:.3f} | "
                  f"{gm['rank_lse']:.3f} | {gm['rank_lse'] / gm['rank_mean']:.2f} | "
                  f"{'yes' if r['gpu_rank_met'] else 'NO'} | {gm['rank_lse_one_call']:.3f} | {gm['fused_score']:.3f} |")
    print("\n| block | block causal attention ms |\n|---|---|")
    for l in args.block_len:
        print(f"| {l} | {next(r['attention_ms'] for r in rows if r['block_len'] == l):.2f} |")
    for size, per in profiles.items():
        print(f"\nKernels per call at {size} (block:query), torch.profiler")
        for name, pr in per.items():
            print(f"- {name}: {pr['kernels_per_call']:.0f} kernels, {pr['kernel_us_per_call']:.1f} us of kernels, "
                  f"{pr['syncs_per_call']:.0f} host syncs / copies per call")
            for kn, c, us in pr["kernels"]:
                print(f"    {c:4.1f} x {us:8.1f} us  {kn}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, args=vars(args), ceilings=ceil, rows=rows, profiles=profiles), f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
