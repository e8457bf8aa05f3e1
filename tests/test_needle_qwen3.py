"""The Qwen3-VL needle model (`tools/train_needle_model.py --family qwen3_vl`,
models/qwen3_vl/needle.py): a handful of training steps on the CPU lower the loss; the saved
checkpoint loads through the evaluation's family dispatch into our Megatron Qwen3VLModel,
whose first-token logits equal HF's Qwen3VLForConditionalGeneration computing its own rope
index (the independent reference); its prompts are the Qwen3-VL prompter's (the chat
template's text with the processor's timestamped groups, tokenized whole); the batched
vision attention of training equals HF's per-frame loop."""

import functools
import json
import os

import numpy as np
import pytest
import torch

from megatron_spava.tasks import TASKS, make_sample, render_frames


@functools.lru_cache(maxsize=1)
def _kit():
    from megatron_spava.tasks.model import needle_kit
    return needle_kit("qwen3_vl")


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return _kit().build_tokenizer()


@pytest.fixture(scope="module")
def files_only(tmp_path_factory):
    """A needle checkpoint directory without weights: config, tokenizer, processor configs."""
    out = str(tmp_path_factory.mktemp("needle3files"))
    kit = _kit()
    kit.hf_classes()[0](**kit.hf_config(_tokenizer())).save_pretrained(out)
    kit.write_checkpoint_files(out, _tokenizer())
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 steps of the training tool on the CPU (64-128 video tokens, batch 4 or 2), saved."""
    from megatron_spava.tasks.train import main
    out = str(tmp_path_factory.mktemp("needle3") / "ckpt")
    main(["--family", "qwen3_vl", "--device", "cpu", "--max-steps", "8", "--max-minutes", "5",
          "--curriculum", "64:0.5,128:0.5", "--tokens-per-step", "256", "--warmup-steps", "2",
          "--log-every", "1", "--eval-tokens", "64", "--eval-samples", "1", "--out", out])
    return out


@pytest.mark.slow  # 8 training steps, 15-50 s on 2 busy cores
def test_training_lowers_the_loss_and_saves_a_qwen3_vl_checkpoint(trained):
    with open(os.path.join(trained, "train_log.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    with open(os.path.join(trained, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen3_vl" and cfg["vision_config"]["patch_size"] == 16
    with open(os.path.join(trained, "train_info.json")) as f:
        assert json.load(f)["family"] == "qwen3_vl"
    assert os.path.getsize(os.path.join(trained, "model.safetensors")) < 10 * 2 ** 20  # ships in git


def test_answer_words_are_single_tokens_and_prompts_are_the_qwen3_vl_prompters(files_only):
    """NeedlePrompter's concatenated ids and pixels == Qwen3VLPrompter's (the checkpoint's
    chat template, the processor's timestamped groups as text, tokenized whole; its torch
    preprocessing); group_token points at each group's first <|video_pad|>."""
    from megatron_spava.models.qwen3_vl.prompt import Qwen3VLPrompter
    from megatron_spava.tasks.model import needle_prompter
    from megatron_spava.tasks.needles import ANSWER_WORDS, LABELS
    from megatron_spava.video.io import VideoClip
    tok = _tokenizer()
    for word in ANSWER_WORDS + tuple(" " + w for w in LABELS):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    ours_p = needle_prompter(files_only)
    assert type(ours_p).__module__.endswith("qwen3_vl.needle")  # picked from config.json
    s = make_sample("scene", groups=12, seed=0, index=1)
    frames = render_frames(s)
    ours = ours_p.inputs(s, frames)
    clip = VideoClip(frames=frames.numpy(), fps=2.0, source="x", indices=list(range(24)),
                     source_frames=24, source_fps=2.0)
    theirs = Qwen3VLPrompter(files_only, use_hf_processor=False)(clip, s.question)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert ours.video_grid_thw.tolist() == theirs.video_grid_thw.tolist() == [[12, 8, 8]]
    assert torch.allclose(ours.pixel_values_videos, theirs.pixel_values_videos)
    ids = ours.input_ids[0]
    pad = ours_p.video_pad
    firsts = [i for i in range(len(ids)) if ids[i] == pad and ids[i - 1] != pad]
    assert [ours_p.group_token(g) for g in range(12)] == firsts
    assert ours_p.decode(ours_p.answer_ids("seven red circle")) == "seven red circle"


def _megatron_vs_hf(ckpt):
    """First-token logits of a 24-group sample: our Megatron model (built by the evaluation's
    family dispatch, full attention) and HF's (its own rope index)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from transformers import Qwen3VLForConditionalGeneration

    from megatron_spava import cpu_compat
    from megatron_spava.inference.generate import generate
    from megatron_spava.models.qwen3_vl import Qwen3VLModel
    from megatron_spava.models.qwen3_vl.rope import token_types
    from megatron_spava.tasks.evaluate import _build_model
    from megatron_spava.tasks.model import needle_prompter

    cpu_compat.apply()
    ps.initialize_model_parallel(1, context_parallel_size=1)
    initialize_rng_tracker(inference_rng_tracker=True)
    s = make_sample("ordering", groups=24, seed=0, index=2)
    inputs = needle_prompter(ckpt).inputs(s, render_frames(s))
    model = _build_model(ckpt, 1, torch.device("cpu"), torch.float32)
    assert isinstance(model, Qwen3VLModel)
    ours = generate(model, inputs, algo="full", cp_group=ps.get_context_parallel_group(),
                    max_new_tokens=1).first_logits
    hf = Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = hf.config
    ids = inputs.input_ids
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=inputs.pixel_values_videos,
                 video_grid_thw=inputs.video_grid_thw,
                 mm_token_type_ids=token_types(ids, cfg.image_token_id, cfg.video_token_id)).logits[0, -1]
    ps.destroy_model_parallel()
    return ours.reshape(-1), ref


@pytest.mark.slow  # needs the trained fixture
def test_megatron_needle_model_equals_hf(trained):
    from megatron_spava.testing import run_ranks
    [(ours, ref)] = run_ranks(_megatron_vs_hf, 1, trained, timeout=300)
    assert ref.std() > 0.1  # trained a little: the logits are not flat
    assert float((ours.double() - ref.double()).norm() / ref.double().norm()) < 1e-5


def test_batched_vision_attention_equals_hf():
    from megatron_spava.tasks.training import batch_vision_attention, make_batch
    kit = _kit()
    tok = _tokenizer()
    config_class, model_class = kit.hf_classes()
    cfg = config_class(**kit.hf_config(tok))
    torch.manual_seed(0)
    model = model_class(cfg).eval()
    with torch.no_grad():  # larger than HF's init, so that the vision tower matters
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "visual" in name:
                p.normal_(0, 0.08)
    samples = [make_sample(t, groups=6, seed=0, index=i) for i, t in enumerate(TASKS)]
    batch = make_batch(samples, kit.NeedlePrompter(tok), cfg, "cpu")
    calls = []
    with torch.no_grad():
        before = model(**batch.model_inputs(one_video=False)).logits
        one = model(**batch.model_inputs()).logits  # all groups as one video: same embeddings
        assert batch_vision_attention(model) == cfg.vision_config.depth
        model.model.visual.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
        after = model(**batch.model_inputs()).logits
    assert calls and batch.model_inputs()["video_grid_thw"].tolist() == [[6 * len(samples), 8, 8]]
    assert batch.pixel_values_videos.shape == (len(samples) * 6 * 64, 1536)
    assert torch.allclose(before, one, atol=1e-5, rtol=1e-4)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before[0], before[1], atol=1e-3)  # the rows differ: a real comparison
