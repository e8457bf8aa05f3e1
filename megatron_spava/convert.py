#!/usr/bin/env python3
"""Convert Qwen2.5-VL, InternVL3 and Qwen3-VL checkpoints between Hugging Face and megatron-core.

    megatron-spava-convert hf-to-megatron --hf-path Qwen2.5-VL-7B-Instruct --out ckpt/
    megatron-spava-convert megatron-to-hf --megatron-path ckpt/ --out hf_again/
    (or python tools/convert_checkpoint.py ..., or python -m megatron_spava.convert ...)

hf-to-megatron writes a megatron-core distributed checkpoint (torch_dist format). It is
tensor-parallel agnostic: load it at any TP size (megatron-core reshards it), e.g. with
`megatron-spava-demo --megatron-path ckpt/ --tensor-model-parallel-size 2`.
--tensor-model-parallel-size only checks that heads, KV groups, vocabulary and MLP
widths divide. The tokenizer, processor configs and chat template are copied along.
megatron-to-hf writes safetensors with the source's key names (on-disk layout), so
HF -> megatron -> HF is bit-exact. Both stream tensor by tensor; peak memory is about
one copy of the model. Runs on CPU (the model's weights stay in CPU memory). The model
family (--model) is read from config.json's model_type unless given: qwen2_5_vl,
internvl3 (HF's "internvl", the OpenGVLab/InternVL3-*-hf format), or qwen3_vl (dense).
--out must be new or empty (--force replaces it whole) and outside the input. The output is
written into a temporary folder beside --out, read back and compared tensor for tensor with
the input, then renamed into place: an error, Ctrl-C or SIGTERM leaves --out as it was
(and ends the writer's helper processes). A damaged input is one line naming the file.
A converted checkpoint (either family) loads into either --transformer-impl (megatron-core's
local layers or Transformer Engine's, which fuse the layer norms into linear_qkv /
linear_fc1): both store the norms under the same keys. hf-to-megatron's --transformer-impl only picks the layers
the writer builds (default: transformer_engine where TE imports and CUDA exists, else local).
"""

from __future__ import annotations

import argparse
import os
import sys

from .models.registry import FAMILIES, resolve_family


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors directory -> megatron-core dist checkpoint")
    a.add_argument("--hf-path", required=True, help="HF Qwen2.5-VL or InternVL directory (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="output directory (created)")
    a.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="validate divisibility for this TP size (default: %(default)s)")
    from megatron_spava.specs import add_transformer_impl_arg
    add_transformer_impl_arg(a, cp_comm_type=False)
    b = sub.add_parser("megatron-to-hf", help="megatron-core dist checkpoint -> HF safetensors")
    b.add_argument("--megatron-path", required=True, help="a directory written by hf-to-megatron")
    b.add_argument("--out", required=True, help="output directory (created)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default: %(default)s)")
    for p in (a, b):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--force", action="store_true",
                       help="replace a non-empty --out whole (default: refuse it)")
        p.add_argument("--verbose", action="store_true", help="tracebacks and library warnings")
        p.add_argument("--model", choices=["auto", *FAMILIES], default="auto",
                       help="model family (default: from config.json's model_type)")
    args = parser.parse_args(argv)

    import torch
    from megatron_spava.launch import Interrupted, end_children_on_signals, quiet_known_warnings
    from megatron_spava.specs import backend_for_impl, resolve_transformer_impl

    quiet_known_warnings(args.verbose, announce=False)
    if not args.verbose:
        import warnings
        warnings.filterwarnings("ignore", message=".*DTensor instead.*", category=FutureWarning)
    inp = args.hf_path if args.direction == "hf-to-megatron" else args.megatron_path
    try:
        family = resolve_family(args.model, args.hf_path if args.direction == "hf-to-megatron"
                                else args.megatron_path)
        convert = family.convert()
        dist_to_hf, hf_to_dist = convert.dist_to_hf, convert.hf_to_dist
        if args.direction == "hf-to-megatron":
            if args.tensor_model_parallel_size < 1:
                raise ValueError("--tensor-model-parallel-size must be >= 1")
            impl = resolve_transformer_impl(args.transformer_impl,
                                            "cuda" if torch.cuda.is_available() else "cpu")
            # the checkpoint is the same for either backend; the writer's layers differ only
            # in where the norms live
            with end_children_on_signals():
                out = hf_to_dist(args.hf_path, args.out, tensor_parallel=args.tensor_model_parallel_size,
                                 progress=not args.no_progress, backend=backend_for_impl(impl),
                                 force=args.force)
        else:
            if not args.max_shard_gb > 0:
                raise ValueError("--max-shard-gb must be > 0")
            with end_children_on_signals():
                out = dist_to_hf(args.megatron_path, args.out,
                                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                                 progress=not args.no_progress, force=args.force)
    except Interrupted as sig:
        print(f"{parser.prog}: interrupted ({sig}); {args.out} was left as it was", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(128 + sig.signum)  # no interpreter teardown: its helper processes are gone
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as err:
        if args.verbose:
            import traceback
            traceback.print_exc()
        message = " ".join(str(err).split()) if isinstance(err, (FileNotFoundError, ValueError)) \
            else f"{type(err).__name__}: {' '.join(str(err).split())}"
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the dist checkpoint saver forks: keep the body under this guard
    from megatron_spava.launch import quiet_known_warnings
    quiet_known_warnings("--verbose" in sys.argv[1:], announce=False)
    sys.exit(main())
