"""Needle tasks: the generator is deterministic and its labels are right; the needle model's
prompts match the chat template and the demo's processor path; the training-time batched
vision attention equals HF's; an HF checkpoint of the needle shape runs the same under our
Megatron path as under HF; the evaluation tool's exact algorithms are exact."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_spava.tasks import LABELS, QUESTIONS, TASKS, make_sample, render_frames
from megatron_spava.tasks.needles import (COLOURS, COUNTS, DIGITS, FRAMES_PER_GROUP, ORDER_NEEDLES,
                                          SHAPES, _bank, groups_for_tokens, render_videos)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_samples_are_deterministic_and_distinct():
    for task in TASKS:
        a = make_sample(task, groups=24, seed=3, index=5)
        assert a == make_sample(task, groups=24, seed=3, index=5)
        assert torch.equal(render_frames(a), render_frames(a))
        others = {make_sample(task, groups=24, seed=3, index=i) for i in range(6, 16)}
        assert len(others | {a}) == 11  # different indices, different samples
        assert make_sample(task, groups=24, seed=4, index=5) != a


def test_labels_are_right():
    for index in range(200):
        r = make_sample("retrieval", groups=32, seed=1, index=index)
        assert len(r.needles) == 1 and r.answer == r.needles[0][1] and r.answer in LABELS
        o = make_sample("ordering", groups=32, seed=1, index=index)
        groups = [g for g, _ in o.needles]
        labels = [lab for _, lab in o.needles]
        assert ORDER_NEEDLES[0] <= len(o.needles) <= ORDER_NEEDLES[1]
        assert groups == sorted(set(groups)) and len(set(labels)) == len(labels)
        assert o.answer == " ".join(labels)
        c = make_sample("counting", groups=32, seed=1, index=index)
        assert len({lab for _, lab in c.needles}) == 1 and c.answer == str(len(c.needles))
        assert c.answer in COUNTS and len({g for g, _ in c.needles}) == len(c.needles)
        s = make_sample("scene", groups=32, seed=1, index=index)
        (needle, label), = s.needles
        before = [col for g, col in s.cards if g < needle]
        assert before and s.answer == before[-1] and label not in COLOURS
        assert all(g != needle for g, _ in s.cards)
        colours = [col for _, col in s.cards]
        assert all(a != b for a, b in zip(colours, colours[1:]))  # neighbouring scenes differ
        assert all(s.question == QUESTIONS[s.task] for s in (r, o, c, s))


def test_scene_needs_the_latest_card_before_the_needle():
    """No shortcut through the question alone: usually several cards precede the needle and
    more follow it, so neither the first nor the last card of the video is the answer as a
    rule; the needle's distance to its card is bounded by the scene length."""
    first = last = several = 0
    for index in range(300):
        s = make_sample("scene", groups=256, seed=1, index=index)
        (needle, _), = s.needles
        before = [g for g, _ in s.cards if g < needle]
        several += len(before) >= 2
        first += s.answer == s.cards[0][1]
        last += s.answer == s.cards[-1][1]
        assert needle - before[-1] <= 128
    assert several > 150 and first < 150 and last < 150


def test_needles_are_uniform_over_the_video():
    """Needle groups cover every quarter of the video about equally (so they land in the
    anchor, in every rank's blocks and on block edges)."""
    for task in TASKS:
        quarters = np.zeros(4)
        for index in range(400):
            for g, _ in make_sample(task, groups=64, seed=2, index=index).needles:
                quarters[g * 4 // 64] += 1
        share = quarters / quarters.sum()
        assert share.min() > 0.15, (task, share)
    first = [make_sample("retrieval", groups=64, seed=2, index=i).needles[0][0] for i in range(400)]
    assert min(first) == 0 and max(first) == 63


def test_rendered_frames_show_the_needles_and_cards_and_a_structured_haystack():
    needles, cards = _bank(112, "cpu")
    assert len({bytes(img.numpy()) for img in needles.values()}) == len(LABELS)  # all distinct
    for task in TASKS:
        s = make_sample(task, groups=48, seed=0, index=7)
        f = render_frames(s)
        assert f.shape == (FRAMES_PER_GROUP * 48, 112, 112, 3) and f.dtype == torch.uint8
        special = set()
        for g, label in s.needles:
            assert torch.equal(f[2 * g], needles[label]) and torch.equal(f[2 * g + 1], needles[label])
            special |= {2 * g, 2 * g + 1}
        for g, colour in s.cards:
            assert torch.equal(f[2 * g], cards[colour]) and torch.equal(f[2 * g + 1], cards[colour])
            special |= {2 * g, 2 * g + 1}
        hay = f[[t for t in range(len(f)) if t not in special]]
        assert int(hay.max()) <= 235  # no white: needles and cards are the only white frames
        assert float(hay.float().std(dim=(1, 2)).mean()) > 5  # textured, not flat
        assert float((hay[1:].float() - hay[:-1].float()).abs().mean()) > 0.5  # it moves
        assert len(s.cuts) > 1  # scene cuts


def test_render_videos_equals_rendering_one_by_one():
    samples = [make_sample(t, groups=12, seed=0, index=i) for i, t in enumerate(TASKS)]
    together = render_videos(samples, chunk=20)
    assert torch.equal(together, torch.cat([render_frames(s) for s in samples]))


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown needle task"):
        make_sample("colour", groups=32)
    with pytest.raises(ValueError, match="at least"):
        make_sample("ordering", groups=3)
    assert groups_for_tokens(4096) == 256


# --------------------------------------------------------------------- model inputs

@functools.lru_cache(maxsize=1)
def _tokenizer():
    from megatron_spava.tasks.model import build_tokenizer
    return build_tokenizer()


def test_answer_words_are_single_tokens_and_prompts_match_the_chat_template():
    from megatron_spava.models.qwen2_5_vl.tiny import CHAT_TEMPLATE
    from megatron_spava.tasks.model import NeedlePrompter
    tok = _tokenizer()
    for word in LABELS + COUNTS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    for word in LABELS:  # as in orderings: every label after the first has a leading space
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    p = NeedlePrompter(tok)
    for task, question in QUESTIONS.items():
        msg = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        text = tok.apply_chat_template(msg, chat_template=CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
        expected = tok(text.replace("<|video_pad|>", "<|video_pad|>" * 32), add_special_tokens=False)["input_ids"]
        assert p.prompt_ids(task, 32) == expected
    assert p.decode(p.answer_ids("seven red circle")) == "seven red circle"
    assert len(p.answer_ids("seven red circle")) == 4  # three words and <|im_end|>


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    return _write_checkpoint(tmp_path_factory.mktemp("needle") / "ckpt", seed=1)


def _write_checkpoint(path, seed=0):
    """A needle-shaped HF checkpoint with random weights, saved as the trainer saves."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_spava.tasks.model import hf_config, save_checkpoint
    tok = _tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config(tok)))
    with torch.no_grad():  # larger than HF's 0.02 init, so that the layers do something
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    save_checkpoint(model, str(path), tok, {"seed": seed})
    return str(path)


def test_needle_prompter_equals_the_demo_processor_path(random_checkpoint):
    """NeedlePrompter (evaluation, training) and VideoPrompter (the demo: checkpoint's
    tokenizer, chat template and processor config) give the same ids and pixels."""
    from megatron_spava.tasks.model import NeedlePrompter
    from megatron_spava.video.io import VideoClip
    from megatron_spava.video.prompt import VideoPrompter
    ckpt = random_checkpoint
    s = make_sample("scene", groups=16, seed=0, index=1)
    frames = render_frames(s)
    ours = NeedlePrompter(ckpt).inputs(s, frames)
    clip = VideoClip(frames=frames.numpy(), fps=2.0, source="x", indices=list(range(32)),
                     source_frames=32, source_fps=2.0)
    theirs = VideoPrompter(ckpt, use_hf_processor=False)(clip, s.question)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.video_grid_thw, theirs.video_grid_thw)
    assert torch.allclose(ours.pixel_values_videos, theirs.pixel_values_videos)
    assert torch.allclose(ours.second_per_grid_ts, theirs.second_per_grid_ts)


def test_training_batch_positions_and_targets():
    """make_batch: padded rows, M-RoPE positions equal to rope_index over the whole batch
    (Qwen's convention, padding masked), answer targets equal to the answer tokens."""
    from transformers import Qwen2_5_VLConfig

    from megatron_spava.models.qwen2_5_vl.rope import rope_index
    from megatron_spava.tasks.model import NeedlePrompter, hf_config
    from megatron_spava.tasks.training import answer_logits, make_batch
    tok = _tokenizer()
    cfg = Qwen2_5_VLConfig(**hf_config(tok))
    p = NeedlePrompter(tok)
    samples = [make_sample(t, groups=6, seed=0, index=i) for i, t in enumerate(TASKS * 2)]
    batch = make_batch(samples, p, cfg, "cpu")
    mask = torch.stack([torch.arange(batch.input_ids.shape[1]) < s + n
                        for s, n in zip(batch.answer_start, batch.answer_len)]).long()
    ref, _ = rope_index(batch.input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                        spatial_merge_size=2, tokens_per_second=2, video_grid_thw=batch.video_grid_thw,
                        second_per_grid_ts=torch.ones(len(samples)), attention_mask=mask)
    assert torch.equal(batch.position_ids, ref)
    logits = torch.zeros(*batch.input_ids.shape, cfg.text_config.vocab_size)
    _, targets, rows = answer_logits(logits, batch)
    for i, s in enumerate(samples):
        assert targets[rows == i].tolist() == p.answer_ids(s.answer)
    assert batch.pixel_values_videos.shape == (len(samples) * 6 * 64, 1176)


def test_batched_vision_attention_equals_hf():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_spava.tasks.model import NeedlePrompter, hf_config
    from megatron_spava.tasks.training import batch_vision_attention, make_batch
    tok = _tokenizer()
    cfg = Qwen2_5_VLConfig(**hf_config(tok))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    samples = [make_sample(t, groups=8, seed=0, index=i) for i, t in enumerate(TASKS)]
    batch = make_batch(samples, NeedlePrompter(tok), cfg, "cpu")
    with torch.no_grad():
        before = model(**batch.model_inputs(one_video=False)).logits
        one = model(**batch.model_inputs()).logits  # all groups as one video: same embeddings
        assert batch_vision_attention(model) == cfg.vision_config.depth
        after = model(**batch.model_inputs()).logits
    assert batch.model_inputs()["video_grid_thw"].tolist() == [[8 * len(samples), 8, 8]]
    assert torch.allclose(before, one, atol=1e-5, rtol=1e-4)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)


def _megatron_vs_hf(ckpt, task):
    """First-token logits of one sample: our Megatron model (full attention) and HF's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_spava import cpu_compat
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from megatron_spava.models.qwen2_5_vl.convert import load_hf_into_model
    from megatron_spava.inference.generate import generate
    from megatron_spava.models.qwen2_5_vl.rope import rope_index
    from megatron_spava.tasks.model import NeedlePrompter

    cpu_compat.apply()
    ps.initialize_model_parallel(1, context_parallel_size=1)
    initialize_rng_tracker(inference_rng_tracker=True)
    s = make_sample(task, groups=24, seed=0, index=2)
    inputs = NeedlePrompter(ckpt).inputs(s, render_frames(s))
    model = Qwen25VLModel(Qwen25VLConfig.from_hf(ckpt), perform_initialization=False)
    load_hf_into_model(model, ckpt, tp_rank=0, tp_size=1, progress=False)
    ours = generate(model.eval(), inputs, algo="full", cp_group=ps.get_context_parallel_group(),
                    max_new_tokens=1).first_logits
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = hf.config
    pos, _ = rope_index(inputs.input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                        spatial_merge_size=2, tokens_per_second=cfg.vision_config.tokens_per_second,
                        video_grid_thw=inputs.video_grid_thw, second_per_grid_ts=inputs.second_per_grid_ts)
    with torch.no_grad():
        ref = hf(input_ids=inputs.input_ids, pixel_values_videos=inputs.pixel_values_videos,
                 video_grid_thw=inputs.video_grid_thw, position_ids=pos).logits[0, -1]
    ps.destroy_model_parallel()
    return ours, ref, dist.get_rank()


@pytest.mark.slow
def test_needle_checkpoint_runs_the_same_under_megatron_and_hf(random_checkpoint):
    from megatron_spava.testing import run_ranks
    ckpt = random_checkpoint
    (ours, ref, _), = run_ranks(_megatron_vs_hf, 1, ckpt, "ordering", timeout=120)
    assert ref.std() > 0.1  # the random weights make non-trivial logits
    assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_eval_tool_exact_algorithms_are_exact(tmp_path, random_checkpoint, device):
    """tools/eval_needles.py on 2 ranks (CPU, or sharing one GPU over gloo, where ring stages
    its transfers through host memory): ring, and spava with passing blocks as long as the
    blocks (the default at 512 tokens), reproduce full attention; star does not."""
    ckpt = random_checkpoint
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    gpu = ["--device", "cuda", "--backend", "gloo"] if device == "cuda" else []
    run = subprocess.run([sys.executable, "tools/eval_needles.py", *gpu, "--checkpoint", ckpt, "--nproc", "2",
                          "--tokens", "512", "--samples", "2", "--tasks", "scene", "--algos", "ring",
                          "star", "spava", "--json", str(out), "--markdown", str(tmp_path / "r.md"),
                          "--plot", str(tmp_path / "r.png")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.load(open(out))
    by = {(r["algo"], r["index"]): r for r in result["records"]}
    assert {a for a, _ in by} == {"full", "ring", "star", "spava"} and len(by) == 8
    for algo in ("ring", "spava"):
        for i in range(2):
            assert by[(algo, i)]["prediction"] == by[("full", i)]["prediction"]
            assert by[(algo, i)]["kl"] < 1e-8
    hidden = {h["algo"]: h for h in result["hidden"]}
    assert max(hidden["ring"]["rel_err"]) < 1e-5 and max(hidden["spava"]["rel_err"]) < 1e-5
    assert max(hidden["star"]["rel_err"]) > 1e-3  # no passing blocks: block rows are approximate
    assert hidden["star"]["query_rel_err"][0] < 1e-5  # the first layer's query rows stay exact
    assert "| spava | 2 |" in open(tmp_path / "r.md").read()
    assert os.path.getsize(tmp_path / "r.png") > 1000


def test_ablation_switches_come_from_spava_config():
    from megatron_spava.tasks.evaluate import ablation_switches, variants
    switches = ablation_switches()
    assert {"zigzag", "overlap", "shard_anchor", "passing"} <= set(switches)
    assert "check_ranks_agree" not in switches
    names = [v[0] for v in variants()]
    assert names[:5] == ["full", "ring", "star", "apb", "spava"] and "spava-no-zigzag" in names


def _ring_gloo_cuda(n, lq, seed):
    import torch.distributed as dist

    from megatron_spava.algos import cp_attn_func, plan_layout
    from megatron_spava.testing.reference import random_qkv
    q, k, v = random_qkv(n + lq, 1, 4, 2, 64, seed=seed, device="cuda")
    layout = plan_layout("ring", context_len=n, query_len=lq, cp_size=dist.get_world_size())
    idx = layout.local_indices(dist.get_rank())
    return idx, cp_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD).cpu()


@pytest.mark.cuda
@pytest.mark.parametrize("world", [2, 4])
def test_ring_over_gloo_on_one_gpu_is_exact(world):
    """Several ranks sharing one GPU over gloo: gloo cannot send CUDA tensors point to point,
    so the ring stages them through host memory; the result stays exact."""
    from megatron_spava.testing import run_ranks
    from megatron_spava.testing.reference import full_attention, random_qkv
    results = run_ranks(_ring_gloo_cuda, world, 1000, 7, 3, backend="gloo", timeout=120)
    q, k, v = random_qkv(1007, 1, 4, 2, 64, seed=3, device="cuda")
    ref = full_attention(q, k, v).cpu()
    for idx, out in results:
        torch.testing.assert_close(out.double(), ref[idx].double(), rtol=1e-4, atol=1e-4)
