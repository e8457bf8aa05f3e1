#!/usr/bin/env python3
"""Qwen2.5-VL vision encoder throughput on one GPU: our encoder with and without its
torch.compile'd elementwise stages, on the video the prefill benchmark feeds it.

    python tools/bench_vision.py --groups 128 --json vision.json --profile

--groups temporal groups of a 448x448 video (1024 patches each; 128 groups = one GPU's share
of a 128K-token prompt on 4 GPUs). Prints median / min / max ms over --repeats after
--warmup runs (the first compiles), patches per second, and the matrix-product and
attention FLOP rate; --profile adds the 20 costliest kernels of one run per variant.
Random bf16 weights at the released shape (the vision tower is the same in 3B and 7B
up to the merger's output width).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["3b", "7b"], default="7b", help="(default: %(default)s)")
    p.add_argument("--groups", type=int, nargs="+", default=[128],
                   help="temporal groups of 448x448 (1024 patches each) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--profile", action="store_true", help="print the costliest kernels per variant")
    p.add_argument("--json", help="write results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron_spava.models.common.checkpoint_io import single_process_parallel_state
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_spava.models.qwen2_5_vl.tiny import shaped_hf_config
    from megatron_spava.models.qwen2_5_vl.vision import VisionEncoder, vision_flops
    from megatron_spava.models.common.vision import vision_tp_config
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    device = torch.device("cuda")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), shape=args.shape, runs=[])
    with single_process_parallel_state():
        initialize_rng_tracker(inference_rng_tracker=True)
        torch.manual_seed(0)
        cfg = Qwen25VLConfig.from_hf(shaped_hf_config(args.shape))
        with torch.device(device):
            enc = VisionEncoder(cfg.vision, vision_tp_config(cfg.vision, 1, torch.bfloat16, False, True)).eval()
        for groups in args.groups:
            n = groups * 1024
            grid = torch.tensor([[groups, 32, 32]])
            pixels = torch.randn(n, cfg.vision.patch_dim, device=device)
            flops = vision_flops(cfg.vision, n, 1024)
            for variant in args.variants:
                enc.compile_elementwise = variant == "compiled"
                times = []
                with torch.no_grad():
                    for i in range(args.warmup + args.repeats):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        enc(pixels, grid)
                        torch.cuda.synchronize()
                        if i >= args.warmup:
                            times.append(time.perf_counter() - start)
                    torch.cuda.reset_peak_memory_stats()
                    enc(pixels, grid)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 30
                    if args.profile:
                        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                            enc(pixels, grid)
                            torch.cuda.synchronize()
                        print(f"--- {variant}, {groups} groups: costliest kernels")
                        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)
                med = statistics.median(times)
                run = dict(groups=groups, patches=n, variant=variant, median_ms=1e3 * med,
                           min_ms=1e3 * min(times), max_ms=1e3 * max(times),
                           patches_per_s=n / med, tflops=flops / med / 1e12, peak_gib=peak)
                results["runs"].append(run)
                print(f"{groups:5d} groups {n:8d} patches {variant:<9} median {run['median_ms']:8.1f} ms "
                      f"(min {run['min_ms']:.1f}, max {run['max_ms']:.1f})  {run['patches_per_s'] / 1e3:7.1f}K "
                      f"patches/s  {run['tflops']:6.1f} TFLOP/s  peak {peak:5.1f} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
