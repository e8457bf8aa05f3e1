#!/usr/bin/env python3
"""Video prefill time-to-first-token of Qwen2.5-VL-, InternVL3- and Qwen3-VL-shaped models, every
algorithm in one run.

    torchrun --standalone --nproc-per-node 4 tools/bench_prefill.py --shape 7b \\
        --tokens 32768 65536 131072 --json prefill.json --plot prefill.png
    torchrun --standalone --nproc-per-node 4 tools/bench_prefill.py --shape internvl3-2b ...
    torchrun --standalone --nproc-per-node 1 tools/bench_prefill.py --shape qwen3-vl-8b ...

For each LLM length n it synthesises a 448x448 video inside a chat prompt (Qwen2.5-VL:
n/256 temporal groups of random patches; InternVL3: n/258 frames of one random 448x448
tile, `<img><IMG_CONTEXT>*256</img>` each; Qwen3-VL: n/264 timestamped groups of 512x512,
`models.qwen3_vl.bench`), i.e. the vision encoder's real input size,
builds the model with random bf16 weights at the released shape (real layer counts,
widths and heads; --model picks the family for --shape tiny), and times
`generate(max_new_tokens=1)`: frame-parallel vision + prefill until the first token
is known on every rank. Algorithms (--algos) are the registry's
(megatron_spava.algos: full, ring, star, apb, spava, ...) and variants that turn SpavaConfig
switches off, `<algo>-no-<switch>[-no-<switch>...]`:
  full                       one GPU, exact (every rank runs its own replica)
  ring                       exact ZigZag ring attention over W GPUs
  star, apb, spava           SPAVA.md section 5
  spava-no-overlap, spava-no-shard-anchor, spava-no-fuse-query, spava-no-zigzag,
  spava-no-frame-parallel    one step of the paper's ablation chain each (the default list)
  megatron-p2p, megatron-a2a, megatron-all_gather, megatron-a2a+p2p
                             Megatron's own context parallelism: Transformer Engine's CP
                             attention with that --cp-comm-type, as Megatron ships it (no
                             weight sharding); needs TE, and in the default list when TE
                             imports. With any of them in a run, every algorithm gets the
                             same prompt padded to a multiple of 2 x CP tokens (TE's rule)
  --chain                    adds the chain itself, each step removing one more switch:
                             spava-no-overlap, spava-no-overlap-no-shard-anchor, ...
spava-no-fuse-query prefills the context alone and runs the query over the KV cache (two
passes); spava-no-frame-parallel has every rank encode the whole video.
The CP algorithms run with the LLM layers' weights sharded over the W GPUs (--shard-weights,
default; `full` runs on one GPU with every weight).
Reported per (n, algo): median TTFT over --repeats after --warmup runs (the slowest rank's
median; min / max are rank 0's runs), the
vision / LLM split, the share of LLM time inside core attention (CUDA events around
every core-attention call), peak GPU memory (max over ranks), and speedups against full,
ring and apb from the same run, and the roofline floor beside each TTFT: the FLOPs the
busiest rank must do (vision encoder and dense layers at the measured GEMM rate,
attention at the measured causal-attention rate; per-rank FLOPs from each algorithm's cost (perf/layer.py's
per-rank ops, i.e. the algorithm's own layout), with both rates measured in the same run
at the start (one layer's four GEMMs and one causal attention call at the LLM's shape,
`--rate-tokens` rows; tools/bench_layers.py's kernels). With --profile-comm, one extra spava run per n under
torch.profiler measures exposed communication: time when an NCCL kernel runs and no
other kernel does, over the run's wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from . import kernels, layer
from ..models import registry as _families
from ..specs import add_lm_fusions_arg, resolve_lm_fusions
from ..video.inputs import pin_pixels
from .work import Shape
from .inputs import prompt_lengths, synthetic_inputs, vision_flops_per_group  # noqa: F401 (this module's API)

#: --shape -> (family, the family's shape name; None: its tiny config), from the model-family registry
SHAPES = _families.bench_shapes()


def family_of(shape: str, model: str = "auto") -> str:
    """The model family of a --shape / --model pair; ValueError when they disagree."""
    return _families.bench_family(shape, model)


def model_config(shape: str, model: str = "auto"):
    """The family's config (its config class, `models.registry`) at `shape`."""
    return _families.bench_config(shape, model)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b",
                   help="model shape: " + ", ".join(f"{s} {_families.get_family(f).title}'s" for s, (f, _)
                                                     in SHAPES.items() if f) +
                        "; tiny (any family, --model) is for a CPU dry run (default: %(default)s)")
    p.add_argument("--model", choices=["auto", *_families.names()], default="auto",
                   help=f"model family; auto: the shape's (tiny: {_families.DEFAULT}) (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: gloo ranks, for checking the tool itself (default: %(default)s)")
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072],
                   help="LLM prompt lengths n (default: %(default)s)")
    p.add_argument("--algos", nargs="+", type=_variant, default=None, metavar="ALGO",
                   help="algorithms and variants (default: %s)" % " ".join(_default_algos()))
    p.add_argument("--chain", action="store_true",
                   help="also run the paper's ablation chain (%s)" % ", ".join(_chain()))
    p.add_argument("--repeats", type=int, default=3, help="timed runs (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: %(default)s)")
    p.add_argument("--full-max-tokens", type=int, default=1 << 30,
                   help="skip 'full' above this n (one GPU's memory/time) (default: no limit)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size; CP = world / TP (multi-node: TP inside a node, see "
                        "examples/cluster/) (default: %(default)s)")
    p.add_argument("--shard-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="CP algorithms keep 1/W of each LLM layer's weights per GPU, gathered layer "
                        "by layer (the model's shard_weights) (default: on)")
    add_lm_fusions_arg(p, several=True)
    p.add_argument("--pin-pixels", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, keep the video's pixels in page-locked host memory, as a decoding "
                        "pipeline would, so each rank's slice is copied to the GPU by DMA without "
                        "blocking the host (video.inputs.pin_pixels) (default: on)")
    p.add_argument("--rate-tokens", type=int, default=None,
                   help="rows of the GEMM and causal-attention calls that measure the roofline's "
                        "rates (default: the largest --tokens, at most 65536 on CUDA, 1024 on CPU)")
    p.add_argument("--profile-comm", action="store_true", help="measure exposed communication")
    p.add_argument("--profile-kernels", metavar="DIR",
                   help="one extra spava run per n under torch.profiler: print the 40 costliest "
                        "kernels and write a Chrome trace per rank into DIR")
    p.add_argument("--json", help="write results here (rewritten after every n)")
    p.add_argument("--plot", help="write a PNG of speedup vs tokens here (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="no run: merge these result files, print the table, write --json/--plot")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to launch when not under torchrun (default: the GPUs, or 2 on CPU)")
    p.add_argument("--emulate-cp", type=int, default=None, metavar="W",
                   help="run ONE rank of a W-rank CP layout in this one process (perf/emulate.py): "
                        "that rank's compute at its sizes, every collective a local stand-in of the "
                        "true shapes; reports its time and floor per part (vision, dense, attention, "
                        "selection, merges) and a predicted TTFT with the all-gather times measured "
                        "on 4 H200 ('full' runs as itself, one GPU)")
    p.add_argument("--emulate-rank", type=int, default=None, metavar="R",
                   help="with --emulate-cp: the rank to run (default: the busiest, per (n, algorithm): "
                        "the largest floor from the registry entry's cost model at this run's "
                        "measured rates)")
    p.add_argument("--fp8-compare", action="store_true",
                   help="with --fp8-format: run every algorithm in bf16 and in FP8 on the same model "
                        "(results keyed '<algo>' and '<algo>@fp8')")
    p.add_argument("--verbose", action="store_true", help="tracebacks of errors")
    from megatron_spava.fp8 import add_fp8_args
    add_fp8_args(p)
    from megatron_spava.launch import add_distributed_timeout_arg
    add_distributed_timeout_arg(p)
    from megatron_spava.specs import add_transformer_impl_arg
    add_transformer_impl_arg(p)
    args = p.parse_args(argv)
    try:
        family_of(args.shape, args.model)
    except ValueError as err:
        p.error(str(err))
    from megatron_spava.perf.emulate import check_args
    error = check_args(args.emulate_rank, args.emulate_cp, [a for a in (args.algos or []) if variant_option(a)])
    if error:
        p.error(error)
    if args.fp8_compare and not args.fp8_format:
        p.error("--fp8-compare needs --fp8-format e4m3|hybrid")
    if args.fp8_format and not args.replot:
        from megatron_spava.fp8 import fp8_error
        error = fp8_error(args.fp8_format, args.fp8_recipe, args.device, args.transformer_impl)
        if error:
            p.error(error)
    if args.lm_fusions and len(set(args.lm_fusions)) < len(args.lm_fusions):
        p.error(f"--lm-fusions: each choice once (got {' '.join(args.lm_fusions)})")
    if args.transformer_impl:  # else checked once the impl is resolved (bench)
        try:
            [resolve_lm_fusions(f, args.transformer_impl) for f in args.lm_fusions or ()]
        except ValueError as err:
            p.error(f"--lm-fusions: {err}")
    wanted = [a for a in (args.algos or []) if variant_option(a)]  # their own (TE) core attention
    if wanted:
        from megatron_spava.specs import te_available
        if not te_available():
            p.error(f"{', '.join(wanted)}: Megatron's own context parallelism is Transformer Engine's "
                    f"attention, and Transformer Engine does not import here")
        if args.device != "cuda":
            p.error(f"{', '.join(wanted)}: Transformer Engine runs on CUDA only (--device cuda)")
    return args


def _default_algos():
    from megatron_spava.algos import benchmark_variants
    return benchmark_variants()


def variant_option(variant: str):
    """The option of an `<algo>-<option>` variant (`Algorithm.options`: megatron-a2a ->
    'a2a', Transformer Engine's --cp-comm-type), else None. Such a variant runs in its own
    core-attention module, built for that option."""
    from megatron_spava.algos.registry import split_option
    return split_option(variant)[1]


def one_rank(variant: str) -> bool:
    """Whether the variant runs without context parallelism, on one GPU (`Algorithm.one_rank`)."""
    from megatron_spava.algos.registry import runs_on_one_rank
    return runs_on_one_rank(variant)


def _chain():
    from megatron_spava.algos import ablation_chain
    return ablation_chain()


def _variant(name: str) -> str:
    """argparse type: a registered algorithm, one of its -no-<switch> variants, or
    <algo>-<option> (megatron-<cp-comm-type>)."""
    from megatron_spava.algos import get, parse_variant
    if variant_option(name):
        return name
    try:
        algo, _ = parse_variant(name)
        entry = get(algo)
        if entry.attn_func is None:
            raise ValueError(f"{algo!r} runs in its own core-attention module: name its communication, "
                             f"one of {', '.join(f'{algo}-{o}' for o in entry.options)}")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))
    return name


def algo_and_config(variant: str):
    """(registry algorithm, SpavaConfig) of a variant name: 'spava-no-zigzag' -> spava with
    zigzag=False; 'megatron-a2a' -> megatron with the default config (its communication is
    the model's core-attention module: `variant_option`)."""
    from megatron_spava.algos.registry import split_option, variant_config
    from megatron_spava.config import SpavaConfig
    name, option = split_option(variant)
    if option is not None:
        return name, SpavaConfig()
    return variant_config(variant)


def build(shape: str, cp: int, seed: int, device: torch.device, tp: int = 1, backend: str = "local",
          model: str = "auto", variant=None, cpu_init=None, bf16=None, lm_fusions=None):
    """The model at `shape` with random weights (the same on every rank), under a fresh
    TP x CP parallel state; variant: an `<algo>-<option>` variant (`variant_option`): build
    it with its algorithm's own core-attention module for that option (megatron-a2a:
    Megatron's own CP attention, Transformer Engine's, with that communication) instead of
    SpavaCoreAttention. cpu_init:
    megatron-core's CPU initialisation (the full weight drawn, then sliced: the same weights
    at every TP size; default on CPU only); bf16: bfloat16 (default on CUDA only); lm_fusions:
    the language model's fused kernels (`specs.lm_fusion_settings`; None: its default)."""
    from megatron_spava.launch import model_parallel_state

    ps = model_parallel_state(tp, cp)
    torch.manual_seed(seed)
    cfg = model_config(shape, model)
    Model = _families.get_family(family_of(shape, model)).model_class()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.manual_seed(seed)
    extra = {}
    if variant is not None:
        from megatron_spava.algos.megatron import core_attention_for
        extra["core_attention"] = core_attention_for(algo_and_config(variant)[0], variant_option(variant))
    cpu_init = not cuda if cpu_init is None else cpu_init
    dtype = torch.bfloat16 if (cuda if bf16 is None else bf16) else torch.float32
    with torch.device("cpu" if cpu_init else device):
        built = Model(cfg, dtype=dtype, tensor_parallel=tp, context_parallel=cp,
                      use_cpu_initialization=cpu_init, backend=backend, lm_fusions=lm_fusions,
                      **extra).eval()
    return built.to(device), ps


def exposed_comm_share(prof) -> float:
    """Fraction of the run's GPU wall time where an NCCL kernel runs and nothing else does."""
    kernels = [(e.time_range.start, e.time_range.end, "nccl" in e.name.lower())
               for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
    if not kernels:
        return float("nan")
    def union(intervals):
        out = []
        for s, e in sorted(intervals):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out
    comm, compute = union([(s, e) for s, e, c in kernels if c]), union([(s, e) for s, e, c in kernels if not c])
    exposed = 0.0
    for s, e in comm:  # comm time minus its overlap with compute
        covered = 0.0
        for cs, ce in compute:
            covered += max(0.0, min(e, ce) - max(s, cs))
        exposed += (e - s) - covered
    wall = max(e for _, e, _ in kernels) - min(s for s, _, _ in kernels)
    return exposed / wall


def llm_shape(cfg):
    """The LLM's shape (perf.work.Shape) of a family's config (`Shape.of_config`)."""
    return Shape.of_config(cfg)


def measure_rates(cfg, device: torch.device, rows: int, warmup: int = 1, repeats: int = 3,
                  fp8: bool = False) -> dict:
    """Peak rates of this device at the LLM's shape, in FLOP/s: one layer's four GEMMs
    (QKV, output, gate|up, down) over `rows` tokens, and one causal attention call of
    `rows` tokens (the kernel the algorithms use); the device-memory copy rate (bytes read +
    written per second, 1 GiB on CUDA); with `fp8`, the four GEMMs in FP8 too
    (`kernels.fp8_gemm_floor_ms`). Run on every rank; the minimum is kept."""
    bl = kernels
    shape = dict(hidden_size=cfg.hidden_size, kv_channels=cfg.head_dim, num_attention_heads=cfg.num_heads,
                 num_query_groups=cfg.num_kv_heads, ffn_hidden_size=cfg.intermediate_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm_ms, gemm_flops = bl.gemm_floor_ms(shape, rows, dtype, device, warmup, repeats)
    attn, attn_flops = bl.attention_floor_ms(shape, rows, dtype, device, warmup, repeats, te=False)
    copy = bl.copy_rate(device, (1 << 30) if device.type == "cuda" else (64 << 20), warmup, repeats)
    values = [gemm_flops / gemm_ms * 1e3, attn_flops / min(attn.values()) * 1e3, copy]
    if fp8:
        fp8_ms, fp8_flops = bl.fp8_gemm_floor_ms(shape, rows, device, warmup, repeats)
        values.append(fp8_flops / fp8_ms * 1e3)
    rates = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(rates, op=dist.ReduceOp.MIN)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = dict(rows=rows, gemm_flops_per_s=float(rates[0]), attention_flops_per_s=float(rates[1]),
               copy_bytes_per_s=float(rates[2]), attention_kernel=next(iter(attn)))
    if fp8:
        out["fp8_gemm_flops_per_s"] = float(rates[3])
    return out


def rank_flops(cfg, n: int, variant: str, cp: int, multiple: int = 1) -> list:
    """Per CP rank, the FLOPs one (n, variant) prefill must do: {"vision", "dense",
    "attention"} (all layers; the registry entry's per-rank ops for the LLM (perf.layer),
    `vision_flops` for the rank's frame groups). `full` is one GPU. The LM head, norms,
    selection and merges are not counted. A two-pass variant (-no-fuse-query) is charged the
    one-pass FLOPs: the query's rows and keys are the same."""
    import dataclasses
    name, config = algo_and_config(variant)
    config = dataclasses.replace(config, fuse_query=True)
    comm = variant_option(variant)
    per_group = vision_flops_per_group(cfg)
    ranks = layer.rank_flops(name if comm is None else f"{name}-{comm}", n, cp, llm_shape(cfg),
                          lengths=prompt_lengths(n, cfg, multiple), config=config,
                          frame_parallel=config.frame_parallel)
    return [dict(vision=f["frame_groups"] * per_group, dense=f["dense"], attention=f["attention"]) for f in ranks]


def roofline(cfg, n: int, variant: str, cp: int, rates: dict, multiple: int = 1) -> dict:
    """The floor of one (n, variant) run: max over CP ranks of (vision + dense FLOPs) / GEMM
    rate + attention FLOPs / attention rate (`rank_flops`), in seconds, with the busiest
    rank's split and FLOPs (a floor, not a prediction: perf.simulate predicts)."""
    best = None
    for r, f in enumerate(rank_flops(cfg, n, variant, cp, multiple)):
        split = dict(vision_s=f["vision"] / rates["gemm_flops_per_s"], dense_s=f["dense"] / rates["gemm_flops_per_s"],
                     attention_s=f["attention"] / rates["attention_flops_per_s"])
        row = dict(floor_s=sum(split.values()), rank=r, **split, flops=f)
        if best is None or row["floor_s"] > best["floor_s"]:
            best = row
    return best


def run_algo(model, ps, inputs, algo: str, args, group=None):
    """Time one algorithm (args.warmup + args.repeats runs of `generate`). group: the CP
    group (default: the parallel state's; an emulated rank's `EmulatedGroup`)."""
    from megatron_spava import profiling
    from megatron_spava.distributed import group_rank_world, is_emulated
    from megatron_spava.inference.generate import generate
    from megatron_spava.perf.emulate import PARTS, part_times
    group = ps.get_context_parallel_group() if group is None else group
    name, config = algo_and_config(algo)
    kwargs = dict(algo=name, config=config, cp_group=group, max_new_tokens=1, eos_token_ids=[],
                  device=args.device_obj, group=group if is_emulated(group) else None)
    cuda = args.device_obj.type == "cuda"
    for _ in range(args.warmup):
        generate(model, inputs, **kwargs)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ttft, vision, attention, selection, parts = [], [], [], [], []
    for _ in range(args.repeats):
        profiling.start()
        out = generate(model, inputs, **kwargs)
        regions = profiling.stop()
        attention.append(regions.get("attention", 0.0))
        selection.append(regions.get("selection", 0.0))
        parts.append(part_times(out.timings["vision_s"], out.ttft_s - out.timings["vision_s"], regions))
        ttft.append(out.ttft_s)
        vision.append(out.timings["vision_s"])
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0],
                        device=args.device_obj)
    times = torch.tensor([statistics.median(ttft), statistics.median(vision)], device=args.device_obj)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    result = dict(ttft_median_s=float(times[0]), ttft_min_s=min(ttft), ttft_max_s=max(ttft),
                  ttft_all_s=ttft, vision_median_s=float(times[1]),
                  llm_median_s=float(times[0] - times[1]),
                  attention_share_of_llm=(statistics.median(attention) / max(1e-9, float(times[0] - times[1]))
                                          if attention else float("nan")),
                  selection_share_of_llm=(statistics.median(selection) / max(1e-9, float(times[0] - times[1]))
                                          if selection else float("nan")),
                  peak_memory_gib=float(peak), tokens=int(inputs.input_ids.shape[1]),
                  local_tokens=int(out.layout.local_len(group_rank_world(group)[0])),
                  parts_median_s={p: statistics.median(r[p] for r in parts) for p in PARTS})
    if args.profile_kernels and algo == "spava":
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            generate(model, inputs, **kwargs)
            if cuda:
                torch.cuda.synchronize()
        os.makedirs(args.profile_kernels, exist_ok=True)
        prof.export_chrome_trace(os.path.join(
            args.profile_kernels, f"spava_n{inputs.input_ids.shape[1]}_rank{dist.get_rank()}.json"))
        if dist.get_rank() == 0:
            sort = "cuda_time_total" if cuda else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=40), flush=True)
    if args.profile_comm and algo == "spava" and cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            generate(model, inputs, **kwargs)
            torch.cuda.synchronize()
        result["exposed_comm_share"] = exposed_comm_share(prof)
    return result


def busiest_rank(cfg, n: int, variant: str, cp: int, rates: dict, multiple: int = 1) -> int:
    """The CP rank with the largest floor (its vision + dense FLOPs at the GEMM rate plus
    its attention FLOPs at the attention rate), the FLOPs from the registry entry's cost
    model (`Algorithm.cost`, through perf.layer); the lowest such rank on ties."""
    return roofline(cfg, n, variant, cp, rates, multiple)["rank"]


def rank_work(cfg, n: int, variant: str, cp: int, rank: int, multiple: int = 1,
              shard_weights: bool = True) -> dict:
    """What rank `rank` of a `cp`-rank layout does in one prefill, from the registry
    entry's cost model: {"flops": rank_flops' vision/dense/attention FLOPs, "merged":
    float32 elements read by LSE merges (all layers), "selection_bytes": bytes of K the
    passing-block selection reads (all layers; 0 without passing blocks), "comms": the
    layer's collectives on that rank (perf.work.Comm, one layer), "layers"}."""
    import dataclasses

    name, config = algo_and_config(variant)
    config = dataclasses.replace(config, fuse_query=True)
    comm = variant_option(variant)
    shape = llm_shape(cfg)
    plan, ops = layer.layer_ops(name if comm is None else f"{name}-{comm}", n, cp, 1, shape,
                                shard_weights=shard_weights and cp > 1,
                                lengths=prompt_lengths(n, cfg, multiple), config=config)
    mine = ops[min(rank, len(ops) - 1)]
    passing = getattr(plan.layout, "passing_len", 0) or 0
    local = plan.local_tokens[min(rank, len(plan.local_tokens) - 1)]
    return dict(flops=rank_flops(cfg, n, variant, cp, multiple)[min(rank, len(ops) - 1)],
                merged=shape.layers * sum(o.merged for o in mine),
                selection_bytes=(shape.layers * local * shape.kv_heads * shape.head_dim * shape.act_bytes
                                 if passing else 0),
                comms=[o.comm for o in mine if o.comm is not None], layers=shape.layers, local_tokens=local)


def _parts(cfg, n: int, algo: str, cp: int, rates: dict, multiple: int, run: dict, precision: str,
           shard: bool, emulated: bool, me: int = 0) -> dict:
    """The floor of each part of the timed rank `me` (the emulated rank, else CP rank 0) and
    the measured / floor ratios; for an emulated rank also the predicted TTFT (perf.emulate)."""
    from megatron_spava.perf import emulate as em
    name, config = algo_and_config(algo)
    work = rank_work(cfg, n, algo, cp, me, multiple, shard_weights=shard)
    part_rates = dict(rates)
    if precision == "fp8" and "fp8_gemm_flops_per_s" in rates:  # the dense GEMMs run in FP8, vision does not
        part_rates["dense_gemm_flops_per_s"] = rates["fp8_gemm_flops_per_s"]
    floors = em.part_floors(work, part_rates)
    measured = run["parts_median_s"]
    out = dict(part_floors_s=floors, part_ratios={p: measured[p] / floors[p] if floors[p] > 0 else float("nan")
                                                   for p in em.PARTS},
               timed_rank=me, timed_rank_floor_s=floors["total"])
    if emulated:
        out["predicted"] = em.predicted_ttft(run["ttft_median_s"], work, cfg, n, cp, overlap=config.overlap)
    return out


def replot(args) -> None:
    """Merge result files (later ones add runs), recompute speedups, print and plot."""
    merged = None
    for path in args.replot:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
            continue
        for n, runs in data["runs"].items():
            merged["runs"].setdefault(n, {}).update(runs)
    _speedups(merged)
    _table(merged)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=1)
    if args.plot:
        _plot(merged, args.plot)


def main(argv=None):
    """Not under torchrun: check the flags, then relaunch on --nproc ranks (an error, or a
    rank that stalls or dies, is one line naming the rank). Under torchrun: run."""
    from megatron_spava.launch import (RankError, distributed_timeout, relaunch, report_rank_errors,
                                       under_torchrun)
    args = parse_args(argv)
    args.algos = list(dict.fromkeys((args.algos or _default_algos()) + (_chain() if args.chain else [])))
    if args.replot:
        return replot(args)
    prog = os.path.basename(__file__)
    try:
        distributed_timeout(args)
        for flag in ("tokens", "repeats", "nproc", "tensor_model_parallel_size"):
            values = getattr(args, flag)
            for v in (values if isinstance(values, list) else [values]):
                if v is not None and v < 1:
                    raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if not under_torchrun():
        nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
        if args.emulate_cp is not None:
            if args.nproc not in (None, 1):
                print(f"{prog}: error: --emulate-cp runs one process; drop --nproc {args.nproc}", file=sys.stderr)
                return 2
            nproc = 1
        try:
            relaunch("megatron_spava.perf.bench_prefill", nproc, argv, verbose=args.verbose)
        except (RankError, ValueError) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1
        return 0
    with report_rank_errors(args.verbose):
        bench(args)
    return 0


def bench(args):
    """The benchmark, on this rank."""
    from megatron_spava.launch import distributed_timeout, init_distributed, set_phase
    from megatron_spava.specs import resolve_transformer_impl
    args.device_obj = init_distributed(args.device, timeout=distributed_timeout(args))
    impl = resolve_transformer_impl(args.transformer_impl, args.device_obj)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    world, rank = dist.get_world_size(), dist.get_rank()
    from megatron_spava.placement import Request, check_launch  # fit and placement, before the build
    tp = args.tensor_model_parallel_size
    if tp < 1 or world % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide the {world} ranks")
    emulated = args.emulate_cp is not None
    if emulated and (world != 1 or tp != 1):
        raise ValueError(f"--emulate-cp runs one rank in one process at TP 1; this launch has {world} "
                         f"ranks and TP {tp}")
    cp = args.emulate_cp if emulated else world // tp
    variants = [algo_and_config(a) for a in args.algos]
    cfg = model_config(args.shape, args.model)
    from megatron_spava.algos.registry import prompt_multiple
    m = prompt_multiple(args.algos)  # Megatron's CP: TE cuts the prompt into 2 x CP chunks
    multiple = m * cp if m > 1 and cp > 1 else 1
    cp_variants = [v for a, v in zip(args.algos, variants) if not one_rank(a)]
    fit = dict(tp=tp, cp=cp, algos=cp_variants,
               requests=[Request(c, q, g) for g, c, q in (prompt_lengths(n, cfg, multiple) for n in args.tokens)],
               frame_parallel=any(c.frame_parallel for a, c in cp_variants), model_config=cfg)
    if emulated:  # one process: the fit of one rank of the layout (no placement to check)
        from megatron_spava.placement import fit_error
        error = fit_error(**fit)
        if error:
            raise ValueError(error)
    else:
        check_launch(**fit)
    from megatron_spava.fp8 import fp8_error
    error = fp8_error(args.fp8_format, args.fp8_recipe, args.device_obj, impl)
    if error:
        raise ValueError(error)
    precisions = (["bf16", "fp8"] if args.fp8_compare else ["fp8"]) if args.fp8_format else ["bf16"]
    fusions = [resolve_lm_fusions(f, impl, fp8=bool(args.fp8_format)) for f in args.lm_fusions or [None]]
    results = dict(shape=args.shape, model=family_of(args.shape, args.model), world=world, tp=tp, cp=cp, device=name, transformer_impl=impl,
                   lm_fusions=fusions, pinned_pixels=args.pin_pixels and args.device_obj.type == "cuda",
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"), runs={},
                   emulated=dict(cp=cp, rank=args.emulate_rank) if emulated else None,
                   fp8=dict(format=args.fp8_format, recipe=args.fp8_recipe) if args.fp8_format else None)
    cap = 65536 if args.device == "cuda" else 1024
    rates = results["rates"] = measure_rates(cfg, args.device_obj, args.rate_tokens or min(max(args.tokens), cap),
                                             fp8=bool(args.fp8_format))
    if rank == 0:
        fp8_rate = (f", FP8 GEMM {rates['fp8_gemm_flops_per_s'] / 1e12:.3g} TFLOP/s"
                    if "fp8_gemm_flops_per_s" in rates else "")
        print(f"roofline rates at {rates['rows']} rows: GEMM {rates['gemm_flops_per_s'] / 1e12:.3g} TFLOP/s, "
              f"causal attention ({rates['attention_kernel']}) {rates['attention_flops_per_s'] / 1e12:.3g} TFLOP/s, "
              f"memory copy {rates['copy_bytes_per_s'] / 1e9:.4g} GB/s{fp8_rate}", flush=True)
    # One model per group of algorithms that share it: our core attention (weights sharded
    # over CP unless --no-shard-weights), Megatron's CP attention per communication (an
    # algorithm's own core-attention module per option, as Megatron ships it: no sharding),
    # and the one-rank algorithms (`full`: Algorithm.one_rank) on one GPU (every rank its own replica).
    one_gpu = [a for a in args.algos if one_rank(a)]
    modules = [a for a in args.algos if variant_option(a)]
    ours = [a for a in args.algos if a not in one_gpu and a not in modules]
    groups = ([(cp, None, ours, args.shard_weights)] if ours else []) + \
        [(cp, a, [a], False) for a in modules] + ([(1, None, one_gpu, False)] if one_gpu else [])
    groups = [(*g, f) for f in fusions for g in groups]  # one model per group and choice of fusions
    for n in args.tokens:
        results["runs"][str(n)] = {}
    results["shard_weights"] = args.shard_weights
    results["prompt_multiple"] = multiple
    from megatron_spava.distributed import EmulatedGroup
    from megatron_spava.fp8 import set_fp8
    from megatron_spava.perf import emulate as em
    for size, module, algos, shard, fusion in groups:
        set_phase(f"building the model for {', '.join(algos)} (CP {size}{', emulated' if emulated else ''}, "
                  f"fusions {fusion})")
        model, ps = build(args.shape, 1 if emulated else size, args.seed, args.device_obj, tp, impl, args.model,
                          variant=module, lm_fusions=fusion)
        sharded = None
        if shard and size > 1 and not emulated:
            sharded = model.shard_weights(ps.get_context_parallel_group())
        for n in args.tokens:
            if size == 1 and n > args.full_max_tokens:
                continue
            inputs = synthetic_inputs(model.cfg, n, args.seed, multiple)
            if args.pin_pixels and args.device_obj.type == "cuda":
                inputs = pin_pixels(inputs)  # as a decoding pipeline leaves them (not timed)
            for algo in algos:
                group, me = ps.get_context_parallel_group(), 0
                if emulated and size > 1:
                    me = args.emulate_rank if args.emulate_rank is not None else \
                        busiest_rank(cfg, n, algo, size, rates, multiple)
                    group = EmulatedGroup(me, size)
                    em.emulate(model, group)
                    if shard and (sharded is None or sharded.rank != me):
                        # (re-sharding after an emulated unshard keeps W copies of the last
                        # rank's shard: the shapes and work are right, the values are not)
                        if sharded is not None:
                            sharded.unshard()
                        sharded = model.shard_weights(group)
                for precision in precisions:
                    key = (algo if len(fusions) == 1 else f"{algo}+{fusion}") + ("@fp8" if precision == "fp8" else "")
                    set_fp8(model, args.fp8_format if precision == "fp8" else None, args.fp8_recipe)
                    set_phase(f"running {key} at n={n}")
                    run = results["runs"][str(n)][key] = run_algo(model, ps, inputs, algo, args, group=group)
                    run["precision"], run["lm_fusions"] = precision, fusion
                    run["roofline"] = roofline(cfg, n, algo, size, rates, multiple) if tp == 1 else None
                    if tp == 1:
                        run.update(_parts(cfg, n, algo, size, rates, multiple, run, precision,
                                          shard=shard and size > 1, emulated=emulated and size > 1, me=me))
                    _report(rank, n, key, run)
            _save(rank, args, results)
        # every reference to this group's model (the sharded layers hold the language model),
        # so the next group's model gets its memory (several --lm-fusions: one model each)
        model = sharded = inputs = None
        gc.collect()
        if args.device_obj.type == "cuda":
            torch.cuda.empty_cache()
    _speedups(results)
    _save(rank, args, results)
    if rank == 0:
        _table(results)
        _parts_table(results)
        if args.plot:
            _plot(results, args.plot)
    dist.destroy_process_group()


def _floor(r) -> str:
    f = r.get("roofline")
    return "" if not f else (f" floor {1e3 * f['floor_s']:8.1f} ms (x{r['ttft_median_s'] / f['floor_s']:.2f}; "
                             f"vision {1e3 * f['vision_s']:.1f}, dense {1e3 * f['dense_s']:.1f}, "
                             f"attention {1e3 * f['attention_s']:.1f})")


def _report(rank, n, algo, r):
    if rank == 0:
        print(f"n={n:>7} {algo:<24} TTFT {1e3 * r['ttft_median_s']:9.1f} ms{_floor(r)} "
              f"(vision {1e3 * r['vision_median_s']:8.1f}, attention {100 * r['attention_share_of_llm']:4.1f}%, "
              f"selection {100 * r['selection_share_of_llm']:4.1f}% of LLM) "
              f"peak {r['peak_memory_gib']:6.1f} GiB", flush=True)
        if "part_floors_s" in r:
            print(f"           rank {r['timed_rank']} parts, measured / floor ms: " + ", ".join(
                f"{p} {1e3 * r['parts_median_s'][p]:.1f}/{1e3 * r['part_floors_s'][p]:.1f}"
                for p in r["parts_median_s"]) + f"; total {1e3 * r['ttft_median_s']:.1f}/"
                f"{1e3 * r['timed_rank_floor_s']:.1f} (x{r['ttft_median_s'] / r['timed_rank_floor_s']:.2f})", flush=True)
        if r.get("predicted"):
            pr = r["predicted"]
            print(f"           PREDICTED TTFT (a prediction, not a measurement) {1e3 * pr['ttft_s']:.1f} ms: this "
                  f"rank's measured time + vision all-gather {1e3 * pr['vision_gather_s']:.1f} ms at the 4xH200 "
                  f"measured all-gather rates (layer collectives {1e3 * pr['layer_comm_s']:.1f} ms, overlapped; "
                  f"{1e3 * pr['ttft_no_overlap_s']:.1f} ms if none overlapped)", flush=True)


def _speedups(results):
    for runs in results["runs"].values():
        for base in ("full", "ring", "apb"):
            if base in runs:
                for r in runs.values():
                    r[f"speedup_vs_{base}"] = runs[base]["ttft_median_s"] / r["ttft_median_s"]


def _save(rank, args, results):
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _table(results):
    print(f"\n{results.get('model', _families.DEFAULT)} {results['shape']}-shaped, {results['world']} x "
          f"{results['device']}: TTFT median (s) and speedups")
    w = max([24] + [len(a) for runs in results["runs"].values() for a in runs])
    rates = results.get("rates")
    if rates:
        print(f"floor: the busiest rank's FLOPs at GEMM {rates['gemm_flops_per_s'] / 1e12:.3g} and causal "
              f"attention {rates['attention_flops_per_s'] / 1e12:.3g} TFLOP/s (measured in this run)")
    print(f"{'n':>8} {'algo':<{w}} {'TTFT':>8} {'floor':>8} {'/floor':>7} {'vision':>8} {'vs full':>8} "
          f"{'vs ring':>8} {'vs apb':>8} {'mem GiB':>8}")
    for n, runs in results["runs"].items():
        for algo, r in runs.items():
            fmt = lambda k: f"{r[k]:8.2f}" if k in r else f"{'-':>8}"  # noqa: E731
            f = r.get("roofline")
            floor = f"{f['floor_s']:8.3f} {r['ttft_median_s'] / f['floor_s']:7.2f}" if f else f"{'-':>8} {'-':>7}"
            print(f"{n:>8} {algo:<{w}} {r['ttft_median_s']:8.3f} {floor} {r['vision_median_s']:8.3f} "
                  f"{fmt('speedup_vs_full')} {fmt('speedup_vs_ring')} {fmt('speedup_vs_apb')} "
                  f"{r['peak_memory_gib']:8.1f}")


def _parts_table(results):
    """Markdown: per (n, algo) the timed rank's time per part against its floor."""
    from megatron_spava.perf.emulate import PARTS
    rows = [(n, a, r) for n, runs in results["runs"].items() for a, r in runs.items() if "part_floors_s" in r]
    if not rows:
        return
    em = results.get("emulated")
    print(f"\nper part, the timed rank ({'emulated rank of ' + str(em['cp']) if em else 'CP rank 0'}): "
          f"measured ms / floor ms (ratio)")
    print("| n | algo | rank | " + " | ".join(PARTS) + " | total | predicted TTFT ms |")
    print("|---|---|---|" + "---|" * (len(PARTS) + 2))
    for n, a, r in rows:
        cells = [f"{1e3 * r['parts_median_s'][p]:.1f} / {1e3 * r['part_floors_s'][p]:.1f} "
                 f"({r['part_ratios'][p]:.2f})" for p in PARTS]
        total = f"{1e3 * r['ttft_median_s']:.1f} / {1e3 * r['timed_rank_floor_s']:.1f} " \
                f"({r['ttft_median_s'] / r['timed_rank_floor_s']:.2f})"
        pred = f"{1e3 * r['predicted']['ttft_s']:.1f} (prediction)" if r.get("predicted") else "-"
        print(f"| {n} | {a} | {r['timed_rank']} | " + " | ".join(cells) + f" | {total} | {pred} |")
    pairs = [(n, a, runs[a], runs[f"{a}@fp8"]) for n, runs in results["runs"].items() for a in runs
             if f"{a}@fp8" in runs and "parts_median_s" in runs[a]]
    if pairs:
        print("\nFP8 against bf16, same run (bf16 / FP8 time):")
        print("| n | algo | dense layers | TTFT |")
        print("|---|---|---|---|")
        for n, a, b, f in pairs:
            print(f"| {n} | {a} | {b['parts_median_s']['dense'] / f['parts_median_s']['dense']:.2f}x | "
                  f"{b['ttft_median_s'] / f['ttft_median_s']:.2f}x |")


def _plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    algos = sorted({a for runs in results["runs"].values() for a in runs})
    for algo in algos:
        pts = [(int(n), r[algo]["speedup_vs_full"]) for n, r in results["runs"].items()
               if algo in r and "speedup_vs_full" in r[algo]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=algo)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LLM tokens")
    ax.set_ylabel("TTFT speedup vs full (1 GPU)")
    family = _families.get_family(results.get("model", _families.DEFAULT)).title
    ax.set_title(f"{family} {results['shape']}-shaped prefill, {results['world']} GPUs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    from megatron_spava.launch import quiet_known_warnings
    quiet_known_warnings("--verbose" in sys.argv[1:], announce="RANK" not in os.environ)
    sys.exit(main())
