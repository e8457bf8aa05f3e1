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
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .algos import config_for
from .arguments import add_spava_args, spava_config_from_args
from .launch import (RankError, add_distributed_timeout_arg, distributed_timeout, init_distributed,
                     model_parallel_state, quiet_known_warnings, relaunch, report_rank_errors, set_phase,
                     under_torchrun)
from .tasks.needles import TASKS as NEEDLE_TASKS

DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "megatron_spava")
DEFAULT_QUESTION = "What is happening in this video?"  # for a --video without --question


def build_parser() -> argparse.ArgumentParser:
    # the families import megatron-core: here, after main's warning filter, not at module import
    from .models.registry import DEFAULT as DEFAULT_FAMILY, FAMILIES, model_shapes
    p = argparse.ArgumentParser(prog="megatron-spava-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", choices=["auto", *FAMILIES], default="auto",
                     help=f"model family; auto: from the checkpoint's config.json model_type, "
                          f"{DEFAULT_FAMILY} without a checkpoint (default: %(default)s)")
    src.add_argument("--hf-path", help="HF Qwen2.5-VL, Qwen3-VL or InternVL3 (OpenGVLab/InternVL3-*-hf) "
                     "checkpoint directory (converted on the fly)")
    src.add_argument("--megatron-path", help="a checkpoint made by tools/convert_checkpoint.py "
                     "hf-to-megatron (holds the tokenizer and processor configs too)")
    src.add_argument("--model-shape", choices=model_shapes(), default="tiny",
                     help="without a checkpoint: the generated model's shape; " +
                          ", ".join(f"{'/'.join(f.shapes)} {f.title}'s" for f in FAMILIES.values() if f.shapes) +
                          " released shapes, which need --random-weights (default: %(default)s)")
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
    from .specs import add_lm_fusions_arg, add_transformer_impl_arg  # megatron-core: after the warning filter
    add_transformer_impl_arg(p)
    add_lm_fusions_arg(p)
    from .fp8 import add_fp8_args
    add_fp8_args(p)  # the language model's linears in FP8, as Megatron-LM spells it
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


@dataclass(frozen=True)
class Options:
    """The main job's decisions, made once per process from its parsed flags
    (`resolve_options`): the model family, the checkpoint directory, the video, the
    questions, the frame sampling, the Spava config and the layer backend. Nothing writes to
    the parsed flags afterwards; the flags the job reads as given are fields too (`FLAGS`:
    `opts.context_parallel_size` is `args.context_parallel_size`), and any other name is an
    AttributeError.

    family: the `models.family.ModelFamily` (--model, else the checkpoint's config.json,
    else the default family); checkpoint: the directory the weights load from (given, a
    generated tiny/shaped one, or the shipped needle model); generated: that directory is
    a generated random checkpoint; video: the video file (the needle video's path when no
    --video/--frames-dir is given); needle: that needle sample, or None; questions: one or
    more; fps: frames sampled per second (0: every frame); max_frames: the frame cap (None:
    none); spava_config: the SpavaConfig of --spava-*; transformer_impl: the layer backend;
    lm_fusions: the language model's fused kernels (`specs.resolve_lm_fusions`).
    """

    args: argparse.Namespace
    family: object
    checkpoint: str
    generated: bool
    video: Optional[str]
    needle: object
    questions: Tuple[str, ...]
    fps: float
    max_frames: Optional[int]
    spava_config: object
    transformer_impl: str
    lm_fusions: str
    # the flags the job reads as parsed (FLAGS), filled by resolve_options
    tensor_model_parallel_size: int
    context_parallel_size: int
    context_parallel_algo: str
    cp_comm_type: Optional[str]
    device: str
    bf16: bool
    shard_weights: bool
    seed: int
    max_new_tokens: int
    model_shape: str
    random_weights: bool
    hf_path: Optional[str]
    megatron_path: Optional[str]
    frames_dir: Optional[str]
    frames_fps: float
    rope_convention: Optional[str]
    compare: Optional[str]
    json: Optional[str]
    save_logits: Optional[str]
    verbose: bool
    fp8_format: Optional[str]
    fp8_recipe: str

    @property
    def question(self) -> str:
        return self.questions[0]

    @property
    def sampling_fps(self) -> Optional[float]:
        return self.fps or None  # 0: every frame


#: The Options fields copied from the parsed flags unchanged
FLAGS = ("tensor_model_parallel_size", "context_parallel_size", "context_parallel_algo", "cp_comm_type",
         "device", "bf16", "shard_weights", "seed", "max_new_tokens", "model_shape", "random_weights",
         "hf_path", "megatron_path", "frames_dir", "frames_fps", "rope_convention", "compare", "json",
         "save_logits", "verbose", "fp8_format", "fp8_recipe")


def _needle_sample(args):
    """The needle sample the default video shows, or None when the user gave a video."""
    if args.video or args.frames_dir:
        return None
    from .tasks.needles import groups_for_tokens, make_sample
    return make_sample(args.needle_task, groups=groups_for_tokens(args.needle_tokens),
                       seed=args.needle_seed, index=args.needle_index)


def resolve_options(args) -> Options:
    """Every decision the job makes from its flags, once (pure: nothing is written). Raises
    ValueError / FileNotFoundError for a family that cannot be resolved."""
    from .models.registry import resolve_family
    from .specs import resolve_lm_fusions, resolve_transformer_impl

    given = args.hf_path or args.megatron_path
    if given and not os.path.isdir(given):
        raise FileNotFoundError(f"checkpoint directory not found: {given}")
    family = resolve_family(args.model, given or None)
    sample = _needle_sample(args)
    video, questions, fps = args.video, list(args.questions or []), args.fps
    if sample is not None:
        from .tasks.demo import needle_video_path
        video = needle_video_path(args.work_dir, sample)
        questions = questions or [sample.question]
        fps = 0.0 if fps is None else fps  # 0: keep every frame
    questions = questions or [DEFAULT_QUESTION]
    # a generated random checkpoint: --random-weights, a --model-shape other than tiny, and a
    # family with no shipped model; otherwise the shipped needle model answers
    generated = not given and (args.random_weights or args.model_shape != "tiny" or not family.shipped_model)
    if given:
        checkpoint = given
    elif generated:
        shaped = family.tiny_name.replace("tiny-", "", 1) + f"-{args.model_shape}-shape"
        checkpoint = os.path.join(args.work_dir, family.tiny_name if args.model_shape == "tiny" else shaped)
    else:
        from .tasks.model import ASSET_DIR
        checkpoint = ASSET_DIR
    max_frames = args.max_frames if args.max_frames is not None else (None if sample is not None else 768)
    impl = resolve_transformer_impl(args.transformer_impl, args.device, verbose=False)
    try:
        lm_fusions = resolve_lm_fusions(args.lm_fusions, impl, fp8=bool(args.fp8_format))
    except ValueError as err:
        raise ValueError(f"--lm-fusions: {err}") from None
    from .fp8 import fp8_error
    error = fp8_error(args.fp8_format, args.fp8_recipe, args.device, impl)
    if error:
        raise ValueError(error)
    return Options(args=args, family=family, checkpoint=checkpoint, generated=generated, video=video,
                   needle=sample, questions=tuple(questions), fps=2.0 if fps is None else fps,
                   max_frames=max_frames, spava_config=spava_config_from_args(args),
                   transformer_impl=impl, lm_fusions=lm_fusions,
                   **{flag: getattr(args, flag) for flag in FLAGS})


def check_memory(opts: Options, ranks: int) -> None:
    """Before anything is rendered or a rank starts: the needle video's host memory (and,
    on CUDA, one GPU's) against what the machine has (`memory`); ValueError naming the
    estimate and the flag to change. A user's --video is checked by its frame count only
    (check_video)."""
    from . import memory
    sample = opts.needle
    if sample is None:
        return
    from .tasks.needles import FRAME_SIZE
    tokens = sample.groups * (FRAME_SIZE // 28) ** 2
    weights = _weight_bytes(opts.checkpoint)
    memory.check_host_memory(tokens, ranks, weights, opts.tensor_model_parallel_size)
    if opts.device == "cuda" and torch.cuda.is_available():
        cfg = opts.family.config(opts.checkpoint)
        memory.check_gpu_memory(cfg, tokens, opts.tensor_model_parallel_size, opts.context_parallel_size,
                                2 if opts.bf16 else 4, weights, opts.shard_weights,
                                torch.cuda.get_device_properties(0).total_memory)


def check_rope_convention(opts: Options) -> None:
    """--rope-convention only where the family's M-RoPE has a choice of rule."""
    if opts.rope_convention is not None and not opts.family.rope_conventions:
        from .models.registry import FAMILIES
        choosers = [f.title for f in FAMILIES.values() if f.rope_conventions]
        raise ValueError(f"--rope-convention chooses {', '.join(choosers)}'s M-RoPE rule; "
                         f"{opts.family.title} has one rule (--model {opts.family.name})")


def create_defaults(opts: Options) -> None:
    """Write the generated checkpoint and the needle video when they are the ones asked for."""
    checkpoint, family = opts.checkpoint, opts.family
    if opts.generated:
        if opts.model_shape not in ("tiny", *family.shapes):
            raise ValueError(f"--model-shape {opts.model_shape} is not a {family.name} shape; "
                             f"choose from tiny, {', '.join(family.shapes)}")
        if not opts.verbose:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        from .cache import cached_dir  # a folder cut short by a kill, or damaged, is rebuilt
        shape = None if opts.model_shape == "tiny" else opts.model_shape
        cached_dir(checkpoint, lambda tmp: family.tiny().make_tiny_checkpoint(tmp, shape=shape))
    elif not (opts.hf_path or opts.megatron_path):  # a given one: resolve_options checked it exists
        from .tasks.model import shipped_checkpoint
        shipped_checkpoint()  # FileNotFoundError saying how to get one
    if opts.needle is not None:
        from .tasks.demo import write_needle_video
        write_needle_video(opts.video, opts.needle)


def check_video(opts: Options) -> None:
    """Before any rank starts: the video exists and decodes, and it has a frame group (the
    family's `frames_per_group` frames) for every context-parallel rank (the family's
    `frame_group_error`, the one check). Raises FileNotFoundError or ValueError."""
    from .video import count_sampled_frames
    path = opts.frames_dir or opts.video
    frames = count_sampled_frames(path, fps=opts.sampling_fps, max_frames=opts.max_frames,
                                  frames_fps=opts.frames_fps)
    groups = frames // opts.family.frames_per_group
    error = opts.family.frame_group_error(groups, opts.context_parallel_size)
    if error and opts.spava_config.frame_parallel:
        raise ValueError(f"{path} gives {frames} frames: {error}")


def _build_model(opts: Options, tp: int, cp: int, device, algo: str):
    from .algos.megatron import core_attention_for

    family, checkpoint = opts.family, opts.checkpoint
    Model, convert = family.model_class(), family.convert()
    ps = model_parallel_state(tp, cp)
    cfg = family.config(checkpoint)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    from .specs import backend_for_impl
    layers = dict(backend=backend_for_impl(opts.transformer_impl), lm_fusions=opts.lm_fusions,
                  core_attention=core_attention_for(algo, opts.cp_comm_type))
    if opts.random_weights:  # the same seed everywhere: equal weights on every CP rank and run
        torch.manual_seed(opts.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(opts.seed)
        with torch.device(device):
            model = Model(cfg, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                          use_cpu_initialization=device.type == "cpu", **layers)
        return _precision(model.to(device).eval(), opts), ps
    model = Model(cfg, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                  use_cpu_initialization=True, perform_initialization=False, **layers)
    if opts.megatron_path:
        convert.load_dist_into_model(model, checkpoint)
    else:
        convert.load_hf_into_model(model, checkpoint, tp_rank=ps.get_tensor_model_parallel_rank(),
                                   tp_size=tp, progress=dist.get_rank() == 0 and opts.verbose)
    return _precision(model.to(device).eval(), opts), ps


def _precision(model, opts: Options):
    """`model` with its language model's linears in FP8 when --fp8-format is given (`fp8.set_fp8`)."""
    if opts.fp8_format:
        from .fp8 import set_fp8
        set_fp8(model, opts.fp8_format, opts.fp8_recipe)
    return model


def _run_one(opts: Options, inputs, algo: str, tp: int, cp: int, device, queries=None):
    """Build the model for `algo` at TP x CP, warm up (kernels, allocator), answer, drop it.
    queries None: `generate` over the whole prompt `inputs` (one GenerationOutput); else
    `answer_questions` over the context `inputs` (one GenerationOutput per query)."""
    from .inference.generate import answer_questions, generate

    set_phase(f"building and loading the {algo} model (TP {tp} x CP {cp})")
    model, ps = _build_model(opts, tp, cp, device, algo)
    set_phase(f"running prefill and decode ({algo})")
    if opts.shard_weights:
        model.shard_weights(ps.get_context_parallel_group())
    kwargs = dict(algo=algo, config=opts.spava_config, cp_group=ps.get_context_parallel_group(),
                  rope_convention=opts.rope_convention, device=device)

    def answer(max_new_tokens: int, qs=queries):
        if qs is None:
            return generate(model, inputs, max_new_tokens=max_new_tokens, **kwargs)
        return answer_questions(model, inputs, qs, max_new_tokens=max_new_tokens, **kwargs)

    answer(2, None if queries is None else queries[:1])  # warm-up
    result = answer(opts.max_new_tokens)  # the model goes with this frame
    for out in (result if isinstance(result, (list, tuple)) else [result]):
        logits = out.first_logits
        bad = int((~torch.isfinite(logits)).sum())
        if bad:  # the same logits on every rank: every rank raises
            raise ValueError(f"the {algo} run's first-token logits are not finite ({bad} of {logits.numel()} "
                             f"NaN or inf): the checkpoint's weights or the activations overflow "
                             f"(check the checkpoint; without --bf16 the activations are float32)")
    return result


def _layers(opts: Options) -> dict:
    """The language model's layers as the report and the JSON give them: backend, fusions and
    precision (fp8: "e4m3 (delayed)", or None)."""
    fp8 = f"{opts.fp8_format} ({opts.fp8_recipe})" if opts.fp8_format else None
    return dict(transformer_impl=opts.transformer_impl, lm_fusions=opts.lm_fusions, fp8=fp8)


def _layers_line(result: dict) -> str:
    return (f"layers: {result['transformer_impl']}, fusions {result['lm_fusions']}"
            + (f", FP8 linears {result['fp8']}" if result.get("fp8") else ""))


def _decode_rate(out) -> Optional[float]:
    """Decoded tokens per second after the first, or None for one token."""
    return (len(out.tokens) - 1) / out.decode_s if len(out.tokens) > 1 and out.decode_s > 0 else None


def _versus(out, ref) -> dict:
    """First-token logits of `out` against the reference run `ref`, and whether they answer alike."""
    diff = (out.first_logits - ref.first_logits).abs()
    return dict(max_abs_diff=float(diff.max()), rel_err=float(diff.norm() / ref.first_logits.norm()),
                same_answer=out.tokens == ref.tokens)


def _load(opts: Options):
    """What both kinds of run start from: (device, clip, prompter)."""
    from .specs import resolve_transformer_impl
    from .video import load_video

    set_phase("loading the video")
    device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
    resolve_transformer_impl(opts.args.transformer_impl, device)  # prints the choice (opts holds it)
    clip = load_video(opts.frames_dir or opts.video, fps=opts.sampling_fps, max_frames=opts.max_frames,
                      frames_fps=opts.frames_fps)
    return device, clip, opts.family.prompter(opts.checkpoint)


def run(opts: Options) -> dict:
    if len(opts.questions) > 1:
        return run_questions(opts)
    rank = dist.get_rank()
    device, clip, prompter = _load(opts)
    family, checkpoint = opts.family, opts.checkpoint
    inputs = prompter(clip, opts.question)
    tp, cp = opts.tensor_model_parallel_size, opts.context_parallel_size
    from .placement import check_video_qa
    check_video_qa(opts, inputs)  # placement and fit, before the model is built
    runs = {opts.context_parallel_algo: _run_one(opts, inputs, opts.context_parallel_algo, tp, cp, device)}
    if opts.compare == "full" and opts.context_parallel_algo != "full":
        runs["full"] = _run_one(opts, inputs, "full", tp, 1, device)
    video_tokens = int((inputs.input_ids == family.config(checkpoint).vision_token_id).sum())
    result = dict(
        checkpoint=checkpoint, video=clip.source, frames=len(clip.frames), sampled_fps=clip.fps,
        prompt_tokens=int(inputs.input_ids.shape[1]), video_tokens=video_tokens,
        processor_backend=prompter.backend, processor_fallback_reason=prompter.fallback_reason,
        question=opts.question, model=family.name, **_layers(opts), runs={})
    sample = opts.needle
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
        vs = _versus(runs[opts.context_parallel_algo], runs["full"])
        result.update(first_logits_max_abs_diff=vs["max_abs_diff"], first_logits_rel_err=vs["rel_err"],
                      same_answer=vs["same_answer"])
    if rank == 0 and opts.save_logits:
        torch.save({name: out.first_logits for name, out in runs.items()}, opts.save_logits)
    if rank == 0:
        print_report(result, opts)
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


def run_questions(opts: Options) -> dict:
    """Several --question about one video: one context prefill, every question answered over
    the cached context; a row per question and algorithm."""
    from dataclasses import replace

    from .inference.generate import split_prompt

    rank = dist.get_rank()
    device, clip, prompter = _load(opts)
    family = opts.family
    prompts = [prompter(clip, question) for question in opts.questions]
    cfg = family.config(opts.checkpoint)
    splits = [split_prompt(cfg, p.input_ids) for p in prompts]
    context = splits[0][0]
    if any(not torch.equal(c, context) for c, _ in splits):
        raise ValueError("the questions' prompts do not share the tokens before the question")
    inputs, queries = replace(prompts[0], input_ids=context), [q for _, q in splits]
    tp, cp, algo = opts.tensor_model_parallel_size, opts.context_parallel_size, opts.context_parallel_algo
    runs = {algo: _run_one(opts, inputs, algo, tp, cp, device, queries)}
    if opts.compare == "full" and algo != "full":
        runs["full"] = _run_one(opts, inputs, "full", tp, 1, device, queries)
    result = dict(checkpoint=opts.checkpoint, video=clip.source, frames=len(clip.frames),
                  context_tokens=int(context.shape[1]), questions=list(opts.questions),
                  model=family.name, **_layers(opts), runs={})
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
    if rank == 0 and opts.save_logits:
        torch.save({name: [o.first_logits for o in outs] for name, outs in runs.items()}, opts.save_logits)
    if rank == 0:
        print(f"\nVideo QA, {len(queries)} questions over one cached context: {result['video']} "
              f"({result['frames']} frames, {result['context_tokens']} context tokens; {_layers_line(result)})")
        print("ttft ms: the first question pays vision + context prefill; later ones the query pass only")
        for i, question in enumerate(opts.questions):
            print(f"question {i + 1}: {question!r}")
            for name, rows in result["runs"].items():
                r = rows[i]
                vs = (f"  logits vs full: rel err {r['first_logits_rel_err_vs_full']:.2e}, same answer "
                      f"{r['same_answer_as_full']}" if "first_logits_rel_err_vs_full" in r else "")
                print(f"  {name:<8} {r['tp']}x{r['cp']} ttft {1e3 * r['ttft_s']:8.1f} ms  answer "
                      f"{r['answer']!r} tokens {r['tokens']}{vs}")
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


def print_report(result: dict, args) -> None:
    print()
    print(f"Video QA: {result['video']} ({result['frames']} frames at {result['sampled_fps']:.2f} fps, "
          f"{result['video_tokens']} video tokens, {result['prompt_tokens']} prompt tokens; "
          f"processor: {result['processor_backend']}; {_layers_line(result)})")
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
        opts = resolve_options(args)  # every decision, once per process
        check_memory(opts, world)
        check_rope_convention(opts)
        if not under_torchrun() or os.environ.get("RANK") == "0":
            create_defaults(opts)
            check_video(opts)
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
            run(opts)
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
