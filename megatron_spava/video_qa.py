"""Video question answering with Qwen2.5-VL under TP x CP and --context-parallel-algo.

    megatron-spava-demo                       # tiny offline checkpoint + synthetic video, 2 CPU ranks
    megatron-spava-demo --hf-path Qwen2.5-VL-7B-Instruct --video clip.mp4 --question "..." \\
        --device cuda --bf16 --context-parallel-size 4
    torchrun --nproc-per-node 4 -m megatron_spava.video_qa --tensor-model-parallel-size 2 \\
        --context-parallel-size 2 --context-parallel-algo spava ...

Without --hf-path/--megatron-path it writes a tiny random Qwen2.5-VL-architecture
checkpoint (config and tokenizer made in code) and a synthetic mp4 under --work-dir and
answers a question about it: the answer is noise, the pipeline is real. It prints the
answer, time to first token (vision + prefill), decode speed and, with --compare full
(the default), the same prompt under exact attention on one CP rank: the timing and the
agreement of the first-token logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from .algos import config_for
from .arguments import add_spava_args, spava_config_from_args
from .launch import init_distributed, relaunch, under_torchrun
from .specs import add_transformer_impl_arg, backend_for_impl, resolve_transformer_impl

DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "megatron_spava")
DEFAULT_QUESTION = "What is happening in this video?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-spava-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--hf-path", help="HF Qwen2.5-VL checkpoint directory (converted on the fly)")
    src.add_argument("--megatron-path", help="a checkpoint made by tools/convert_checkpoint.py "
                     "hf-to-megatron (holds the tokenizer and processor configs too)")
    src.add_argument("--model-shape", choices=["tiny", "3b", "7b"], default="tiny",
                     help="without a checkpoint: the generated model's shape; 3b/7b are the "
                          "released Qwen2.5-VL shapes and need --random-weights (default: %(default)s)")
    src.add_argument("--random-weights", action="store_true",
                     help="random weights (seeded, the same in every run) instead of the checkpoint's")
    src.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    src.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                     help="where the tiny checkpoint and synthetic video go (default: %(default)s)")
    src.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    src.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    vid = p.add_argument_group("video and question")
    vid.add_argument("--video", help="video file (mp4, mkv, webm, ...); default: a synthetic mp4")
    vid.add_argument("--frames-dir", help="a directory of frame images instead of --video")
    vid.add_argument("--frames-fps", type=float, default=2.0,
                     help="frame rate of --frames-dir (default: %(default)s)")
    vid.add_argument("--fps", type=float, default=2.0,
                     help="frames sampled per second of video (default: %(default)s)")
    vid.add_argument("--max-frames", type=int, default=768, help="(default: %(default)s)")
    vid.add_argument("--question", action="append", dest="questions", metavar="QUESTION",
                     help=f"the question (default: {DEFAULT_QUESTION!r}). Give it several times to "
                          f"ask several questions about one video: the video context is prefilled "
                          f"once and each question answered over the cached context (the "
                          f"two-pass prefill of --spava-no-fuse-query), with a report per question")
    run = p.add_argument_group("parallelism and decoding")
    run.add_argument("--tensor-model-parallel-size", type=int, default=1)
    run.add_argument("--context-parallel-size", type=int, default=2)
    run.add_argument("--nproc", type=int, default=None,
                     help="ranks to launch when not under torchrun (default: TP x CP)")
    run.add_argument("--shard-weights", action="store_true",
                     help="keep 1/CP of each language-model layer's weights per rank and gather "
                          "them layer by layer (less memory, one all-gather per layer)")
    run.add_argument("--max-new-tokens", type=int, default=16, help="(default: %(default)s)")
    run.add_argument("--compare", choices=["full", "none"], default="full",
                     help="also run exact attention without CP and compare (default: %(default)s)")
    run.add_argument("--rope-convention", choices=["qwen", "hf"], default="qwen",
                     help="text-after-video M-RoPE rule: Qwen's original (as trained) or "
                          "transformers 5.x (default: %(default)s)")
    run.add_argument("--json", help="write the results as JSON here")
    run.add_argument("--save-logits", help="save each run's first-token logits (torch.save) here")
    add_spava_args(p)
    add_transformer_impl_arg(p)
    p.set_defaults(context_parallel_algo="spava")
    return p


def resolve_paths(args) -> str:
    """Fill in the default video path; return the checkpoint directory. Pure."""
    if not args.video and not args.frames_dir:
        args.video = os.path.join(args.work_dir, "synthetic.mp4")
    name = "tiny-qwen2.5-vl" if args.model_shape == "tiny" else f"qwen2.5-vl-{args.model_shape}-shape"
    return args.hf_path or args.megatron_path or os.path.join(args.work_dir, name)


def create_defaults(args, checkpoint: str) -> None:
    """Write the tiny checkpoint and the synthetic video when they are the ones asked for."""
    if args.hf_path or args.megatron_path:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    else:
        from .models.qwen2_5_vl.tiny import make_tiny_checkpoint
        make_tiny_checkpoint(checkpoint, shape=None if args.model_shape == "tiny" else args.model_shape)
    if args.video == os.path.join(args.work_dir, "synthetic.mp4") and not os.path.isfile(args.video):
        from .video import write_synthetic_video
        os.makedirs(args.work_dir, exist_ok=True)
        write_synthetic_video(args.video, frames=128, height=224, width=224, fps=8)


def _setup_parallel(tp: int, cp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_rng_tracker(inference_rng_tracker=True)
    return ps


def _build_model(args, checkpoint: str, tp: int, cp: int, device, algo: str):
    from .algos.megatron import core_attention_for
    from .models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from .models.qwen2_5_vl.convert import load_dist_into_model, load_hf_into_model

    ps = _setup_parallel(tp, cp)
    cfg = Qwen25VLConfig.from_hf(checkpoint)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    layers = dict(backend=backend_for_impl(args.transformer_impl),
                  core_attention=core_attention_for(algo, args.cp_comm_type))
    if args.random_weights:  # the same seed everywhere: equal weights on every CP rank and run
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(args.seed)
        with torch.device(device):
            model = Qwen25VLModel(cfg, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                                  use_cpu_initialization=device.type == "cpu", **layers)
        return model.to(device).eval(), ps
    model = Qwen25VLModel(cfg, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                          use_cpu_initialization=True, perform_initialization=False, **layers)
    if args.megatron_path:
        load_dist_into_model(model, checkpoint)
    else:
        load_hf_into_model(model, checkpoint, tp_rank=ps.get_tensor_model_parallel_rank(),
                           tp_size=tp, progress=dist.get_rank() == 0)
    return model.to(device).eval(), ps


def _run_one(args, checkpoint, inputs, algo: str, tp: int, cp: int, device, config):
    from .models.qwen2_5_vl.generate import generate

    model, ps = _build_model(args, checkpoint, tp, cp, device, algo)
    if args.shard_weights:
        model.shard_weights(ps.get_context_parallel_group())
    kwargs = dict(algo=algo, config=config, cp_group=ps.get_context_parallel_group(),
                  rope_convention=args.rope_convention, device=device)
    generate(model, inputs, max_new_tokens=2, **kwargs)  # warm-up: kernels, allocator
    out = generate(model, inputs, max_new_tokens=args.max_new_tokens, **kwargs)
    del model
    return out


def run(args) -> dict:
    from .video import load_video
    from .video.prompt import VideoPrompter

    if len(args.questions) > 1:
        return run_questions(args)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    args.transformer_impl = resolve_transformer_impl(args.transformer_impl, device)
    checkpoint = resolve_paths(args)
    clip = load_video(args.frames_dir or args.video, fps=args.fps, max_frames=args.max_frames,
                      frames_fps=args.frames_fps)
    prompter = VideoPrompter(checkpoint)
    inputs = prompter(clip, args.question)
    config = spava_config_from_args(args)
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    from .placement import check_video_qa
    check_video_qa(args, checkpoint, inputs)  # placement and fit, before the model is built
    runs = {args.context_parallel_algo: _run_one(args, checkpoint, inputs, args.context_parallel_algo,
                                                 tp, cp, device, config)}
    if args.compare == "full" and args.context_parallel_algo != "full":
        runs["full"] = _run_one(args, checkpoint, inputs, "full", tp, 1, device, config)
    video_tokens = int((inputs.input_ids == prompter.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    result = dict(
        checkpoint=checkpoint, video=clip.source, frames=len(clip.frames), sampled_fps=clip.fps,
        prompt_tokens=int(inputs.input_ids.shape[1]), video_tokens=video_tokens,
        processor_backend=prompter.backend, processor_fallback_reason=prompter.fallback_reason,
        question=args.question, transformer_impl=args.transformer_impl, runs={})
    for name, out in runs.items():
        layout = out.layout
        result["runs"][name] = dict(
            tp=tp, cp=cp if name != "full" else 1, tokens=out.tokens,
            answer=prompter.tokenizer.decode(out.tokens, skip_special_tokens=True),
            ttft_s=out.ttft_s, vision_s=out.timings["vision_s"],
            decode_tokens_per_s=(len(out.tokens) - 1) / out.decode_s if len(out.tokens) > 1 and out.decode_s > 0 else None,
            tokens_per_rank=int(layout.local_len(0)),
            anchor_len=getattr(layout, "anchor_len", None), passing_len=getattr(layout, "passing_len", None))
    if "full" in runs and len(runs) > 1:
        main = runs[args.context_parallel_algo]
        diff = (main.first_logits - runs["full"].first_logits).abs()
        result["first_logits_max_abs_diff"] = float(diff.max())
        result["first_logits_rel_err"] = float(diff.norm() / runs["full"].first_logits.norm())
        result["same_answer"] = main.tokens == runs["full"].tokens
    if rank == 0 and args.save_logits:
        torch.save({name: out.first_logits for name, out in runs.items()}, args.save_logits)
    if rank == 0:
        print_report(result, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


def _answer_questions(args, checkpoint, inputs, queries, algo: str, tp: int, cp: int, device, config):
    from .models.qwen2_5_vl.generate import answer_questions

    model, ps = _build_model(args, checkpoint, tp, cp, device, algo)
    if args.shard_weights:
        model.shard_weights(ps.get_context_parallel_group())
    kwargs = dict(algo=algo, config=config, cp_group=ps.get_context_parallel_group(),
                  rope_convention=args.rope_convention, device=device)
    answer_questions(model, inputs, queries[:1], max_new_tokens=2, **kwargs)  # warm-up
    outs = answer_questions(model, inputs, queries, max_new_tokens=args.max_new_tokens, **kwargs)
    del model
    return outs


def run_questions(args) -> dict:
    """Several --question about one video: one context prefill, every question answered over
    the cached context; a row per question and algorithm."""
    from dataclasses import replace

    from .models.qwen2_5_vl.generate import split_prompt
    from .video import load_video
    from .video.prompt import VideoPrompter

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    args.transformer_impl = resolve_transformer_impl(args.transformer_impl, device)
    checkpoint = resolve_paths(args)
    clip = load_video(args.frames_dir or args.video, fps=args.fps, max_frames=args.max_frames,
                      frames_fps=args.frames_fps)
    prompter = VideoPrompter(checkpoint)
    prompts = [prompter(clip, question) for question in args.questions]
    vision_end = prompter.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    splits = [split_prompt(p.input_ids, vision_end) for p in prompts]
    context = splits[0][0]
    if any(not torch.equal(c, context) for c, _ in splits):
        raise ValueError("the questions' prompts do not share the tokens before the question")
    inputs, queries = replace(prompts[0], input_ids=context), [q for _, q in splits]
    config = spava_config_from_args(args)
    tp, cp, algo = args.tensor_model_parallel_size, args.context_parallel_size, args.context_parallel_algo
    runs = {algo: _answer_questions(args, checkpoint, inputs, queries, algo, tp, cp, device, config)}
    if args.compare == "full" and algo != "full":
        runs["full"] = _answer_questions(args, checkpoint, inputs, queries, "full", tp, 1, device, config)
    result = dict(checkpoint=checkpoint, video=clip.source, frames=len(clip.frames),
                  context_tokens=int(context.shape[1]), questions=list(args.questions), runs={})
    for name, outs in runs.items():
        result["runs"][name] = [dict(
            tp=tp, cp=cp if name != "full" else 1, tokens=out.tokens, query_tokens=int(q.shape[1]),
            answer=prompter.tokenizer.decode(out.tokens, skip_special_tokens=True),
            ttft_s=out.ttft_s, **out.timings,
            decode_tokens_per_s=(len(out.tokens) - 1) / out.decode_s if len(out.tokens) > 1 and out.decode_s > 0 else None)
            for out, q in zip(outs, queries)]
    if "full" in runs and len(runs) > 1:
        for row, out, ref in zip(result["runs"][algo], runs[algo], runs["full"]):
            diff = (out.first_logits - ref.first_logits).abs()
            row["first_logits_max_abs_diff_vs_full"] = float(diff.max())
            row["first_logits_rel_err_vs_full"] = float(diff.norm() / ref.first_logits.norm())
            row["same_answer_as_full"] = out.tokens == ref.tokens
    if rank == 0 and args.save_logits:
        torch.save({name: [o.first_logits for o in outs] for name, outs in runs.items()}, args.save_logits)
    if rank == 0:
        print(f"\nVideo QA, {len(queries)} questions over one cached context: {result['video']} "
              f"({result['frames']} frames, {result['context_tokens']} context tokens)")
        print("ttft ms: the first question pays vision + context prefill; later ones the query pass only")
        for i, question in enumerate(args.questions):
            print(f"question {i + 1}: {question!r}")
            for name, rows in result["runs"].items():
                r = rows[i]
                vs = (f"  logits vs full: rel err {r['first_logits_rel_err_vs_full']:.2e}, same answer "
                      f"{r['same_answer_as_full']}" if "first_logits_rel_err_vs_full" in r else "")
                print(f"  {name:<8} {r['tp']}x{r['cp']} ttft {1e3 * r['ttft_s']:8.1f} ms  answer "
                      f"{r['answer']!r} tokens {r['tokens']}{vs}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


def print_report(result: dict, args) -> None:
    print()
    print(f"Video QA: {result['video']} ({result['frames']} frames at {result['sampled_fps']:.2f} fps, "
          f"{result['video_tokens']} video tokens, {result['prompt_tokens']} prompt tokens; "
          f"processor: {result['processor_backend']}; layers: {result['transformer_impl']})")
    if result["processor_fallback_reason"]:
        print(f"(HF's processor not used: {result['processor_fallback_reason']})")
    print(f"question: {result['question']!r}")
    header = f"{'algorithm':<10} {'TPxCP':>6} {'tokens/rank':>11} {'TTFT ms':>9} {'vision ms':>9} {'decode tok/s':>12}  answer"
    print(header)
    print("-" * len(header))
    for name, r in result["runs"].items():
        tps = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        print(f"{name:<10} {r['tp']}x{r['cp']:<4} {r['tokens_per_rank']:>11} {1e3 * r['ttft_s']:>9.1f} "
              f"{1e3 * r['vision_s']:>9.1f} {tps:>12}  {r['answer']!r}")
    for name, r in result["runs"].items():
        print(f"{name} answer tokens: {r['tokens']}")
    if "first_logits_max_abs_diff" in result:
        print(f"first-token logits, {args.context_parallel_algo} vs full: max abs diff "
              f"{result['first_logits_max_abs_diff']:.2e}, relative error {result['first_logits_rel_err']:.2e}; "
              f"same answer: {result['same_answer']}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.questions = args.questions or [DEFAULT_QUESTION]
    args.question = args.questions[0]
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", args.nproc or tp * cp))
    try:
        if world != tp * cp:
            raise ValueError(f"{world} ranks for --tensor-model-parallel-size {tp} x "
                             f"--context-parallel-size {cp}: they must multiply to the world size")
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if args.model_shape != "tiny" and not args.random_weights and not (args.hf_path or args.megatron_path):
            raise ValueError(f"--model-shape {args.model_shape} has no weights to load: add --random-weights")
        config_for(args.context_parallel_algo, spava_config_from_args(args))  # presets may refuse
        resolve_transformer_impl(args.transformer_impl, args.device, verbose=False)
        checkpoint = resolve_paths(args)
        if not under_torchrun() or os.environ.get("RANK") == "0":
            create_defaults(args, checkpoint)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not under_torchrun():
        relaunch("megatron_spava.video_qa", world, argv)
        return 0
    init_distributed(args.device)
    try:
        dist.barrier()  # rank 0 has written the default checkpoint and video
        run(args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
