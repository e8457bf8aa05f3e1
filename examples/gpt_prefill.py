#!/usr/bin/env python3
"""Long-context prefill of a megatron-core GPTModel under TP x CP with any
--context-parallel-algo, on CPU ranks (gloo) or GPUs (NCCL). Launch with torchrun:

    torchrun --nproc-per-node 4 examples/gpt_prefill.py \\
        --tensor-model-parallel-size 2 --context-parallel-size 2 --context-parallel-algo spava

It builds a Llama/Qwen-style GPTModel (RMSNorm, SwiGLU, GQA, RoPE) with random
weights, shards a random prompt by the algorithm's layout, times the prefill (median
over --repeats after one warm-up, slowest rank) and, with --compare-full, checks the
logits against the same weights run with plain attention and no CP (exact at full
budget; anchor and rank-0 first-block rows exact at any budget).
Model and parallel flags use Megatron-LM's names.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_spava.arguments import add_spava_args, validate_spava_args  # noqa: E402
from megatron_spava.profiling import sync  # noqa: E402
from megatron_spava.specs import add_transformer_impl_arg, resolve_transformer_impl  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and parallelism (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--num-query-groups", type=int, default=2)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 * hidden size")
    g.add_argument("--seq-length", type=int, default=8192, help="prompt tokens, query included")
    g.add_argument("--vocab-size", type=int, default=1024)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    e = p.add_argument_group("run")
    e.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--compare-full", action="store_true",
                   help="also run the same weights with plain attention and no CP, and compare")
    e.add_argument("--seed", type=int, default=0)
    from megatron_spava.launch import add_distributed_timeout_arg
    add_distributed_timeout_arg(e)
    add_spava_args(p)
    add_transformer_impl_arg(p)
    args = p.parse_args(argv)
    if args.context_parallel_algo is None:
        p.error("--context-parallel-algo is required (full, ring, star, apb or spava)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != args.tensor_model_parallel_size * args.context_parallel_size:
        p.error(f"WORLD_SIZE={world} must equal --tensor-model-parallel-size x "
                f"--context-parallel-size = {args.tensor_model_parallel_size * args.context_parallel_size}")
    try:
        args.spava_config = validate_spava_args(args)
        resolve_transformer_impl(args.transformer_impl, args.device, verbose=False)
    except ValueError as err:
        p.error(str(err))
    return args


def build(args, cp: int, algo):
    """The model for `algo` at CP size `cp` (algo None: megatron-core's stock layers of the
    same --transformer-impl, the reference)."""
    from megatron.core import parallel_state as ps
    from megatron_spava.algos.megatron import core_attention_for
    from megatron_spava.models.gpt import build_gpt_model, gpt_config

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                 context_parallel_size=cp,
                                 distributed_timeout_minutes=args.distributed_timeout_minutes)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = gpt_config(num_layers=args.num_layers, hidden_size=args.hidden_size,
                        num_attention_heads=args.num_attention_heads,
                        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size,
                        tensor_parallel=args.tensor_model_parallel_size, context_parallel=cp,
                        dtype=dtype)
    model = build_gpt_model(config, vocab_size=args.vocab_size,
                            max_sequence_length=args.seq_length, algo=algo, seed=args.seed,
                            backend=args.transformer_impl,
                            core_attention=core_attention_for(algo, args.cp_comm_type))
    return model.to(device=args.device_obj, dtype=dtype)


def main(argv=None):
    from megatron_spava.launch import distributed_timeout, init_distributed

    args = parse_args(argv)
    try:
        timeout = distributed_timeout(args)
    except ValueError as err:
        raise SystemExit(f"gpt_prefill.py: error: {err}")
    args.device_obj = init_distributed(args.device, timeout=timeout)
    args.transformer_impl = resolve_transformer_impl(args.transformer_impl, args.device_obj)
    try:
        run(args, dist.get_rank())
    finally:
        dist.destroy_process_group()


def run(args, rank):
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import plan_layout
    from megatron_spava.models.gpt import cp_prefill

    S, lq = args.seq_length, args.spava_query_len
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, S),
                           generator=torch.Generator().manual_seed(args.seed)).to(args.device_obj)
    model = build(args, args.context_parallel_size, args.context_parallel_algo)
    layout = plan_layout(args.context_parallel_algo, context_len=S - lq, query_len=lq,
                         cp_size=args.context_parallel_size, config=args.spava_config)
    times = []
    for i in range(args.repeats + 1):
        sync(args.device)
        dist.barrier()
        start = time.perf_counter()
        logits, idx = cp_prefill(model, tokens, layout)
        sync(args.device)
        elapsed = torch.tensor([time.perf_counter() - start], device=args.device_obj)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i:
            times.append(float(elapsed))
    cp_rank = ps.get_context_parallel_rank()
    line = (f"{args.context_parallel_algo} on {args.transformer_impl} layers: "
            f"TP={args.tensor_model_parallel_size} x "
            f"CP={args.context_parallel_size}, {S} tokens ({lq} query), {idx.numel()} tokens on CP "
            f"rank {cp_rank}; prefill {1e3 * statistics.median(times):.1f} ms (median of "
            f"{args.repeats}, min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})")
    if rank == 0:
        print(line, flush=True)
    if not args.compare_full:
        return
    del model
    reference = build(args, 1, None)  # megatron-core's stock layers, same weights, no CP
    with torch.no_grad():
        ref = reference(tokens, torch.arange(S, device=tokens.device).expand_as(tokens), None)
    ref = ref[:, idx.to(ref.device)].float()
    diff = (logits.float() - ref).abs().amax(dim=(0, 2))  # per local row
    rows = {"query": slice(idx.numel() - lq, None), "all": slice(None)}
    if getattr(layout, "anchor_len", 0):
        rows["anchor"] = slice(0, layout.anchor_len)
    report = torch.tensor([float(diff[s].max()) if diff[s].numel() else 0.0 for s in rows.values()],
                          device=args.device_obj)
    dist.all_reduce(report, op=dist.ReduceOp.MAX)
    if rank == 0:
        print("max |logit - full| over ranks: " + ", ".join(
            f"{name} rows {value:.2e}" for name, value in zip(rows, report.tolist())), flush=True)


if __name__ == "__main__":
    main()
