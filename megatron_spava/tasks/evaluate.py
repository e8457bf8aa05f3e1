"""Needle-task accuracy of every context-parallel algorithm, through the project's Megatron
path (HF checkpoint -> the family's model, Qwen25VLModel or Qwen3VLModel by config.json's
model_type -> frame-parallel vision -> CP prefill -> greedy decode).

    python tools/eval_needles.py --nproc 2 --tokens 1024 4096 --samples 8        # CPU, gloo
    torchrun --nproc-per-node 4 tools/eval_needles.py --device cuda --bf16 \\
        --tokens 4096 16384 32768 65536 --cp-sizes 2 4 --json needles.json \\
        --plot needles.png --markdown needles.md

For every length (video tokens), task and sample index (eval sets are seeded and the same
on every rank), it answers the question under
  full                        exact attention, no context parallelism (the reference)
  ring, star, apb, spava      at each --cp-sizes W
  spava-no-<switch>           Spava with one ablation switch of SpavaConfig off (read from
                              megatron_spava at run time: every boolean switch that is on
                              by default, e.g. zigzag, overlap, shard_anchor, passing)
  spava-selection-<score>     Spava with a selection score other than the default (every
                              entry of algos.spava.selection.SCORERS, e.g. mean: the reference's)
and scores exact match. It also reports the KL divergence KL(full || algo) of the
first-token distributions, the measured recall of the passing selection per decoder layer
(`algos.spava.selection.measure_recall`: the share of the question's exact attention mass on each
selected block that its kept keys carry, averaged over blocks and KV heads), and for the first --hidden-samples samples of each task and
length, the relative error ||h_algo - h_full|| / ||h_full|| of every decoder layer's output
over all tokens and over the query tokens (each token counted once, on the rank that owns
it). With W ranks in the world and CP size c, W / c data-parallel replicas share the
samples; `full` runs on rank 0 alone (on every rank for the --hidden-samples samples and
with --fp8-format). A sample's video is encoded once per CP size (and frame_parallel
setting) and its embeddings are reused by every algorithm: a record's ttft_s counts that
one encoding's seconds.

Devices: CPU ranks (gloo); one GPU per rank (NCCL); or several ranks sharing fewer GPUs
(--backend gloo, chosen automatically when ranks outnumber GPUs: all-gather, all-reduce
and broadcast work on CUDA tensors under gloo, and `ring` stages its point-to-point
transfers through host memory). Timings from shared GPUs mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..launch import init_distributed, model_parallel_state
from ..algos.spava.selection import measure_recall
from .needles import TASKS, eval_set, needle_blocks, score

def ablation_switches() -> List[str]:
    """The SpavaConfig switches evaluated one at a time (`config.SWITCHES`): the paper's
    ablation chain (`config.ABLATIONS`, in order) and `passing`."""
    from ..config import SWITCHES
    return list(SWITCHES)


def variants() -> List[Tuple[str, str, dict]]:
    """(name, algorithm, SpavaConfig changes) of everything evaluated: every registered
    algorithm that runs inside SpavaCoreAttention (full first), then spava-no-<switch>, then
    spava-selection-<score> for every selection score but the default (read at call time)."""
    from ..algos.registry import ablation_variants, entries, parse_variant, selection_variants
    out = [(e.name, e.name, {}) for e in entries() if e.attn_func is not None]
    return out + [(name, *parse_variant(name))
                  for name in ablation_variants("spava", ablation_switches()) + selection_variants()]


def build_parser() -> argparse.ArgumentParser:
    names = [v[0] for v in variants()]
    p = argparse.ArgumentParser(prog="eval_needles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="HF needle-model checkpoint of a family with a needle kit "
                   "(Qwen2.5-VL, Qwen3-VL: read from its config.json; default: the shipped Qwen2.5-VL "
                   "needle model; megatron_spava/assets/needle_qwen3 is the Qwen3-VL one)")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768, 65536],
                   help="video lengths in LLM tokens (default: %(default)s)")
    p.add_argument("--cp-sizes", type=int, nargs="+", default=None,
                   help="context-parallel sizes (each divides the world size; default: the world size)")
    p.add_argument("--algos", nargs="+", default=names, metavar="ALGO",
                   help=f"from {names} (default: all); full always runs (the reference)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--samples", type=int, default=20, help="samples per task and length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="eval-set seed (default: %(default)s; training "
                   "never uses seeds below 1000003)")
    p.add_argument("--hidden-samples", type=int, default=1,
                   help="samples per task and length whose per-layer hidden-state error is measured "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: NCCL with a GPU per rank, else gloo (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to launch when not under torchrun (default: the largest --cp-sizes, or 2)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new samples after this long (every rank at the same sample; "
                        "the report says how many were done)")
    p.add_argument("--json", help="write all results (and every sample's answer) here")
    p.add_argument("--plot", help="write a PNG of accuracy vs tokens here")
    p.add_argument("--markdown", help="write the BENCHMARKS.md tables here")
    p.add_argument("--verbose", action="store_true", help="show megatron-core's warnings and tracebacks")
    from ..launch import add_distributed_timeout_arg
    add_distributed_timeout_arg(p)
    from ..arguments import add_spava_args
    add_spava_args(p, algorithm=False)  # budgets and switches every variant starts from
    from ..fp8 import add_fp8_args
    add_fp8_args(p)  # FP8 linears on TE layers: compare against a bf16 run of the same samples
    from ..specs import add_lm_fusions_arg, add_transformer_impl_arg
    add_transformer_impl_arg(p, cp_comm_type=False)
    add_lm_fusions_arg(p)
    p._option_string_actions["--transformer-impl"].help = (
        "the language model's layers: megatron-core's own (local) or Transformer Engine's "
        "(transformer_engine, CUDA only) (default: transformer_engine with --fp8-format, else local; "
        "give transformer_engine to the bf16 run that an FP8 run is compared with)")
    return p


# ------------------------------------------------------------------------------- ranks

def _build_model(checkpoint: str, cp: int, device, dtype, fp8_format=None, fp8_recipe="delayed",
                 transformer_impl=None, lm_fusions=None):
    """The checkpoint's family's megatron model (config.json's model_type), loaded, eval mode.
    transformer_impl: "transformer_engine" for Transformer Engine's layers (default: with
    fp8_format), else megatron-core's local layers; fp8_format: the language model's linears
    in FP8 (megatron_spava.fp8); lm_fusions: the language model's fused kernels
    (`specs.resolve_lm_fusions`; None: the backend's default)."""
    from ..models.registry import detect_family
    family = detect_family(checkpoint)
    te = (transformer_impl or ("transformer_engine" if fp8_format else "local")) == "transformer_engine"
    extra = {"backend": "transformer_engine"} if te else {}
    extra["lm_fusions"] = lm_fusions
    model = family.model_class()(family.config(checkpoint), context_parallel=cp, dtype=dtype,
                                 use_cpu_initialization=True, perform_initialization=False, **extra)
    family.convert().load_hf_into_model(model, checkpoint, tp_rank=0, tp_size=1, progress=False)
    model = model.to(device).eval()
    if fp8_format:
        from ..fp8 import set_fp8
        set_fp8(model, fp8_format, fp8_recipe)
    return model


class LayerCapture:
    """Outputs [s, b, h] of every decoder layer in the first forward after `arm()` (the
    prefill of a generate call), as float32 on the device."""

    def __init__(self, model):
        self.layers = list(model.language_model.decoder.layers)
        self.outputs: List[torch.Tensor] = []
        self.armed = False
        for layer in self.layers:
            layer.register_forward_hook(self._hook)

    def arm(self):
        self.outputs, self.armed = [], True

    def _hook(self, module, inputs, output):
        if self.armed:
            self.outputs.append((output[0] if isinstance(output, tuple) else output).float())
            if len(self.outputs) == len(self.layers):
                self.armed = False


def _kl(full_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(full_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def run(args) -> Optional[dict]:
    """Evaluate on this rank; rank 0 returns the results (others None).

    Sample-major: each sample is rendered once, answered under full attention on rank 0
    (the reference for KL; on every rank for the hidden-state samples and under FP8), then
    by each (CP size, algorithm) on the data-parallel replica that owns it (sample i belongs
    to replica i mod replicas). The vision embeddings of a sample are encoded once per CP
    size (and frame_parallel setting) and reused by every algorithm there, and its rope
    positions computed once per CP size (`generate`'s prompt_cache: the same values as
    computing again). Samples are ordered index-major, so --max-minutes cuts the same
    number of samples from every task and length, and the hidden-state samples come first."""
    from tqdm.auto import tqdm

    from ..arguments import spava_config_from_args
    from ..inference.generate import generate
    from .model import needle_prompter, shipped_checkpoint
    from .needles import render_frames

    t0 = time.time()
    if dist.is_initialized():  # called inside an existing process group (tests: run_ranks)
        if args.device != "cpu":
            raise ValueError("evaluate.run inside an existing process group runs on the CPU only")
        from .. import cpu_compat
        cpu_compat.apply()
        device = torch.device("cpu")
    else:
        from ..launch import distributed_timeout
        device = init_distributed(args.device, args.backend, distributed_timeout(args))
    rank, world = dist.get_rank(), dist.get_world_size()
    cp_sizes = args.cp_sizes or [world]
    for cp in cp_sizes:
        if world % cp:
            raise ValueError(f"--cp-sizes {cp} does not divide the world size {world}")
    checkpoint = args.checkpoint or shipped_checkpoint()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    prompter = needle_prompter(checkpoint)
    sets = {t: eval_set(args.tasks, t, args.samples, args.seed) for t in args.tokens}
    flat = sorted(((t, s) for t in args.tokens for s in sets[t]),
                  key=lambda ts: (ts[1].index, args.tokens.index(ts[0]), args.tasks.index(ts[1].task)))
    wanted = [v for v in variants() if v[0] in args.algos and v[0] != "full"]
    spava_base = spava_config_from_args(args)  # --spava-* budgets and switches
    max_new = 1 + max(len(prompter.answer_ids(s.answer)) for _, s in flat)

    # One model per CP size (each built under its own parallel state; a model keeps the
    # groups it was built with), and the full-attention reference.
    ps = model_parallel_state(1, 1)
    full_group = ps.get_context_parallel_group()
    full_model = _build_model(checkpoint, 1, device, dtype, args.fp8_format, args.fp8_recipe,
                              args.transformer_impl, args.lm_fusions)
    full_capture = LayerCapture(full_model)
    setups = []
    for cp in cp_sizes:
        ps = model_parallel_state(1, cp)
        model = _build_model(checkpoint, cp, device, dtype, args.fp8_format, args.fp8_recipe,
                             args.transformer_impl, args.lm_fusions)
        setups.append(dict(cp=cp, model=model, capture=LayerCapture(model),
                           group=ps.get_context_parallel_group(), cp_rank=ps.get_context_parallel_rank(),
                           replica=ps.get_data_parallel_rank(), replicas=ps.get_data_parallel_world_size()))
    records: List[dict] = []
    hidden: List[dict] = []
    # The reference runs on rank 0 (its records and every KL, computed there at the end), and
    # on every rank for the samples whose hidden-state errors are measured (each rank compares
    # its own rows) and under FP8 (TE reduces amaxes over the model-parallel group in every
    # forward). Other ranks would compute the same values: full attention of one prompt on
    # one rank is the same computation everywhere.
    everywhere = bool(args.fp8_format)
    reference: Dict[tuple, torch.Tensor] = {}  # rank 0: (tokens, task, index) -> first-token logits
    done, stopped = 0, False
    bar = tqdm(total=len(flat), disable=rank != 0, desc="needle eval", unit="sample")
    for i, (tokens, s) in enumerate(flat):
        if args.max_minutes is not None:  # every rank stops at the same sample
            late = torch.tensor([float(time.time() - t0 > 60 * args.max_minutes)], device=device)
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
            if late.item():
                stopped = True
                break
        inputs = prompter.inputs(s, render_frames(s, device))
        measure = s.index < args.hidden_samples
        base = dict(tokens=tokens, task=s.task, index=s.index, answer=s.answer,
                    prompt_tokens=int(inputs.input_ids.shape[1]))
        if rank == 0 or measure or everywhere:
            if measure:
                full_capture.arm()
            full = generate(full_model, inputs, algo="full", cp_group=full_group, max_new_tokens=max_new,
                            device=device, group=full_group)
        if rank == 0:
            reference[(tokens, s.task, s.index)] = full.first_logits
            pred = prompter.decode(full.tokens)
            records.append(dict(algo="full", cp=1, **base, prediction=pred, correct=score(pred, s.answer),
                                kl=0.0, ttft_s=full.ttft_s))
        videos: dict = {}  # this sample's vision embeddings and positions, once per model (and CP group)
        for st in setups:
            if i % st["replicas"] != st["replica"]:
                continue
            for name, algo, changes in wanted:
                # unfused variants prefill the context alone: their first forward has no query
                # rows to compare, so their hidden-state errors are not measured
                measured = measure and changes.get("fuse_query", True)
                if measured:
                    st["capture"].arm()
                with measure_recall() as recall:
                    out = generate(st["model"], inputs, algo=algo, config=spava_base.replace(**changes),
                                   cp_group=st["group"], max_new_tokens=max_new, device=device,
                                   group=st["group"], prompt_cache=videos)
                layout = out.layout
                recall = _layer_recall(recall, len(st["capture"].layers), st["group"], st["cp"], device)
                if measured:
                    errors = _hidden_errors(full_capture.outputs, st["capture"].outputs, layout,
                                            st["cp_rank"], st["cp"], st["group"], inputs.input_ids.shape[1])
                    if st["cp_rank"] == 0:
                        hidden.append(dict(algo=name, cp=st["cp"], tokens=tokens, task=s.task,
                                           index=s.index, **errors))
                if st["cp_rank"] == 0:
                    pred = prompter.decode(out.tokens)
                    records.append(dict(
                        algo=name, cp=st["cp"], **base, prediction=pred, correct=score(pred, s.answer),
                        kl=None, first_logits=out.first_logits, ttft_s=out.ttft_s, recall=recall,
                        where=needle_blocks(s, layout, prompter.group_token),
                        anchor_len=getattr(layout, "anchor_len", None),
                        block_len=getattr(layout, "block_len", None),
                        passing_len=getattr(layout, "passing_len", None)))
        full_capture.outputs = []
        done += 1
        bar.update()
    bar.close()
    everything: List[Optional[Tuple[list, list]]] = [None] * world
    dist.all_gather_object(everything, (records, hidden))
    if rank != 0:
        return None
    records = [r for part in everything for r in part[0]]
    for r in records:  # KL(full || algo) of the first-token distributions, against rank 0's reference
        logits = r.pop("first_logits", None)
        if logits is not None:
            r["kl"] = _kl(reference[(r["tokens"], r["task"], r["index"])], logits)
    hidden = [h for part in everything for h in part[1]]
    meta = _meta(args, world, cp_sizes, checkpoint, device, wanted)
    meta.update(samples_done=done, samples_planned=len(flat), stopped_by_time_limit=stopped,
                wall_s=round(time.time() - t0, 1))
    return dict(meta=meta, summary=summarise(records), hidden=summarise_hidden(hidden),
                records=records, hidden_records=hidden)


def _layer_recall(recall: dict, layers: int, group, cp: int, device) -> Optional[List[Optional[float]]]:
    """Per-layer measured recall of one prefill, over every rank of the CP group (sums of
    `measure_recall` all-reduced); None where nothing was selected (no passing blocks)."""
    sums = torch.zeros(layers, 2, dtype=torch.float64, device=device)
    for layer, (total, count) in recall.items():
        if layer is not None:
            sums[layer] += torch.tensor([total, count], dtype=torch.float64, device=device)
    if cp > 1:
        dist.all_reduce(sums, group=group)
    sums = sums.cpu().tolist()
    if not any(c for _, c in sums):
        return None
    return [t / c if c else None for t, c in sums]


def _hidden_errors(full_out, algo_out, layout, cp_rank, cp, group, total) -> dict:
    """Per-layer relative errors over all tokens and over the query tokens (sums of
    squares all-reduced over the CP group, each token counted once)."""
    idx = layout.local_indices(cp_rank).to(full_out[0].device)
    own = layout.owned_rows(cp_rank).to(full_out[0].device)  # each token counted once
    query = idx >= layout.context_len
    sums = []
    for ref, got in zip(full_out, algo_out):
        ref_local = ref[idx]
        diff = (got - ref_local).pow(2).sum(dim=(1, 2))
        norm = ref_local.pow(2).sum(dim=(1, 2))
        sums.append(torch.stack([diff[own].sum(), norm[own].sum(), diff[own & query].sum(),
                                 norm[own & query].sum()]))
    sums = torch.stack(sums).double()
    if cp > 1:
        dist.all_reduce(sums, group=group)
    sums = sums.cpu()
    rel = lambda d, n: math.sqrt(d / n) if n > 0 else 0.0
    return dict(rel_err=[rel(d, n) for d, n in sums[:, :2].tolist()],
                query_rel_err=[rel(d, n) for d, n in sums[:, 2:].tolist()])


def _meta(args, world, cp_sizes, checkpoint, device, wanted) -> dict:
    from ..arguments import spava_config_from_args
    from ..provenance import git_commit
    commit = git_commit()
    info = {}
    train_info = os.path.join(checkpoint, "train_info.json")
    if os.path.isfile(train_info):
        with open(train_info) as f:
            t = json.load(f)
        info = {k: t.get(k) for k in ("commit", "seed", "command", "steps", "device")}
    return dict(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M %Z"), commit=commit,
                device=(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                backend=dist.get_backend(), world=world, cp_sizes=cp_sizes, tokens=args.tokens,
                tasks=args.tasks, samples=args.samples, seed=args.seed,
                dtype="bfloat16" if args.bf16 else "float32", transformer_impl=args.transformer_impl,
                lm_fusions=args.lm_fusions, fp8=f"{args.fp8_format} ({args.fp8_recipe})" if args.fp8_format else None,
                checkpoint=checkpoint, model=info,
                algos=["full"] + [w[0] for w in wanted], torch=torch.__version__,
                spava_config=dataclasses.asdict(spava_config_from_args(args)))


# ----------------------------------------------------------------------------- reports

def summarise(records: Sequence[dict]) -> List[dict]:
    """Accuracy, mean KL, mean TTFT and mean per-layer recall (None without passing
    selection) per (algo, cp, tokens, task), plus task "all"."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        for task in (r["task"], "all"):
            groups.setdefault((r["algo"], r["cp"], r["tokens"], task), []).append(r)
    rows = []
    for (algo, cp, tokens, task), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0], kv[0][3])):
        rows.append(dict(algo=algo, cp=cp, tokens=tokens, task=task, n=len(rs),
                         accuracy=sum(r["correct"] for r in rs) / len(rs),
                         kl=sum(r["kl"] for r in rs) / len(rs),
                         ttft_s=sum(r["ttft_s"] for r in rs) / len(rs),
                         recall=_mean_recall([r.get("recall") for r in rs])))
    return rows


def _mean_recall(per_record: Sequence[Optional[List[Optional[float]]]]) -> Optional[List[Optional[float]]]:
    """Per-layer mean over the records that measured a recall."""
    have = [r for r in per_record if r]
    if not have:
        return None
    layers = [[r[l] for r in have if r[l] is not None] for l in range(len(have[0]))]
    return [sum(v) / len(v) if v else None for v in layers]


def summarise_hidden(hidden: Sequence[dict]) -> List[dict]:
    """Mean per-layer relative error per (algo, cp, tokens) over the measured samples."""
    groups: Dict[tuple, List[dict]] = {}
    for h in hidden:
        groups.setdefault((h["algo"], h["cp"], h["tokens"]), []).append(h)
    out = []
    for (algo, cp, tokens), hs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        layers = len(hs[0]["rel_err"])
        out.append(dict(algo=algo, cp=cp, tokens=tokens, n=len(hs),
                        rel_err=[sum(h["rel_err"][l] for h in hs) / len(hs) for l in range(layers)],
                        query_rel_err=[sum(h["query_rel_err"][l] for h in hs) / len(hs) for l in range(layers)]))
    return out


def scene_breakdown(records: Sequence[dict]) -> List[dict]:
    """Scene-task accuracy by where the title card sits relative to the needle: in the
    anchor, in the needle's own block, or in an earlier block (needs passing blocks)."""
    groups: Dict[tuple, List[bool]] = {}
    for r in records:
        if r["task"] != "scene" or not r.get("where"):
            continue
        card, needle = r["where"]["cards"][0], r["where"]["needles"][0]
        kind = "anchor" if card == "anchor" else ("same block" if card == needle else "earlier block")
        groups.setdefault((r["algo"], r["cp"], kind), []).append(r["correct"])
    return [dict(algo=a, cp=c, card=k, n=len(v), accuracy=sum(v) / len(v))
            for (a, c, k), v in sorted(groups.items())]


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["summary"]
    acc = {(r["algo"], r["cp"], r["tokens"], r["task"]): r for r in rows}
    tokens = meta["tokens"]
    lines = [f"Command: `{meta['command']}`  ",
             f"Device: {meta['device']} ({meta['backend']}, {meta['world']} ranks, {meta['dtype']}); "
             f"date {meta['date']}; commit {meta['commit']}; checkpoint {meta['checkpoint']} "
             f"(trained at {meta['model'].get('commit')}, seed {meta['model'].get('seed')}); "
             f"{meta['samples']} samples per task and length (seed {meta['seed']})"
             + (f"; stopped by --max-minutes after {meta['samples_done']} of {meta['samples_planned']} "
                f"samples" if meta.get("stopped_by_time_limit") else "") + ".", ""]
    for task in ["all", *meta["tasks"]]:
        lines += [f"**{task}**: exact-match accuracy, gap to full in points", "",
                  "| algorithm | CP | " + " | ".join(f"{t // 1024}K" if t >= 1024 else str(t) for t in tokens) + " |",
                  "|---|---|" + "---|" * len(tokens)]
        for algo in meta["algos"]:
            for cp in ([1] if algo == "full" else meta["cp_sizes"]):
                cells = []
                for t in tokens:
                    r = acc.get((algo, cp, t, task))
                    if r is None:
                        cells.append("-")
                        continue
                    full = acc.get(("full", 1, t, task))
                    gap = "" if algo == "full" or full is None else f" ({100 * (r['accuracy'] - full['accuracy']):+.0f})"
                    cells.append(f"{100 * r['accuracy']:.0f}{gap}")
                lines.append(f"| {algo} | {cp} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**First-token KL(full || algo)**, mean over all tasks (nats)", "",
              "| algorithm | CP | " + " | ".join(str(t) for t in tokens) + " |", "|---|---|" + "---|" * len(tokens)]
    for algo in meta["algos"][1:]:
        for cp in meta["cp_sizes"]:
            cells = [f"{acc[(algo, cp, t, 'all')]['kl']:.2e}" if (algo, cp, t, "all") in acc else "-" for t in tokens]
            lines.append(f"| {algo} | {cp} | " + " | ".join(cells) + " |")
    lines.append("")
    recall_rows = [(algo, cp) for algo in meta["algos"][1:] for cp in meta["cp_sizes"]
                   if any((acc.get((algo, cp, t, "all")) or {}).get("recall") for t in tokens)]
    if recall_rows:
        lines += ["**Measured recall of the passing selection**: share of the question's exact attention "
                  "mass on a selected block that its kept keys carry, per decoder layer (layer 0 first), "
                  "mean over blocks, KV heads and samples", "",
                  "| algorithm | CP | " + " | ".join(str(t) for t in tokens) + " |", "|---|---|" + "---|" * len(tokens)]
        for algo, cp in recall_rows:
            cells = []
            for t in tokens:
                rec = (acc.get((algo, cp, t, "all")) or {}).get("recall")
                cells.append(" ".join("-" if x is None else f"{x:.2f}" for x in rec) if rec else "-")
            lines.append(f"| {algo} | {cp} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["hidden"]:
        lines += ["**Relative error of each decoder layer's output** vs full, all tokens / query tokens "
                  "(mean over the measured samples)", "", "| algorithm | CP | tokens | per layer (all) | per layer (query) |",
                  "|---|---|---|---|---|"]
        for h in result["hidden"]:
            lines.append(f"| {h['algo']} | {h['cp']} | {h['tokens']} | "
                         + " ".join(f"{e:.1e}" for e in h["rel_err"]) + " | "
                         + " ".join(f"{e:.1e}" for e in h["query_rel_err"]) + " |")
        lines.append("")
    breakdown = scene_breakdown(result["records"])
    if breakdown:
        lines += ["**scene** accuracy by where the title card is (all lengths)", "",
                  "| algorithm | CP | card in | n | accuracy |", "|---|---|---|---|---|"]
        for b in breakdown:
            lines.append(f"| {b['algo']} | {b['cp']} | {b['card']} | {b['n']} | {100 * b['accuracy']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Accuracy vs tokens, one line per algorithm; one panel per (CP size, task)."""
    from .plot import line_panels
    meta, rows = result["meta"], result["summary"]
    panels = []
    for cp in meta["cp_sizes"]:
        for task in ["all", *meta["tasks"]]:
            series = {}
            for algo in meta["algos"]:
                pick_cp = 1 if algo == "full" else cp
                pts = sorted((r["tokens"], 100 * r["accuracy"]) for r in rows
                             if r["algo"] == algo and r["cp"] == pick_cp and r["task"] == task)
                if pts:
                    series[algo] = pts
            panels.append((f"{task}, CP={cp}", series))
    line_panels(panels, path, xlabel="video tokens (log scale)", ylabel="accuracy %", ylim=(0, 100))


def main(argv=None) -> int:
    from ..launch import ERROR_DIR_ENV, quiet_known_warnings
    if ERROR_DIR_ENV not in os.environ:  # the launching process (the ranks: below)
        quiet_known_warnings("--verbose" in (sys.argv[1:] if argv is None else argv), announce=False)
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..launch import RankError, quiet_known_warnings, relaunch, report_rank_errors, under_torchrun
    unknown = [a for a in args.algos if a not in [v[0] for v in variants()]]
    if unknown:
        parser.error(f"unknown --algos {unknown}; choose from {[v[0] for v in variants()]}")
    if not under_torchrun():
        try:  # bad input: one line, before any rank starts
            check_args(args)
            relaunch("megatron_spava.tasks.evaluate", args.nproc or max(args.cp_sizes or [2]), argv,
                     verbose=args.verbose)
        except (ValueError, FileNotFoundError) as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        except RankError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 1
        return 0
    quiet_known_warnings(args.verbose, announce=os.environ.get("RANK") == "0")
    with report_rank_errors(args.verbose):
        resolve_layers(args)
        _main_rank(args)
    return 0


def check_args(args) -> None:
    """ValueError / FileNotFoundError for flags no rank could run with. Pure but for reading
    the checkpoint's config.json."""
    from ..launch import distributed_timeout
    from ..models.common.checkpoint_io import read_hf_config
    from .model import shipped_checkpoint
    for flag, values in (("--tokens", args.tokens), ("--samples", [args.samples]), ("--nproc", [args.nproc]),
                         ("--cp-sizes", args.cp_sizes or [])):
        bad = [v for v in values if v is not None and v < 1]
        if bad:
            raise ValueError(f"{flag} must be >= 1, got {bad[0]}")
    if args.hidden_samples < 0:
        raise ValueError(f"--hidden-samples must be >= 0, got {args.hidden_samples}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    distributed_timeout(args)
    resolve_layers(args)
    read_hf_config(args.checkpoint) if args.checkpoint else shipped_checkpoint()


def resolve_layers(args) -> None:
    """args.transformer_impl and args.lm_fusions resolved in place (their defaults: TE layers
    with --fp8-format, else local; `specs.resolve_lm_fusions`, te-ops with FP8). Run by the
    launching process (`check_args`) and by every rank, which parse the flags again.
    ValueError (one line) for FP8 that cannot run here (`fp8.fp8_error`) or a choice these
    layers cannot run."""
    from ..fp8 import fp8_error
    from ..specs import resolve_lm_fusions, resolve_transformer_impl
    impl = args.transformer_impl or ("transformer_engine" if args.fp8_format else "local")
    error = fp8_error(args.fp8_format, args.fp8_recipe, args.device, impl)
    if error:
        raise ValueError(error)
    args.transformer_impl = resolve_transformer_impl(impl, args.device, verbose=False)
    try:
        args.lm_fusions = resolve_lm_fusions(args.lm_fusions, args.transformer_impl, fp8=bool(args.fp8_format))
    except ValueError as err:
        raise ValueError(f"--lm-fusions: {err}") from None


def _main_rank(args) -> None:
    try:
        result = run(args)
        if result is not None:
            print(markdown(result))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
            if args.plot:
                plot(result, args.plot)
            if args.markdown:
                with open(args.markdown, "w") as f:
                    f.write(markdown(result) + "\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
