"""The model-family conformance suite: what every registered family must pass, written once.
tests/test_families.py runs it for every family in `megatron_spava.models.registry`;
tests/test_toy_family.py for a toy family registered from its own folder.

  check_interface      the tiny checkpoint is detected as the family, its config validates and
                       maps back to the family, the prompter turns a clip into the family's
                       inputs with one frame group per `frames_per_group` frames, the one
                       frame-group check speaks in the family's words, the synthetic prompts
                       have the lengths `prompt_lengths` reports, the released shapes build
  check_round_trip_and_tp2_cp2_match_hf
                       HF -> dist checkpoint -> HF is bit-exact (keys, dtypes, config); the
                       dist checkpoint loaded at TP 1 x CP 1 (exact attention) and at TP 2 x
                       CP 2 (4 gloo ranks, Spava at full budget: SPAVA.md section 3's
                       exactness) gives HF's first-token logits (transformers' own model class,
                       its own rope index; relative error < 1e-5) and greedy tokens, the same
                       on every rank
  check_demo           megatron-spava-demo --model <family> --random-weights: the generated
                       checkpoint and needle video, Spava on 2 CPU ranks at full budget answers
                       like exact attention on one

A case is (family, tiny checkpoint, inputs of a clip); the reference is HF's model
(`family.hf_model_class()`, `family.hf_inputs`), never our own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_spava.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is happening in this video?"
FRAMES = 8
MAX_NEW = 6
FULL_BUDGET = dict(budget_align=1, anchor_len=8, passing_len=4096)


@dataclass(frozen=True)
class Case:
    family: object      # models.family.ModelFamily
    checkpoint: str     # its tiny checkpoint (HF format)
    inputs: object      # the family's inputs for a FRAMES-frame clip and QUESTION


def clip(frames: int = FRAMES, seed: int = 0):
    """A sampled video: frames 0, 12, 24, ... of a 24 fps source, 64 x 128 pixels."""
    from megatron_spava.video.io import VideoClip
    gen = np.random.default_rng(seed)
    return VideoClip(gen.integers(0, 256, (frames, 64, 128, 3), dtype=np.uint8), 2.0, "synthetic",
                     [12 * i for i in range(frames)], 12 * frames, 24.0)


def make_case(family, directory: str) -> Case:
    family.tiny().make_tiny_checkpoint(directory)
    return Case(family, directory, family.prompter(directory)(clip(), QUESTION))


def hf_reference(case: Case, max_new: int = MAX_NEW):
    """HF's first-token logits [vocab] and greedy tokens (its own rope index and cache)."""
    hf = case.family.hf_model_class().from_pretrained(case.checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(**case.family.hf_inputs(case.inputs, hf.config), use_cache=True)
        first = out.logits[0, -1]
        token, tokens, past = int(first.argmax()), [], out.past_key_values
        while True:
            tokens.append(token)
            if len(tokens) == max_new:
                break
            out = hf(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    assert len(set(tokens)) > 2  # the tiny model's answer varies: a real decode check
    return first, tokens


# ---------------------------------------------------------------- the interface (fast)

def check_interface(case: Case) -> None:
    from megatron_spava.models.registry import detect_family, family_of_config
    family, inputs = case.family, case.inputs
    assert detect_family(case.checkpoint) == family
    cfg = family.config(case.checkpoint)
    assert type(cfg) is family.config_type()
    cfg.validate(1)
    assert family_of_config(cfg).bench() is family.bench()
    # the prompter: the family's preprocessing and prompt around one group per frames_per_group frames
    groups = FRAMES // family.frames_per_group
    ids = inputs.input_ids
    assert inputs.frame_groups == groups
    assert int((ids == cfg.vision_token_id).sum()) > 0
    assert 0 < cfg.query_length(ids) < ids.shape[1]
    # the one frame-group check, in the family's words
    assert family.frame_group_error(groups, groups) is None
    error = family.frame_group_error(groups, groups + 1)
    assert f"{groups} {family.group_units} for {groups + 1} ranks" in error and family.group_unit in error
    # the benchmarks' synthetic prompts: the lengths prompt_lengths reports, the family's input type
    from megatron_spava.perf.inputs import prompt_lengths, synthetic_inputs, vision_flops_per_group
    for n, multiple in ((1500, 1), (3000, 4)):
        g, context, query = prompt_lengths(n, cfg, multiple)
        x = synthetic_inputs(cfg, n, 0, multiple)
        assert type(x) is type(inputs) and x.frame_groups == g
        assert x.input_ids.shape[1] == context + query and x.input_ids.shape[1] % multiple == 0
        assert cfg.query_length(x.input_ids) == query
    assert vision_flops_per_group(cfg) > 0
    for shape in family.shapes:  # the released shapes the demo and the benchmark build
        family.config(family.tiny().shaped_hf_config(shape)).validate(1)


# ---------------------------------------------------------------- conversion and TP x CP vs HF

def _convert_rank(family, hf_dir, meg, back):
    family.convert().hf_to_dist(hf_dir, meg, progress=False)
    family.convert().dist_to_hf(meg, back, progress=False)


def _rank(family, source, tp, cp, algo, budget, inputs, dist_ckpt):
    """This rank's (tokens, first-token logits) of the family's model at TP x CP, loaded from
    `source` (a dist checkpoint when dist_ckpt, else HF)."""
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.config import SpavaConfig
    from megatron_spava.inference.generate import generate

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_rng_tracker(inference_rng_tracker=True)
    model = family.model_class()(family.config(source), tensor_parallel=tp, context_parallel=cp,
                                 perform_initialization=False).eval()
    if dist_ckpt:
        family.convert().load_dist_into_model(model, source)
    else:
        family.convert().load_hf_into_model(model, source, tp_rank=ps.get_tensor_model_parallel_rank(),
                                            tp_size=tp, progress=False)
    out = generate(model, inputs, algo=algo, config=SpavaConfig(**budget), cp_group=ps.get_context_parallel_group(),
                   max_new_tokens=MAX_NEW, eos_token_ids=[],
                   rope_convention="hf" if family.rope_conventions else None)  # HF's own rope rule
    return out.tokens, out.first_logits


def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _hf_tensors(path):
    from megatron_spava.models.common.checkpoint_io import iter_hf_tensors
    return dict(iter_hf_tensors(path))


def check_round_trip_and_tp2_cp2_match_hf(case: Case, tmp: str) -> None:
    family = case.family
    meg, back = os.path.join(tmp, "meg"), os.path.join(tmp, "back")
    run_ranks(_convert_rank, 1, family, case.checkpoint, meg, back, timeout=300)
    original, again = _hf_tensors(case.checkpoint), _hf_tensors(back)
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    config = lambda d: json.load(open(os.path.join(d, "config.json")))  # noqa: E731
    assert config(back) == config(case.checkpoint)
    ref_first, ref_tokens = hf_reference(case)
    for tp, cp, algo, budget in ((1, 1, "full", {}), (2, 2, "spava", FULL_BUDGET)):
        results = run_ranks(_rank, tp * cp, family, meg, tp, cp, algo, budget, case.inputs, True, timeout=300)
        for tokens, first in results:
            torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
            assert _relative(first, ref_first) < 1e-5, (tp, cp, _relative(first, ref_first))
            assert tokens == ref_tokens, (tp, cp)
        assert all(torch.equal(first, results[0][1]) for _, first in results)  # one answer everywhere


# ---------------------------------------------------------------- the main job

def check_demo(family, tmp: str, env: dict = None) -> None:
    """The demo on a generated random checkpoint of the family (16 frames of the needle video),
    Spava on 2 CPU ranks at full budget vs exact attention on one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    out = subprocess.run([sys.executable, "-m", "megatron_spava.video_qa", "--model", family.name,
                          "--random-weights", "--work-dir", tmp, "--needle-tokens", "1024",
                          "--max-frames", "16", "--max-new-tokens", "4", "--spava-passing-len", "1024",
                          "--json", os.path.join(tmp, "r.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.load(open(os.path.join(tmp, "r.json")))
    assert result["model"] == family.name and set(result["runs"]) == {"spava", "full"}
    assert result["runs"]["spava"]["cp"] == 2 and result["frames"] == 16
    assert result["video_tokens"] > 0 and result["video_tokens"] % (16 // family.frames_per_group) == 0
    assert result["first_logits_max_abs_diff"] < 1e-3 and result["same_answer"]
    assert len(result["runs"]["spava"]["tokens"]) == 4  # random weights: no early end
