#!/usr/bin/env python3
"""Train the needle model: a small Qwen2.5-VL-architecture model (HF transformers'
Qwen2_5_VLForConditionalGeneration, ~4M parameters), from scratch, on the synthetic needle
tasks (megatron_spava/tasks: retrieval, ordering, counting, scene), with full attention.
`--family qwen3_vl` trains the same budget in Qwen3-VL's architecture instead
(Qwen3VLForConditionalGeneration; models/qwen3_vl/needle.py; assets/needle_qwen3/).

    python tools/train_needle_model.py                         # the GPU recipe (one H200, ~8 min)
    python tools/train_needle_model.py --family qwen3_vl       # the Qwen3-VL needle model
    python tools/train_needle_model.py --device cpu --max-minutes 20 \\
        --curriculum 512:0.6,1024:0.4 --tokens-per-step 4096 --eval-tokens 1024 --out /tmp/needle

The recipe: AdamW, bf16 autocast (CUDA), SDPA attention, a length curriculum in video
tokens over wall-clock fractions (--curriculum LEN:FRACTION,...; a quarter of the steps
revisit an earlier length), a constant token budget per step (batch = tokens-per-step /
length). Everything is bounded by --max-minutes: training stops early enough to leave
--reserve-minutes for the final save and evaluation. The checkpoint (fp16 safetensors,
config, tokenizer, chat template, processor configs) is written every --save-minutes, at
the end, and when anything fails; train_log.jsonl and train_info.json (seed, command,
commit, versions, device, final evaluation) go next to it.

The final evaluation reloads the saved fp16 weights and reports teacher-forced exact match
(equal to greedy-decoding exact match, see megatron_spava/tasks/training.py) per task and
length on held-out samples (seed 0; training draws from other seeds), under full attention
in float32. Spava and the other algorithms are measured by tools/eval_needles.py through
the project's Megatron path.

Needs torch and transformers only (no megatron-core).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import random
import signal
import sys
import time
import traceback

from ..models.registry import needle_families
from ..provenance import git_commit
from .model import load_fp16_weights, needle_kit, save_checkpoint, write_archive


import torch

FAMILIES = tuple(needle_families())  # the families with a needle kit (model.needle_kit)
DEFAULT_CURRICULUM = ("128:0.1,256:0.14,512:0.16,1024:0.14,2048:0.1,4096:0.1,8192:0.08,16384:0.07,"
                      "32768:0.07,65536:0.04")  # skills are learnt short; long stages adapt them
TRAIN_SEED_OFFSET = 1_000_003  # training samples use seeds >= this; evaluation sets use 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES,
                   help="architecture of the needle model (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="checkpoint directory (default: the family's shipped asset)")
    p.add_argument("--archive", default=None,
                   help="also write the whole checkpoint directory as one tar file here, at every "
                        "save (one file to copy off a machine; tar -xf it into megatron_spava/assets/)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="(default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="wall-clock budget for everything after start-up (default: %(default)s)")
    p.add_argument("--reserve-minutes", type=float, default=None,
                   help="kept for the final save and evaluation (default: 1.2 on CUDA, 15%% of the "
                        "budget on CPU)")
    p.add_argument("--save-minutes", type=float, default=1.5, help="save every (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--curriculum", default=DEFAULT_CURRICULUM,
                   help="video-token lengths and the fraction of the training time spent on each, "
                        "in order (default: %(default)s)")
    p.add_argument("--revisit", type=float, default=0.25,
                   help="probability that a step uses an earlier curriculum length (default: %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=32768,
                   help="video tokens per optimiser step; batch = this / length (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to train (default: all)")
    p.add_argument("--task-weights", default="retrieval:0.5,ordering:1.5,counting:1.5,scene:1.5",
                   help="relative sampling frequency of each task (default: %(default)s, the shipped "
                        "model's: retrieval learns fastest)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="(default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="(default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--frame-noise", type=int, default=3,
                   help="uniform pixel noise +-N on training frames (default: %(default)s)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--text-layers", type=int, default=4,
                   help="decoder layers of the language model (the shipped model: %(default)s); "
                        "more layers give the question rows more steps to combine needles on their own")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="HF attention implementation (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=25, help="steps between log lines (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, nargs="*", default=[1024, 4096, 16384, 32768, 65536],
                   help="final evaluation lengths in video tokens (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=16,
                   help="final evaluation samples per task and length (default: %(default)s)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (a directory this script wrote)")
    args = p.parse_args(argv)
    if args.text_layers < 1:
        p.error("--text-layers must be >= 1")
    if args.out is None:
        args.out = needle_kit(args.family).ASSET_DIR
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    if args.reserve_minutes is None:
        args.reserve_minutes = 1.2 if args.device == "cuda" else 0.15 * args.max_minutes
    return args


def parse_curriculum(text: str):
    stages = []
    for item in text.split(","):
        length, frac = item.split(":")
        stages.append((int(length), float(frac)))
    total = sum(f for _, f in stages)
    if not stages or total <= 0 or any(l < 64 or f < 0 for l, f in stages):
        raise SystemExit(f"--curriculum {text!r}: expected LEN:FRACTION,... with LEN >= 64")
    return [(l, f / total) for l, f in stages]


def curriculum_length(stages, frac: float, rng: random.Random, revisit: float) -> int:
    acc, current = 0.0, 0
    for i, (_, f) in enumerate(stages):
        acc += f
        current = i
        if frac < acc:
            break
    if current and rng.random() < revisit:
        current = rng.randrange(current)
    return stages[current][0]


@torch.no_grad()
def evaluate(model, prompter, hf_config, device, tasks, tokens_list, samples, tokens_per_step,
             autocast, progress=True):
    """Teacher-forced exact match {tokens: {task: accuracy}} on eval_set(seed=0); a length
    that runs out of device memory gives {"error": ...} and the next length still runs (in
    float32, HF's SDPA takes its math path for GQA and holds tokens^2 x heads x 4 bytes:
    179 GiB for the Qwen3-VL needle model at 65536 video tokens, 109.5K prompt tokens)."""
    from tqdm.auto import tqdm

    from megatron_spava.tasks import eval_set
    from megatron_spava.tasks.training import loss_and_exact, make_batch
    model.eval()
    results = {}
    for tokens in tokens_list:
        data = eval_set(tasks, tokens, samples, seed=0)
        per_batch = max(1, tokens_per_step // tokens)
        right = {t: [] for t in tasks}
        try:
            for lo in tqdm(range(0, len(data), per_batch), desc=f"eval {tokens} tokens",
                           disable=not progress, leave=False):
                chunk = data[lo:lo + per_batch]
                batch = make_batch(chunk, prompter, hf_config, device)
                with autocast():
                    logits = model(**batch.model_inputs()).logits
                _, exact = loss_and_exact(logits, batch)
                for s, ok in zip(chunk, exact.tolist()):
                    right[s.task].append(ok)
        except torch.OutOfMemoryError as err:
            logits = batch = None
            torch.cuda.empty_cache()
            results[str(tokens)] = {"error": f"out of memory: {str(err).splitlines()[0][:200]}"}
            continue
        results[str(tokens)] = {t: sum(v) / len(v) for t, v in right.items()}
        results[str(tokens)]["all"] = sum(sum(v) for v in right.values()) / len(data)
    model.train()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    import contextlib

    import transformers

    from megatron_spava.tasks import TASKS, groups_for_tokens, make_sample
    from megatron_spava.tasks.training import batch_vision_attention, loss_and_exact, make_batch, plan_batch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    tasks = args.tasks or list(TASKS)
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {TASKS}")
    stages = parse_curriculum(args.curriculum)
    weights = {}
    for item in args.task_weights.split(","):
        name, _, value = item.partition(":")
        weights[name] = float(value)
    task_weights = [weights.get(t, 1.0) for t in tasks]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    kit = needle_kit(args.family)
    tokenizer = kit.build_tokenizer()
    prompter = kit.NeedlePrompter(tokenizer)
    config_class, model_class = kit.hf_classes()
    try:
        config = config_class(**kit.hf_config(tokenizer, text_layers=args.text_layers))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    config._attn_implementation = args.attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = args.attn
    model = model_class(config).to(device)
    model.generation_config.eos_token_id = prompter.eos
    model.generation_config.pad_token_id = prompter.pad
    if args.init_from:
        load_fp16_weights(model, args.init_from)
    patched = batch_vision_attention(model)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                            eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16
                else contextlib.nullcontext)

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "train_log.jsonl")
    log_file = open(log_path, "w")
    command = " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else \
        " ".join(["python", "tools/train_needle_model.py", *argv])
    info = dict(command=command, family=args.family, seed=args.seed, commit=git_commit(args.commit), args=vars(args),
                parameters=params, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(),
                device=(torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"),
                tasks=tasks, curriculum=stages, vision_attention_batched=patched,
                train_seed_offset=TRAIN_SEED_OFFSET, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def log(record):
        record = {"t": round(time.time() - t0, 2), **record}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        print(json.dumps(record), flush=True)

    log({"event": "start", "parameters": params, "device": info["device"], "curriculum": stages,
         "task_weights": dict(zip(tasks, task_weights))})

    def on_term(signum, frame):  # a time limit's SIGTERM: save and log through the finally below
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    budget = args.max_minutes * 60
    train_budget = max(1.0, budget - args.reserve_minutes * 60)
    step, last_save = 0, time.time()
    window = {"loss": [], "exact": {t: [] for t in tasks}}
    status = "ok"
    counter = [0]

    def draw(frac):
        """The samples and host-side batch of the step at time fraction `frac` (in a thread:
        only it touches `rng` and the sample counter)."""
        length = curriculum_length(stages, frac, rng, args.revisit)
        groups = groups_for_tokens(length)
        samples = []
        for _ in range(max(1, args.tokens_per_step // length)):
            samples.append(make_sample(rng.choices(tasks, task_weights)[0], groups=groups,
                                       seed=TRAIN_SEED_OFFSET + args.seed, index=counter[0]))
            counter[0] += 1
        return length, plan_batch(samples, prompter, config)

    prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pending = prefetch.submit(draw, 0.0)
    try:
        model.train()
        while True:
            elapsed = time.time() - t0
            if elapsed >= train_budget or (args.max_steps is not None and step >= args.max_steps):
                break
            frac = elapsed / train_budget
            length, plan = pending.result()
            pending = prefetch.submit(draw, frac)  # the next batch's host work, during this step
            batch = make_batch(plan.samples, prompter, config, device, frame_noise=args.frame_noise,
                               generator=noise_gen, plan=plan)
            batch_size = len(plan.samples)
            warm = min(1.0, (step + 1) / args.warmup_steps)
            cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            lr = args.lr * warm * cosine
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast():
                logits = model(**batch.model_inputs()).logits
            loss, exact = loss_and_exact(logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            window["loss"].append(loss.item())
            for t, ok in zip(batch.tasks, exact.tolist()):
                window["exact"][t].append(ok)
            if step % args.log_every == 0 or step == 1:
                log({"step": step, "tokens": length, "batch": batch_size, "lr": round(lr, 6),
                     "loss": round(sum(window["loss"]) / len(window["loss"]), 4),
                     "grad_norm": round(float(grad_norm), 3),
                     "exact": {t: round(sum(v) / len(v), 3) for t, v in window["exact"].items() if v}})
                window = {"loss": [], "exact": {t: [] for t in tasks}}
            if time.time() - last_save >= args.save_minutes * 60:
                save_checkpoint(model, args.out, tokenizer, {**info, "steps": step, "status": "training"},
                                args.archive, kit.write_checkpoint_files)
                last_save = time.time()
                log({"event": "saved", "step": step})
    except BaseException as err:  # save what there is, log why, then re-raise
        status = f"failed: {type(err).__name__}: {err}"
        log({"event": "error", "step": step, "error": status, "traceback": traceback.format_exc()})
        raise
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        info.update(steps=step, samples=counter[0], train_seconds=round(time.time() - t0, 1),
                    status=status)
        save_checkpoint(model, args.out, tokenizer, info, args.archive, kit.write_checkpoint_files)
        log({"event": "saved", "step": step, "status": status})
        if status == "ok" and args.eval_tokens:
            load_fp16_weights(model, args.out)  # evaluate exactly what was saved
            eval_autocast = contextlib.nullcontext  # float32: as the CPU Megatron path computes
            results = evaluate(model, prompter, config, device, tasks, args.eval_tokens,
                               args.eval_samples, args.tokens_per_step, eval_autocast)
            info.update(final_eval=dict(samples_per_task=args.eval_samples, seed=0, dtype="float32",
                                        metric="teacher-forced exact match", accuracy=results),
                        total_seconds=round(time.time() - t0, 1))
            with open(os.path.join(args.out, "train_info.json"), "w") as f:
                json.dump(info, f, indent=1)
            log({"event": "final_eval", "accuracy": results})
        log_file.close()
        if args.archive:
            write_archive(args.out, args.archive)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"checkpoint: {args.out} ({size / 2 ** 20:.2f} MiB weights, {step} steps, "
          f"{time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
