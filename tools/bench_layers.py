#!/usr/bin/env python3
"""Transformer layers on Transformer Engine vs megatron-core's local layers, one GPU, with
the roofline floor measured in the same run. One table, one JSON.

    python tools/bench_layers.py --json layers.json                       # 7B shape, 32K and 128K
    python tools/bench_layers.py --device cpu --shape tiny --tokens 512 \\
        --impls local --algos full --json /tmp/x.json                     # CPU dry run of the tool

For each --transformer-impl (local, transformer_engine) and each algorithm at CP=1
(full: our core attention, exact causal, the fastest measured kernel; megatron: TE's own
DotProductAttention, i.e. Megatron's context-parallel attention at CP=1) it builds a
GPTModel with --layers layers of the Qwen2.5-7B language model's shape (hidden 3584,
28 query / 4 KV heads of 128, SwiGLU 18944, QKV bias, RMSNorm, RoPE, bf16) and times the
decoder's forward on [S, 1, hidden] hidden states (RoPE included; embedding and output
layer excluded): the median of --repeats after --warmup, CUDA-synchronised.

Floor: the same run times the layer's four GEMMs alone (torch.nn.functional.linear on the
layer's shapes: QKV, output projection, gate|up, down) and causal attention alone at that
length (the faster of SDPA's cuDNN kernel and TE's DotProductAttention), and adds them per
layer. Elementwise work (norms, RoPE, SwiGLU, residuals) is not in the floor, so
median / floor > 1 is what the layers spend beyond their GEMMs and attention.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_spava.perf.kernels import _median_ms, attention_floor_ms, gemm_floor_ms
from megatron_spava.provenance import git_commit


SHAPES = {  # Qwen2.5-VL-7B's language model; tiny for CPU dry runs
    "7b": dict(hidden_size=3584, num_attention_heads=28, num_query_groups=4, kv_channels=128,
               ffn_hidden_size=18944),
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                 ffn_hidden_size=128),
}
IMPLS = ("local", "transformer_engine")
ALGOS = ("full", "megatron")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="(default: %(default)s)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers (default: %(default)s)")
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072],
                   help="sequence lengths S (default: %(default)s)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), metavar="IMPL",
                   help=f"--transformer-impl values from {IMPLS} (default: both)")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS), metavar="ALGO",
                   help=f"from {ALGOS} (default: both; megatron needs TE)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="(default: %(default)s)")
    p.add_argument("--json", required=True, help="write the results here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or args.warmup < 0 or min(args.tokens) < 2:
        p.error("--layers and --repeats must be >= 1, --warmup >= 0, --tokens >= 2")
    from megatron_spava.specs import te_available
    needs_te = "transformer_engine" in args.impls or "megatron" in args.algos
    if needs_te and not te_available():
        p.error("transformer_engine layers and the megatron algorithm need Transformer Engine, "
                "which does not import here: pass --impls local --algos full")
    if needs_te and args.device != "cuda":
        p.error("Transformer Engine runs on CUDA only: pass --impls local --algos full with --device cpu")
    return args


def build(impl, algo, shape, layers, S, dtype, device):
    from megatron_spava.algos.megatron import core_attention_for
    from megatron_spava.models.gpt import build_gpt_model, gpt_config
    cuda = device.type == "cuda"
    config = gpt_config(num_layers=layers, dtype=dtype, add_qkv_bias=True,
                        use_cpu_initialization=not cuda, **shape)
    with torch.device(device):
        return build_gpt_model(config, vocab_size=1024, max_sequence_length=S, algo="spava",
                               backend=impl, core_attention=core_attention_for(algo, "p2p"),
                               rotary_base=1000000).to(device)


def time_layers(model, algo, S, shape, dtype, device, warmup, repeats):
    from megatron_spava.algos import plan_layout
    from megatron_spava.algos.megatron import MegatronLayout
    from megatron_spava.context import cp_request
    if algo == "megatron":
        layout = MegatronLayout.plan(context_len=S - 1, query_len=1, cp_size=1)
    else:
        layout = plan_layout("full", context_len=S - 1, query_len=1, cp_size=1)
    hidden = torch.randn(S, 1, shape["hidden_size"], device=device, dtype=dtype) * 0.5
    positions = torch.arange(S, device=device)

    @torch.no_grad()
    def run():
        with cp_request(layout, positions=positions):
            rotary = model.rotary_pos_emb(S)
            model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)

    return _median_ms(run, device, warmup, repeats)


def main(argv=None):
    args = parse_args(argv)
    from megatron_spava import cpu_compat
    from megatron_spava.models.common.checkpoint_io import single_process_parallel_state
    from megatron_spava.specs import te_available
    device = torch.device(args.device)
    cpu_compat.apply()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    te = te_available() and device.type == "cuda"
    result = dict(tool="bench_layers", shape=args.shape, layers=args.layers, dtype=str(dtype),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), commit=git_commit(short=True),
                  transformer_engine=None, floor={}, runs=[])
    if te:
        import transformer_engine
        result["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
    with single_process_parallel_state():
        for S in args.tokens:
            gemm_ms, gemm_flops = gemm_floor_ms(shape, S, dtype, device, args.warmup, args.repeats)
            attn, attn_flops = attention_floor_ms(shape, S, dtype, device, args.warmup, args.repeats, te)
            best = min(attn.values())
            result["floor"][str(S)] = dict(
                gemm_ms=gemm_ms, gemm_tflops=gemm_flops / gemm_ms / 1e9,
                attention_ms=attn, attention_tflops={k: attn_flops / v / 1e9 for k, v in attn.items()},
                layer_floor_ms=gemm_ms + best)
            print(f"S={S}: GEMMs {gemm_ms:.2f} ms ({gemm_flops / gemm_ms / 1e9:.0f} TFLOP/s), attention "
                  + ", ".join(f"{k} {v:.2f} ms ({attn_flops / v / 1e9:.0f} TFLOP/s)" for k, v in attn.items()),
                  flush=True)
            for impl in args.impls:
                for algo in args.algos:
                    model = build(impl, algo, shape, args.layers, S, dtype, device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    ms, times = time_layers(model, algo, S, shape, dtype, device, args.warmup, args.repeats)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
                    floor = args.layers * result["floor"][str(S)]["layer_floor_ms"]
                    row = dict(tokens=S, transformer_impl=impl, algo=algo, median_ms=ms, all_ms=times,
                               floor_ms=floor, median_over_floor=ms / floor, peak_memory_gib=peak)
                    result["runs"].append(row)
                    print(f"S={S:>7} {impl:<18} {algo:<9} {ms:9.2f} ms  (floor {floor:8.2f} ms, "
                          f"x{ms / floor:.2f})" + (f"  peak {peak:.1f} GiB" if peak is not None else ""),
                          flush=True)
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=1)
    print_table(result)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return result


def print_table(result):
    print(f"\n{result['layers']} x {result['shape']}-shaped layer(s), {result['dtype']}, {result['device']}, "
          f"torch {result['torch']}, TE {result['transformer_engine']}, commit {result['commit']}")
    print("| tokens | transformer impl | algo | median ms | floor ms | median / floor | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"| {r['tokens']} | {r['transformer_impl']} | {r['algo']} | {r['median_ms']:.1f} | "
              f"{r['floor_ms']:.1f} | {r['median_over_floor']:.2f} | {peak} |")


if __name__ == "__main__":
    main()
