"""Video question answering with Qwen2.5-VL, InternVL3 or Qwen3-VL under TP x CP and
--context-parallel-algo.

    megatron-spava-demo                       # shipped needle model + needle video, 2 CPU ranks
    megatron-spava-demo --hf-path Qwen2.5-VL-7B-Instruct --video clip.mp4 --question "..." \\
        --device cuda --bf16 --context-parallel-size 4
    torchrun --nproc-per-node 4 -m megatron_spava.video_qa --tensor-model-parallel-size 2 \\
        --context-parallel-size 2 --context-parallel-algo spava ...
    megatron-spava-demo --model internvl3     # a tiny random InternVL3-architecture checkpoint
    megatron-spava-demo --model qwen3_vl      # a tiny random Qwen3-VL-architecture checkpoint

Without --hf-path/--megatron-path it uses the needle model shipped with the package (a small
Qwen2.5-VL-architecture model trained here on synthetic long-video needle tasks:
retrieval, ordering, counting and "scene", see megatron_spava/tasks), and without --video it
writes a needle video as an mp4 under --work-dir (--needle-task, --needle-tokens,
--needle-seed, --needle-index pick it) and asks that video's question. It prints the
question, the true answer, each algorithm's answer and whether it is right, time to first
token (vision + prefill) and decode speed and, with --compare full (the default), the same
prompt under exact attention on one CP rank with the agreement of the first-token logits.
--random-weights (and --model internvl3 or qwen3_vl without a checkpoint) answers with random weights on
a tiny generated checkpoint instead: the answer is then noise, the pipeline is real.
--question given several times prefills the video once and answers each question over the
cached context.

Bad input (a missing video, a file that is not a video, fewer temporal groups than
context-parallel ranks) is reported in one line before any rank starts; an error inside
the ranks is reported once (tracebacks with --verbose).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from .algos import config_for
from .arguments import add_spava_args, spava_config_from_args
from .launch import (RankError, add_distributed_timeout_arg, distributed_timeout, init_distributed,
                     model_parallel_state, quiet_known_warnings, relaunch, report_rank_errors, set_phase,
                     under_torchrun)
from .models.families import FAMILIES
from .tasks.needles import TASKS as NEEDLE_TASKS

DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "megatron_spava")
DEFAULT_QUESTION = "What is happening in this video?"  # for a --video without --question


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-spava-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", choices=["auto", *FAMILIES], default="auto",
                     help="model family; auto: from the checkpoint's config.json model_type, "
                          "qwen2_5_vl without a checkpoint (default: %(default)s)")
    src.add_argument("--hf-path", help="HF Qwen2.5-VL, Qwen3-VL or InternVL3 (OpenGVLab/InternVL3-*-hf) "
                     "checkpoint directory (converted on the fly)")
    src.add_argument("--megatron-path", help="a checkpoint made by tools/convert_checkpoint.py "
                     "hf-to-megatron (holds the tokenizer and processor configs too)")
    src.add_argument("--model-shape", choices=["tiny", "3b", "7b", "2b", "8b"], default="tiny",
                     help="without a checkpoint: the generated model's shape; 3b/7b are the "
                          "released Qwen2.5-VL shapes, 2b InternVL3's, 8b Qwen3-VL's, and need --random-weights "
                          "(default: %(default)s)")
    src.add_argument("--random-weights", action="store_true",
                     help="random weights (seeded, the same in every run) instead of the checkpoint's; "
                          "without a checkpoint, on a tiny generated one")
    src.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    src.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                     help="where the needle video (and a generated checkpoint) go (default: %(default)s)")
    src.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    src.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    vid = p.add_argument_group("video and question")
    vid.add_argument("--video", help="video file (mp4, mkv, webm, ...); default: a needle video (below)")
    vid.add_argument("--frames-dir", help="a directory of frame images instead of --video")
    vid.add_argument("--frames-fps", type=float, default=2.0,
                     help="frame rate of --frames-dir (default: %(default)s)")
    vid.add_argument("--fps", type=float, default=None,
                     help="frames sampled per second of video (default: 2; the needle video keeps "
                          "every frame)")
    vid.add_argument("--max-frames", type=int, default=None,
                     help="(default: 768; the needle video keeps every frame)")
    vid.add_argument("--question", action="append", dest="questions", metavar="QUESTION",
                     help=f"the question (default: the needle video's question, or "
                          f"{DEFAULT_QUESTION!r}). Give it several times to ask several questions "
                          f"about one video: the video context is prefilled once and each question "
                          f"answered over the cached context (the two-pass prefill of "
                          f"--spava-no-fuse-query), with a report per question")
    needle = p.add_argument_group("needle video (the input when no --video or --frames-dir is given)")
    needle.add_argument("--needle-task", choices=NEEDLE_TASKS, default="retrieval",
                        help="(default: %(default)s)")
    needle.add_argument("--needle-tokens", type=int, default=4096,
                        help="video length in LLM tokens, 16 per 2 frames (default: %(default)s)")
    needle.add_argument("--needle-seed", type=int, default=0, help="(default: %(default)s)")
    needle.add_argument("--needle-index", type=int, default=0, help="(default: %(default)s)")
    run = p.add_argument_group("parallelism and decoding")
    run.add_argument("--tensor-model-parallel-size", type=int, default=1)
    run.add_argument("--context-parallel-size", type=int, default=2)
    run.add_argument("--nproc", type=int, default=None,
                     help="ranks to launch when not under torchrun (default: TP x CP)")
    add_distributed_timeout_arg(run)
    run.add_argument("--shard-weights", action="store_true",
                     help="keep 1/CP of each language-model layer's weights per rank and gather "
                          "them layer by layer (less memory, one all-gather per layer)")
    run.add_argument("--max-new-tokens", type=int, default=16, help="(default: %(default)s)")
    run.add_argument("--compare", choices=["full", "none"], default="full",
                     help="also run exact attention without CP and compare (default: %(default)s)")
    run.add_argument("--rope-convention", choices=["qwen", "hf"], default=None,
                     help="Qwen2.5-VL's text-after-video M-RoPE rule: Qwen's original (as "
                          "trained) or transformers 5.x (default: qwen)")
    run.add_argument("--json", help="write the results as JSON here")
    run.add_argument("--save-logits", help="save each run's first-token logits (torch.save) here")
    run.add_argument("--verbose", action="store_true",
                     help="show every warning, progress bar and, for errors, the tracebacks")
    add_spava_args(p)
    from .specs import add_transformer_impl_arg  # megatron-core: imported after the warning filter
    add_transformer_impl_arg(p)
    p.set_defaults(context_parallel_algo="spava")
    return p


def check_flags(args) -> None:
    """ValueError for sizes no run can have and for flags that exclude each other. Pure."""
    import math
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--context-parallel-size", args.context_parallel_size),
                        ("--max-frames", args.max_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--fps", args.fps), ("--frames-fps", args.frames_fps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value}")
    for a, b in (("video", "frames_dir"), ("hf_path", "megatron_path")):
        if getattr(args, a) and getattr(args, b):
            raise ValueError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} exclude each other: "
                             f"give one")


def _weight_bytes(checkpoint: str) -> int:
    """Bytes of the checkpoint's weight files (safetensors or dist checkpoint), 0 if none."""
    if not os.path.isdir(checkpoint):
        return 0
    return sum(os.path.getsize(os.path.join(checkpoint, n)) for n in os.listdir(checkpoint)
               if n.endswith((".safetensors", ".distcp")))


def check_memory(args, checkpoint: str, ranks: int) -> None:
    """Before anything is rendered or a rank starts: the needle video's host memory (and,
    on CUDA, one GPU's) against what the machine has (`memory`); ValueError naming the
    estimate and the flag to change. A user's --video is checked by its frame count only
    (check_video)."""
    from . import memory
    sample = needle_sample(args)
    if sample is None:
        return
    from .tasks.needles import FRAME_SIZE
    tokens = sample.groups * (FRAME_SIZE // 28) ** 2
    weights = _weight_bytes(checkpoint)
    memory.check_host_memory(tokens, ranks, weights, args.tensor_model_parallel_size)
    if args.device == "cuda" and torch.cuda.is_available():
        cfg = model_family(args, checkpoint).config(checkpoint)
        memory.check_gpu_memory(cfg, tokens, args.tensor_model_parallel_size, args.context_parallel_size,
                                2 if args.bf16 else 4, weights, args.shard_weights,
                                torch.cuda.get_device_properties(0).total_memory)


def model_family(args, checkpoint: Optional[str] = None):
    """The model family (`models.families.Family`): --model, else the checkpoint's
    config.json model_type, else Qwen2.5-VL (the generated checkpoint's default)."""
    from .models.families import resolve_family
    given = args.hf_path or args.megatron_path
    return resolve_family(args.model, (checkpoint or given) if given else None)


def needle_sample(args):
    """The needle sample the default video shows, or None when the user gave a video."""
    if hasattr(args, "needle"):  # resolved already (resolve_paths fills in args.video)
        return args.needle
    if args.video or args.frames_dir:
        return None
    from .tasks.needles import groups_for_tokens, make_sample
    return make_sample(args.needle_task, groups=groups_for_tokens(args.needle_tokens),
                       seed=args.needle_seed, index=args.needle_index)


def uses_generated_checkpoint(args) -> bool:
    """Without a checkpoint: a tiny (or released-shape) random checkpoint is generated for
    --random-weights, a --model-shape other than tiny, and InternVL3 (no model is shipped for
    it); otherwise the shipped needle model answers."""
    if args.hf_path or args.megatron_path:
        return False
    return args.random_weights or args.model_shape != "tiny" or model_family(args).name != "qwen2_5_vl"


def resolve_paths(args) -> str:
    """Fill in the default video path, questions and frame sampling; return the checkpoint
    directory. Pure (nothing is written)."""
    sample = args.needle = needle_sample(args)
    if sample is not None:
        from .tasks.demo import needle_video_path
        args.video = needle_video_path(args.work_dir, sample)
        args.questions = args.questions or [sample.question]
        args.fps = args.fps if args.fps is not None else 0.0  # 0: keep every frame
    args.questions = args.questions or [DEFAULT_QUESTION]
    args.question = args.questions[0]
    args.fps = 2.0 if args.fps is None else args.fps
    if args.hf_path or args.megatron_path:
        return args.hf_path or args.megatron_path
    if uses_generated_checkpoint(args):
        family = model_family(args)
        shaped = family.tiny_name.replace("tiny-", "", 1) + f"-{args.model_shape}-shape"
        return os.path.join(args.work_dir, family.tiny_name if args.model_shape == "tiny" else shaped)
    from .tasks.model import ASSET_DIR
    return ASSET_DIR


def create_defaults(args, checkpoint: str) -> None:
    """Write the generated checkpoint and the needle video when they are the ones asked for."""
    if args.hf_path or args.megatron_path:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    elif uses_generated_checkpoint(args):
        family = model_family(args)
        if args.model_shape not in ("tiny", *family.shapes):
            raise ValueError(f"--model-shape {args.model_shape} is not a {family.name} shape; "
                             f"choose from tiny, {', '.join(family.shapes)}")
        if not args.verbose:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        from .cache import cached_dir  # a folder cut short by a kill, or damaged, is rebuilt
        shape = None if args.model_shape == "tiny" else args.model_shape
        cached_dir(checkpoint, lambda tmp: family.tiny().make_tiny_checkpoint(tmp, shape=shape))
    else:
        from .tasks.model import shipped_checkpoint
        shipped_checkpoint()  # FileNotFoundError saying how to get one
    sample = needle_sample(args)
    if sample is not None:
        from .tasks.demo import write_needle_video
        write_needle_video(args.video, sample)


def check_video(args, checkpoint: str) -> None:
    """Before any rank starts: the video exists and decodes, and it has a temporal group
    (2 frames) for every context-parallel rank. Raises FileNotFoundError or ValueError."""
    from .video import count_sampled_frames
    path = args.frames_dir or args.video
    frames = count_sampled_frames(path, fps=_sampling_fps(args), max_frames=_max_frames(args),
                                  frames_fps=args.frames_fps)
    cp = args.context_parallel_size
    per_group = 1 if model_family(args, checkpoint).name == "internvl3" else 2  # Qwen: 2 frames
    groups = frames // per_group
    if groups < cp and spava_config_from_args(args).frame_parallel:
        raise ValueError(f"{path} gives {frames} frames ({groups} temporal groups of {per_group}) but "
                         f"--context-parallel-size {cp} needs at least {cp} groups, one per rank: "
                         f"sample more frames (--fps, --max-frames) or use fewer ranks")


def _sampling_fps(args):
    return None if not args.fps else args.fps  # 0 or None: every frame


def _max_frames(args):
    if args.max_frames is not None:
        return args.max_frames
    return None if needle_sample(args) is not None else 768


def _build_model(args, checkpoint: str, tp: int, cp: int, device, algo: str):
    from .algos.megatron import core_attention_for

    family = model_family(args, checkpoint)
    Model, convert = family.model_class(), family.convert()
    ps = model_parallel_state(tp, cp)
    cfg = family.config(checkpoint)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    from .specs import backend_for_impl
    layers = dict(backend=backend_for_impl(args.transformer_impl),
                  core_attention=core_attention_for(algo, args.cp_comm_type))
    if args.random_weights:  # the same seed everywhere: equal weights on every CP rank and run
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(args.seed)
        with torch.device(device):
            model = Model(cfg, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                          use_cpu_initialization=device.type == "cpu", **layers)
        return model.to(device).eval(), ps
    model = Model(cfg, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                  use_cpu_initialization=True, perform_initialization=False, **layers)
    if args.megatron_path:
        convert.load_dist_into_model(model, checkpoint)
    else:
        convert.load_hf_into_model(model, checkpoint, tp_rank=ps.get_tensor_model_parallel_rank(),
                                   tp_size=tp, progress=dist.get_rank() == 0 and args.verbose)
    return model.to(device).eval(), ps


def _run_one(args, checkpoint, inputs, algo: str, tp: int, cp: int, device, config, queries=None):
    """Build the model for `algo` at TP x CP, warm up (kernels, allocator), answer, drop it.
    queries None: `generate` over the whole prompt `inputs` (one GenerationOutput); else
    `answer_questions` over the context `inputs` (one GenerationOutput per query)."""
    from .inference.generate import answer_questions, generate

    set_phase(f"building and loading the {algo} model (TP {tp} x CP {cp})")
    model, ps = _build_model(args, checkpoint, tp, cp, device, algo)
    set_phase(f"running prefill and decode ({algo})")
    if args.shard_weights:
        model.shard_weights(ps.get_context_parallel_group())
    kwargs = dict(algo=algo, config=config, cp_group=ps.get_context_parallel_group(),
                  rope_convention=args.rope_convention, device=device)

    def answer(max_new_tokens: int, qs=queries):
        if qs is None:
            return generate(model, inputs, max_new_tokens=max_new_tokens, **kwargs)
        return answer_questions(model, inputs, qs, max_new_tokens=max_new_tokens, **kwargs)

    answer(2, None if queries is None else queries[:1])  # warm-up
    result = answer(args.max_new_tokens)  # the model goes with this frame
    for out in (result if isinstance(result, (list, tuple)) else [result]):
        logits = out.first_logits
        bad = int((~torch.isfinite(logits)).sum())
        if bad:  # the same logits on every rank: every rank raises
            raise ValueError(f"the {algo} run's first-token logits are not finite ({bad} of {logits.numel()} "
                             f"NaN or inf): the checkpoint's weights or the activations overflow "
                             f"(check the checkpoint; without --bf16 the activations are float32)")
    return result


def _decode_rate(out) -> Optional[float]:
    """Decoded tokens per second after the first, or None for one token."""
    return (len(out.tokens) - 1) / out.decode_s if len(out.tokens) > 1 and out.decode_s > 0 else None


def _versus(out, ref) -> dict:
    """First-token logits of `out` against the reference run `ref`, and whether they answer alike."""
    diff = (out.first_logits - ref.first_logits).abs()
    return dict(max_abs_diff=float(diff.max()), rel_err=float(diff.norm() / ref.first_logits.norm()),
                same_answer=out.tokens == ref.tokens)


def _load(args):
    """What both kinds of run start from: (device, checkpoint, clip, family, prompter)."""
    from .specs import resolve_transformer_impl
    from .video import load_video

    set_phase("loading the video")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    args.transformer_impl = resolve_transformer_impl(args.transformer_impl, device)
    checkpoint = resolve_paths(args)
    clip = load_video(args.frames_dir or args.video, fps=_sampling_fps(args), max_frames=_max_frames(args),
                      frames_fps=args.frames_fps)
    family = model_family(args, checkpoint)
    return device, checkpoint, clip, family, family.prompter(checkpoint)


def run(args) -> dict:
    if len(args.questions) > 1:
        return run_questions(args)
    rank = dist.get_rank()
    device, checkpoint, clip, family, prompter = _load(args)
    inputs = prompter(clip, args.question)
    config = spava_config_from_args(args)
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    from .placement import check_video_qa
    check_video_qa(args, checkpoint, inputs)  # placement and fit, before the model is built
    runs = {args.context_parallel_algo: _run_one(args, checkpoint, inputs, args.context_parallel_algo,
                                                 tp, cp, device, config)}
    if args.compare == "full" and args.context_parallel_algo != "full":
        runs["full"] = _run_one(args, checkpoint, inputs, "full", tp, 1, device, config)
    video_tokens = int((inputs.input_ids == family.config(checkpoint).vision_token_id).sum())
    result = dict(
        checkpoint=checkpoint, video=clip.source, frames=len(clip.frames), sampled_fps=clip.fps,
        prompt_tokens=int(inputs.input_ids.shape[1]), video_tokens=video_tokens,
        processor_backend=prompter.backend, processor_fallback_reason=prompter.fallback_reason,
        question=args.question, transformer_impl=args.transformer_impl, model=family.name, runs={})
    sample = needle_sample(args)
    if sample is not None:
        result.update(true_answer=sample.answer, needle_task=sample.task,
                      needles=[list(n) for n in sample.needles], cards=[list(c) for c in sample.cards])
    for name, out in runs.items():
        layout = out.layout
        result["runs"][name] = dict(
            tp=tp, cp=cp if name != "full" else 1, tokens=out.tokens,
            answer=prompter.tokenizer.decode(out.tokens, skip_special_tokens=True),
            ttft_s=out.ttft_s, vision_s=out.timings["vision_s"],
            decode_tokens_per_s=_decode_rate(out), tokens_per_rank=int(layout.local_len(0)),
            anchor_len=getattr(layout, "anchor_len", None), passing_len=getattr(layout, "passing_len", None))
        if sample is not None:
            from .tasks.needles import score
            result["runs"][name]["correct"] = score(result["runs"][name]["answer"], sample.answer)
    if "full" in runs and len(runs) > 1:
        vs = _versus(runs[args.context_parallel_algo], runs["full"])
        result.update(first_logits_max_abs_diff=vs["max_abs_diff"], first_logits_rel_err=vs["rel_err"],
                      same_answer=vs["same_answer"])
    if rank == 0 and args.save_logits:
        torch.save({name: out.first_logits for name, out in runs.items()}, args.save_logits)
    if rank == 0:
        print_report(result, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


def run_questions(args) -> dict:
    """Several --question about one video: one context prefill, every question answered over
    the cached context; a row per question and algorithm."""
    from dataclasses import replace

    from .inference.generate import split_prompt

    rank = dist.get_rank()
    device, checkpoint, clip, family, prompter = _load(args)
    prompts = [prompter(clip, question) for question in args.questions]
    cfg = family.config(checkpoint)
    splits = [split_prompt(cfg, p.input_ids) for p in prompts]
    context = splits[0][0]
    if any(not torch.equal(c, context) for c, _ in splits):
        raise ValueError("the questions' prompts do not share the tokens before the question")
    inputs, queries = replace(prompts[0], input_ids=context), [q for _, q in splits]
    config = spava_config_from_args(args)
    tp, cp, algo = args.tensor_model_parallel_size, args.context_parallel_size, args.context_parallel_algo
    runs = {algo: _run_one(args, checkpoint, inputs, algo, tp, cp, device, config, queries)}
    if args.compare == "full" and algo != "full":
        runs["full"] = _run_one(args, checkpoint, inputs, "full", tp, 1, device, config, queries)
    result = dict(checkpoint=checkpoint, video=clip.source, frames=len(clip.frames),
                  context_tokens=int(context.shape[1]), questions=list(args.questions),
                  model=family.name, runs={})
    for name, outs in runs.items():
        result["runs"][name] = [dict(
            tp=tp, cp=cp if name != "full" else 1, tokens=out.tokens, query_tokens=int(q.shape[1]),
            answer=prompter.tokenizer.decode(out.tokens, skip_special_tokens=True),
            ttft_s=out.ttft_s, **out.timings, decode_tokens_per_s=_decode_rate(out))
            for out, q in zip(outs, queries)]
    if "full" in runs and len(runs) > 1:
        for row, out, ref in zip(result["runs"][algo], runs[algo], runs["full"]):
            vs = _versus(out, ref)
            row.update(first_logits_max_abs_diff_vs_full=vs["max_abs_diff"],
                       first_logits_rel_err_vs_full=vs["rel_err"], same_answer_as_full=vs["same_answer"])
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
    if result["processor_fallback_reason"] and args.verbose:
        print(f"(HF's processor not used: {result['processor_fallback_reason']})")
    print(f"question: {result['question']!r}")
    truth = result.get("true_answer")
    if truth is not None:
        print(f"true answer: {truth!r} (needle task {result['needle_task']!r})")
    header = (f"{'algorithm':<10} {'TPxCP':>6} {'tokens/rank':>11} {'TTFT ms':>9} {'vision ms':>9} "
              f"{'decode tok/s':>12}  answer")
    print(header)
    print("-" * (len(header) + 24))
    for name, r in result["runs"].items():
        tps = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        verdict = "" if "correct" not in r else ("  right" if r["correct"] else "  WRONG")
        print(f"{name:<10} {r['tp']}x{r['cp']:<4} {r['tokens_per_rank']:>11} {1e3 * r['ttft_s']:>9.1f} "
              f"{1e3 * r['vision_s']:>9.1f} {tps:>12}  {r['answer']!r}{verdict}")
    if args.verbose:
        for name, r in result["runs"].items():
            print(f"{name} answer tokens: {r['tokens']}")
    if "first_logits_max_abs_diff" in result:
        print(f"first-token logits, {args.context_parallel_algo} vs full: max abs diff "
              f"{result['first_logits_max_abs_diff']:.2e}, relative error {result['first_logits_rel_err']:.2e}; "
              f"same answer: {result['same_answer']}")


def main(argv=None) -> int:
    # before anything imports megatron-core (the parser's --transformer-impl does)
    # the note once: by the launching process, or by rank 0 when the user ran torchrun
    from .launch import ERROR_DIR_ENV
    launched = ERROR_DIR_ENV in os.environ  # a rank our own relaunch started
    quiet_known_warnings("--verbose" in (sys.argv[1:] if argv is None else argv),
                         announce=not launched and os.environ.get("RANK", "0") == "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", args.nproc or max(tp, 1) * max(cp, 1)))
    try:
        check_flags(args)
        if world != tp * cp:
            raise ValueError(f"{world} ranks for --tensor-model-parallel-size {tp} x "
                             f"--context-parallel-size {cp}: they must multiply to the world size")
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        distributed_timeout(args)
        if args.model_shape != "tiny" and not args.random_weights and not (args.hf_path or args.megatron_path):
            raise ValueError(f"--model-shape {args.model_shape} has no weights to load: add --random-weights")
        if args.needle_tokens < 64:
            raise ValueError("--needle-tokens must be >= 64")
        config_for(args.context_parallel_algo, spava_config_from_args(args))  # presets may refuse
        from .specs import resolve_transformer_impl
        resolve_transformer_impl(args.transformer_impl, args.device, verbose=False)
        checkpoint = resolve_paths(args)
        check_memory(args, checkpoint, world)
        if args.rope_convention is not None and model_family(args, checkpoint).name != "qwen2_5_vl":
            raise ValueError("--rope-convention chooses Qwen2.5-VL's M-RoPE rule; InternVL3 has "
                             "1-D RoPE, Qwen3-VL one rope index")
        if not under_torchrun() or os.environ.get("RANK") == "0":
            create_defaults(args, checkpoint)
            check_video(args, checkpoint)
    except (ValueError, FileNotFoundError) as err:  # one line, no usage dump
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if not under_torchrun():
        try:
            relaunch("megatron_spava.video_qa", world, argv, verbose=args.verbose)
        except RankError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 1
        return 0
    with report_rank_errors(args.verbose):
        init_distributed(args.device, timeout=distributed_timeout(args))
        try:
            set_phase("waiting for the other ranks to start")
            dist.barrier()  # rank 0 has written the default checkpoint and video
            run(args)
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
