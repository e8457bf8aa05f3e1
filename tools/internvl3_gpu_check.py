#!/usr/bin/env python3
"""InternVL3-2B-shaped model with random weights on the GPU: video prefill plus
--new-tokens greedy tokens under full attention and under Spava, and a check that Spava's
first-token logits at full budget equal full attention's within bf16 noise.

    python tools/internvl3_gpu_check.py                 # one GPU: the CP ranks share it (gloo)
    python tools/internvl3_gpu_check.py --cp 4 --frames 96 --json out.json

Each run starts fresh processes (megatron_spava.testing.run_ranks) and builds the released
InternVL3-2B shape (InternViT-300M, 24 layers; Qwen2.5-1.5B LLM, 28 layers, 12/2 heads,
vocab 151674) with the same random weights (bf16-representable, so the float32 model is
the same model). The prompt is HF's video layout, `Frame{i}: <img><IMG_CONTEXT>*256</img>`
per 448x448 frame, plus a question; frames are random pixels.
  reference        full attention in float32 (TF32 off), 1 rank
  full             full attention in bf16, 1 rank
  spava-full       Spava in bf16 on --cp ranks, passing budget >= every block (exact)
  spava-default    Spava in bf16 on --cp ranks, SPAVA.md's default budgets (approximate)
Reported: tokens, first-token logits' relative error against the reference, time to first
token and decode time (meaningless when ranks share one GPU). With fewer GPUs than --cp
ranks the ranks run over gloo on GPU 0 (gloo's all-gather, all-reduce and broadcast take
CUDA tensors; Spava and the decode use only those). Exit status 1 when spava-full's error
exceeds twice full's (bf16) error plus 1e-3.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=2,
                   help="context-parallel ranks for spava (default: %(default)s)")
    p.add_argument("--frames", type=int, default=48,
                   help="video frames, 256 LLM tokens each (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens (default: %(default)s)")
    p.add_argument("--shape", choices=["2b", "tiny"], default="2b",
                   help="tiny: a dry run of this tool on small sizes (default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with one GPU per rank when there are enough, else gloo "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: gloo ranks on the CPU, to check this tool itself (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def _config(shape: str):
    from megatron_spava.models.internvl3 import InternVL3Config
    from megatron_spava.models.internvl3.tiny import shaped_hf_config, tiny_hf_config
    return InternVL3Config.from_hf(tiny_hf_config() if shape == "tiny" else shaped_hf_config(shape))


def synthetic_inputs(cfg, frames: int, seed: int):
    """HF's video prompt layout with ordinary text tokens around it, and random tiles."""
    from megatron_spava.video.inputs import InternVLInputs
    gen = torch.Generator().manual_seed(seed)
    start, end = cfg.image_token_id - 2, cfg.image_token_id - 1  # <img>, </img> in InternVL's vocabulary
    text = lambda n: torch.randint(0, 200, (n,), generator=gen).tolist()  # noqa: E731
    ids = text(4)  # <|im_start|>user\n
    for _ in range(frames):  # "Frame{i}: <img><IMG_CONTEXT>*256</img>\n"
        ids += text(4) + [start] + [cfg.image_token_id] * cfg.tokens_per_tile + [end] + text(1)
    ids += text(24)  # question, <|im_end|>\n<|im_start|>assistant\n
    size = cfg.vision.image_size
    pixels = torch.randn(frames, 3, size, size, generator=gen)
    return InternVLInputs(torch.tensor([ids]), pixels)


def build(cfg, cp: int, dtype: torch.dtype, seed: int, device: torch.device):
    """The model on this rank's GPU with deterministic random weights: every parameter drawn
    from a generator seeded by its index, rounded to bf16 (so the float32 model holds the
    same values), scaled like an initialised model (norms 1, layer scales 0.1)."""
    from megatron_spava.launch import model_parallel_state
    from megatron_spava.models.internvl3 import InternVL3Model

    ps = model_parallel_state(1, cp)
    with torch.device(device):
        model = InternVL3Model(cfg, context_parallel=cp, dtype=dtype, use_cpu_initialization=False,
                               perform_initialization=False).eval()
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            gen.manual_seed(seed * 100003 + i)
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            if "lambda" in name:
                value = 0.1 + 0.01 * noise
            elif name.endswith("weight") and ("norm" in name or p.dim() == 1):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            p.copy_(value.to(torch.bfloat16).to(dtype))
    return model, ps.get_context_parallel_group()


def _rank(shape, cp, dtype_name, algo, budget, frames, new_tokens, seed, device_type):
    from megatron_spava import SpavaConfig, cpu_compat
    from megatron_spava.inference.generate import generate

    cuda = device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        cpu_compat.apply()
    dtype = getattr(torch, dtype_name)
    if dtype == torch.float32:  # a true float32 reference: no TF32 in convolutions or GEMMs
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = _config(shape)
    model, group = build(cfg, cp, dtype, seed, device)
    inputs = synthetic_inputs(cfg, frames, seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = generate(model, inputs, algo=algo, config=SpavaConfig(**budget), cp_group=group,
                   max_new_tokens=new_tokens, eos_token_ids=[])
    return dict(tokens=out.tokens, first_logits=out.first_logits.float(), ttft_s=out.ttft_s,
                decode_s=out.decode_s, prompt_tokens=inputs.input_ids.shape[1],
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("internvl3_gpu_check: needs CUDA (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    from megatron_spava.config import round_up
    from megatron_spava.testing import run_ranks

    if args.frames < args.cp:
        raise SystemExit(f"--frames {args.frames} < --cp {args.cp}: frame parallelism needs a frame per rank")
    backend = args.backend
    if backend == "auto":
        cuda = args.device == "cuda"
        backend = "nccl" if cuda and torch.cuda.device_count() >= args.cp else "gloo"
    cfg = _config(args.shape)
    n = synthetic_inputs(cfg, args.frames, args.seed).input_ids.shape[1]
    runs = {  # name: (ranks, dtype, algo, budget)
        "reference": (1, "float32", "full", {}),
        "full": (1, "bfloat16", "full", {}),
        "spava-full": (args.cp, "bfloat16", "spava", dict(passing_len=round_up(n, 128))),
        "spava-default": (args.cp, "bfloat16", "spava", {}),
    }
    # the ranks import their function by module name: this file's, not __main__'s
    rank_fn = importlib.import_module(os.path.splitext(os.path.basename(__file__))[0])._rank
    results = {}
    for name, (ranks, dtype, algo, budget) in runs.items():
        outs = run_ranks(rank_fn, ranks, args.shape, ranks, dtype, algo, budget, args.frames,
                         args.new_tokens, args.seed, args.device,
                         backend="nccl" if ranks > 1 and backend == "nccl" else "gloo",
                         timeout=600)
        assert all(torch.equal(o["first_logits"], outs[0]["first_logits"])
                   and o["tokens"] == outs[0]["tokens"] for o in outs), f"{name}: ranks disagree"
        results[name] = dict(outs[0], ttft_s=max(o["ttft_s"] for o in outs),
                             peak_gib=max(o["peak_gib"] for o in outs), ranks=ranks)
        print(f"{name}: done ({ranks} rank(s), {results[name]['ttft_s']:.2f} s to first token)", flush=True)
    ref = results["reference"]["first_logits"]
    device = (f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}" if args.device == "cuda"
              else "CPU")
    print(f"\nInternVL3-{args.shape} random weights, {args.frames} frames, {n} prompt tokens, "
          f"CP={args.cp} over {backend}, {device}")
    print(f"{'run':14s} {'ranks':>5s} {'rel.err vs fp32':>16s} {'= full bf16 tokens':>19s} "
          f"{'TTFT s':>7s} {'decode s':>8s} {'peak GiB':>8s}")
    full_tokens = results["full"]["tokens"]
    for name, r in results.items():
        r["rel_err_vs_reference"] = relative_error(r["first_logits"], ref)
        same = sum(a == b for a, b in zip(r["tokens"], full_tokens))
        print(f"{name:14s} {r['ranks']:5d} {r['rel_err_vs_reference']:16.3e} "
              f"{same:>8d}/{len(full_tokens):<10d} {r['ttft_s']:7.2f} {r['decode_s']:8.2f} "
              f"{r['peak_gib']:8.1f}")
    noise, err = results["full"]["rel_err_vs_reference"], results["spava-full"]["rel_err_vs_reference"]
    ok = err <= 2 * noise + 1e-3
    print(f"\nspava at full budget vs float32: {err:.3e}; full bf16 vs float32 (bf16 noise): {noise:.3e} "
          f"-> {'OK' if ok else 'FAIL'} (limit 2 x noise + 1e-3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "prompt_tokens": n, "backend": backend, "ok": ok,
                       "device": device,
                       "runs": {k: {kk: vv for kk, vv in v.items() if kk != "first_logits"}
                                for k, v in results.items()}}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
