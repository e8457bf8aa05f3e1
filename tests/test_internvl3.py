"""InternVL3 on megatron-core against HF transformers' own InternVLForConditionalGeneration,
on tiny random configs built offline: vision features, prefill logits and greedy decode
under TP x CP (full, spava at full budget, ring), the prompt HF's processor builds,
checkpoint conversion both ways, frame-parallel limits."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig
from megatron_spava.models.internvl3.tiny import build_tiny_tokenizer, tiny_hf_config, tiny_hf_model
from megatron_spava.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
FULL_BUDGET = dict(budget_align=1, anchor_len=8, passing_len=4096)
FRAMES, TOKENS, MAX_NEW = 8, 16, 8  # tiny tiles: 16 LLM tokens per frame
QUESTION = "What is happening in this video?"


def _prompt(frames=FRAMES, seed=1):
    """The chat prompt as HF's InternVLProcessor expands it, and random normalised tiles."""
    from megatron_spava.models.internvl3.prompt import video_placeholder
    tok = build_tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                 {"type": "text", "text": QUESTION}]}],
                                   tokenize=False, add_generation_prompt=True)
    text = text.replace("<video>", video_placeholder(frames, TOKENS))
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pixels = torch.randn(frames, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    return ids, pixels


@pytest.fixture(scope="module")
def hf_reference():
    """HF's image features, prefill logits of the last prompt token and greedy decode."""
    hf = tiny_hf_model(tiny_hf_config())
    ids, pixels = _prompt()
    with torch.no_grad():
        vision = hf.model.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)
        out = hf(input_ids=ids, pixel_values=pixels, use_cache=True)
        first = out.logits[0, -1]
        token, tokens, past = int(first.argmax()), [], out.past_key_values
        for _ in range(MAX_NEW):
            tokens.append(token)
            if len(tokens) == MAX_NEW:
                break
            out = hf(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    assert len(set(tokens)) > 3  # the tiny model's answer varies: a real decode test
    return ids, pixels, vision, tokens, first, list(hf.state_dict().items())


def _build(tp, cp, state=None, source=None):
    """The model at TP x CP with HF's weights: from `state`, an HF state dict (in-memory
    names), or else from the dist checkpoint in `source`."""
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.internvl3 import InternVL3Config, InternVL3Model
    from megatron_spava.models.internvl3.convert import load_dist_into_model, load_hf_into_model

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_rng_tracker(inference_rng_tracker=True)
    cfg = InternVL3Config.from_hf(source or tiny_hf_config())
    model = InternVL3Model(cfg, tensor_parallel=tp, context_parallel=cp,
                           perform_initialization=source is None).eval()
    if source is None:
        load_hf_into_model(model, state, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
                           progress=False)
    else:
        load_dist_into_model(model, source)
    return model


def _generate(model, algo, budget, ids, pixels):
    """Frame-parallel image features and the greedy answer, on this rank."""
    from megatron.core import parallel_state as ps
    from megatron_spava.models.internvl3 import encode_frames_frame_parallel
    from megatron_spava.inference.generate import generate
    from megatron_spava.video.inputs import InternVLInputs

    group = ps.get_context_parallel_group()
    with torch.no_grad():
        vision = encode_frames_frame_parallel(model, pixels, group)
    out = generate(model, InternVLInputs(ids, pixels), algo=algo, config=SpavaConfig(**budget),
                   cp_group=group, max_new_tokens=MAX_NEW, eos_token_ids=[])
    return vision, out.tokens, out.first_logits


def _rank(tp, cp, algo, budget, ids, pixels, state):
    return _generate(_build(tp, cp, state), algo, budget, ids, pixels)


# TP {1, 2, 4} x CP {1, 2, 4}: a subset that keeps the file fast but has TP = 2 with CP = 4.
# The tiny vocabulary (443) is padded on the megatron side at every TP size.
@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,algo", [(1, 1, "full"), (4, 1, "full"), (1, 2, "spava"),
                                        (1, 4, "spava"), (2, 4, "spava"), (1, 2, "ring")])
def test_vision_prefill_and_greedy_decode_match_hf(hf_reference, tp, cp, algo):
    ids, pixels, ref_vision, ref_tokens, ref_first, state = hf_reference
    results = run_ranks(_rank, tp * cp, tp, cp, algo, FULL_BUDGET, ids, pixels, state, timeout=180)
    for vision, tokens, first in results:
        torch.testing.assert_close(vision, ref_vision, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
        assert tokens == ref_tokens
    assert all(torch.equal(first, results[0][2]) for _, _, first in results)  # one answer everywhere


@pytest.mark.slow
def test_ablation_switches_at_full_budget_match_hf(hf_reference):
    """Through the shared generate: without fuse_query (context prefilled alone, the query
    over the KV cache) and without frame-parallel vision (every rank encodes every frame),
    the full-budget answer is still HF's."""
    ids, pixels, ref_vision, ref_tokens, ref_first, state = hf_reference
    budget = {**FULL_BUDGET, "fuse_query": False, "frame_parallel": False}
    for vision, tokens, first in run_ranks(_rank, 2, 1, 2, "spava", budget, ids, pixels, state,
                                           timeout=180):
        torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
        assert tokens == ref_tokens


def _hf_answers(ids, pixels, queries, new_tokens):
    """HF's first-token logits and greedy tokens for each query appended to the context ids."""
    hf = tiny_hf_model(tiny_hf_config())
    out = []
    with torch.no_grad():
        for q in queries:
            res = hf(input_ids=torch.cat([ids, q], dim=1), pixel_values=pixels, use_cache=True)
            first, past = res.logits[0, -1], res.past_key_values
            token, tokens = int(first.argmax()), []
            while True:
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
                res = hf(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append((tokens, first))
    return out


def _questions_rank(context, pixels, queries, state, budget, new_tokens):
    """answer_questions over one cached context, and a fresh two-pass generate per query."""
    from dataclasses import replace
    from megatron.core import parallel_state as ps
    from megatron_spava.inference.generate import answer_questions, generate
    from megatron_spava.video.inputs import InternVLInputs
    model = _build(1, 2, state)
    inputs, config = InternVLInputs(context, pixels), SpavaConfig(**budget)
    kwargs = dict(algo="spava", cp_group=ps.get_context_parallel_group(), max_new_tokens=new_tokens,
                  eos_token_ids=[])
    cached = answer_questions(model, inputs, queries, config=config, **kwargs)
    fresh = [generate(model, replace(inputs, input_ids=torch.cat([context, q], dim=1)),
                      config=config.replace(fuse_query=False), **kwargs) for q in queries]
    return [(o.tokens, o.first_logits) for o in cached], [(o.tokens, o.first_logits) for o in fresh]


@pytest.mark.slow
def test_several_questions_over_one_cached_context_match_hf(hf_reference):
    """InternVL3 through the shared answer_questions: the video context is prefilled once
    (CP = 2, Spava at full budget) and three queries of different lengths are answered
    over the cache, rolled back between them. Each answer equals HF's for its whole prompt
    (first-token logits, greedy tokens) and is bit-identical to a fresh two-pass prefill."""
    from megatron_spava.models.internvl3 import InternVL3Config
    ids, pixels, _, _, _, state = hf_reference
    lq = InternVL3Config.from_hf(tiny_hf_config()).query_length(ids)
    context, g = ids[:, :-lq], torch.Generator().manual_seed(7)
    queries = [ids[:, -lq:], torch.randint(0, 300, (1, 4), generator=g),
               torch.randint(0, 300, (1, 11), generator=g)]
    refs = _hf_answers(context, pixels, queries, 4)
    assert not torch.allclose(refs[0][1], refs[1][1])  # different questions, different answers
    for cached, fresh in run_ranks(_questions_rank, 2, context, pixels, queries, state, FULL_BUDGET, 4,
                                   timeout=180):
        for (tokens, first), (fresh_tokens, fresh_first), (ref_tokens, ref_first) in zip(cached, fresh, refs):
            assert tokens == fresh_tokens and torch.equal(first, fresh_first)
            torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
            assert tokens == ref_tokens


def _te_layout_rank():
    """InternVL3's weight map and a TE-layout model (CPU: names only, TE cannot build here)."""
    from megatron_spava import cpu_compat, specs
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.common.checkpoint_io import to_model_layout
    from megatron_spava.models.internvl3 import InternVL3Config, InternVL3Model
    from megatron_spava.models.internvl3.checkpoint import HFToMegatron, megatron_to_hf
    ps.initialize_model_parallel()
    initialize_rng_tracker(inference_rng_tracker=True)
    cfg = InternVL3Config.from_hf(tiny_hf_config())
    model = InternVL3Model(cfg).eval()
    params = dict(model.named_parameters())
    te_names = {specs.local_to_te_key(n) for n in params}
    assert "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te_names
    assert {n for n in te_names if not n.startswith("language_model.")} == \
        {n for n in params if not n.startswith("language_model.")}  # the vision side never changes
    # HF -> megatron: every name lands on the TE model's keys, each exactly once
    conv, landed = HFToMegatron(cfg), []
    for name, tensor in tiny_hf_model(tiny_hf_config()).state_dict().items():
        landed += [to_model_layout(m, te_names) for m, _ in conv.feed(name, tensor)]
    conv.finish()
    assert sorted(landed) == sorted(te_names)
    # megatron -> HF: the same HF tensors from either layout
    for name, tensor in params.items():
        te_name = to_model_layout(name, te_names)
        ours, theirs = megatron_to_hf(te_name, tensor, cfg), megatron_to_hf(name, tensor, cfg)
        assert [k for k, _ in ours] == [k for k, _ in theirs]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))
    # a TE-layout state dict loads into the local model, bit-exact
    te_state = specs.state_dict_for_backend(model.state_dict(), "te")
    fresh = InternVL3Model(cfg, perform_initialization=False)
    for p in fresh.parameters():
        p.data.zero_()
    specs.load_state_dict_any_layout(fresh, te_state)
    return all(torch.equal(a, params[n]) for n, a in fresh.named_parameters())


@pytest.mark.slow
def test_weight_map_handles_the_te_key_layout():
    """With --transformer-impl transformer_engine the LLM's norms live in linear_qkv /
    linear_fc1 (megatron-core's own local->TE key map): HF -> megatron names land on them,
    megatron -> HF reads either layout, and a TE-layout state dict loads into local layers.
    (TE vs local logits: tests/test_te.py on the GPU.)"""
    assert run_ranks(_te_layout_rank, 1, timeout=120) == [True]


@pytest.mark.slow
def test_default_budgets_stay_close_to_hf(hf_reference):
    """Spava at small budgets is approximate: first-token logits differ from HF's, but stay
    finite, close, and identical on every rank."""
    ids, pixels, _, _, ref_first, state = hf_reference
    results = run_ranks(_rank, 2, 1, 2, "spava", dict(budget_align=1, anchor_len=8, passing_len=4),
                        ids, pixels, state, timeout=180)
    first = results[0][2]
    rel = float((first - ref_first).norm() / ref_first.norm())
    assert torch.isfinite(first).all() and 0 < rel < 0.5, rel
    assert torch.equal(first, results[1][2])


def test_too_few_frames_raise_before_any_collective():
    """split_frames is pure and runs before the vision all-gather: every rank raises the
    same error (Qwen2.5-VL's test runs the same check on 4 gloo ranks)."""
    from megatron_spava.models.internvl3 import split_frames
    with pytest.raises(ValueError, match="3 frames for 4 ranks"):
        split_frames(3, 4)
    assert split_frames(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]


def test_config_errors_are_clear():
    from megatron_spava.models.internvl3 import InternVL3Config
    cfg = tiny_hf_config()
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 3"):
        InternVL3Config.from_hf(cfg).validate(3)
    bad = json.loads(json.dumps(cfg))
    bad["vision_config"]["use_qk_norm"] = True
    bad["image_seq_length"] = 15
    with pytest.raises(ValueError, match="use_qk_norm.*|image_seq_length 15"):
        InternVL3Config.from_hf(bad)
    with pytest.raises(ValueError, match="model_type 'qwen2_5_vl'"):
        InternVL3Config.from_hf({**cfg, "model_type": "qwen2_5_vl"})
    dyn = json.loads(json.dumps(cfg))
    dyn["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    dyn["text_config"]["max_position_embeddings"] = 64
    with pytest.raises(ValueError, match="dynamic NTK RoPE beyond max_position_embeddings"):
        InternVL3Config.from_hf(dyn).check_prompt_length(65)


# ---------------------------------------------------------------- prompts

def test_video_placeholder_is_hf_processors():
    """Our `<video>` expansion equals HF's InternVLProcessor.replace_video_token (run on
    a stand-in processor: its video half needs torchvision)."""
    from transformers import InternVLProcessor
    from megatron_spava.models.internvl3.prompt import video_placeholder
    stub = types.SimpleNamespace(start_image_token="<img>", end_image_token="</img>",
                                 image_token="<IMG_CONTEXT>", image_seq_length=TOKENS)
    hf = InternVLProcessor.replace_video_token(stub, {"pixel_values_videos": [torch.zeros(5, 3, 2, 2)]}, 0)
    assert video_placeholder(5, TOKENS) == hf
    assert hf.startswith("Frame1: <img><IMG_CONTEXT>") and hf.endswith("</img>") and hf.count("\n") == 4


def test_prompter_builds_the_processor_prompt_and_query(tmp_path):
    from megatron_spava.models.internvl3 import InternVL3Config
    from megatron_spava.models.internvl3.prompt import InternVLPrompter
    from megatron_spava.models.internvl3.tiny import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(str(tmp_path / "ivl"))
    prompter = InternVLPrompter(ckpt, use_hf_processor=False)
    frames = torch.randint(0, 256, (3, 60, 90, 3), dtype=torch.uint8).numpy()
    inputs = prompter(frames, QUESTION)
    tok = prompter.tokenizer
    assert inputs.pixel_values.shape == (3, 3, 112, 112)
    ids = inputs.input_ids[0].tolist()
    assert ids.count(tok.context_image_token_id) == 3 * TOKENS
    assert ids.count(tok.start_image_token_id) == ids.count(tok.end_image_token_id) == 3
    query = tok(f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[-len(query):] == query
    cfg = InternVL3Config.from_hf(ckpt)
    assert cfg.image_token_id == tok.context_image_token_id
    assert cfg.query_length(inputs.input_ids) == len(query)
    assert tok.decode(ids).startswith("<|im_start|>user\nFrame1: <img>")


def test_prompter_matches_hf_processor_where_torchvision_loads(tmp_path):
    pytest.importorskip("torchvision")
    from megatron_spava.models.internvl3.prompt import InternVLPrompter
    from megatron_spava.models.internvl3.tiny import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(str(tmp_path / "ivl"))
    frames = torch.randint(0, 256, (3, 60, 90, 3), dtype=torch.uint8).numpy()
    ours = InternVLPrompter(ckpt, use_hf_processor=False)(frames, QUESTION)
    hf = InternVLPrompter(ckpt, use_hf_processor=True)(frames, QUESTION)
    assert torch.equal(ours.input_ids, hf.input_ids)
    torch.testing.assert_close(ours.pixel_values, hf.pixel_values.float(), rtol=0, atol=2e-2)


# ---------------------------------------------------------------- conversion

def _tool(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _reload_tp2_and_resave(src, dst, ids, pixels):
    """On 2 ranks: load the dist checkpoint at TP=2, generate, save it again."""
    from megatron.core import dist_checkpointing
    model = _build(2, 1, source=src)
    out = _generate(model, "full", {}, ids, pixels)
    os.makedirs(dst, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), dst)
    if dist.get_rank() == 0:
        for name in ("config.json", "megatron_spava_meta.json"):
            with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
                g.write(f.read())
    dist.barrier()
    return out


def _hf_tensors(path):
    from megatron_spava.models.common.checkpoint_io import iter_hf_tensors
    return dict(iter_hf_tensors(path))


@pytest.mark.slow
def test_hf_to_megatron_tp2_to_hf_is_bit_exact_and_matches_hf(tmp_path, hf_reference):
    """HF (on disk) -> dist checkpoint -> loaded at TP=2: HF's vision features, logits and
    tokens -> saved again -> HF: every tensor bit-identical, same keys."""
    ids, pixels, ref_vision, ref_tokens, ref_first, _ = hf_reference
    hf_dir, meg, meg2, back = (str(tmp_path / n) for n in ("hf", "meg", "meg_tp2", "back"))
    tiny_hf_model(tiny_hf_config()).save_pretrained(hf_dir)
    out = _tool("hf-to-megatron", "--hf-path", hf_dir, "--out", meg, "--tensor-model-parallel-size", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    for vision, tokens, first in run_ranks(_reload_tp2_and_resave, 2, meg, meg2, ids, pixels, timeout=300):
        torch.testing.assert_close(vision, ref_vision, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
        assert tokens == ref_tokens
    out = _tool("megatron-to-hf", "--megatron-path", meg2, "--out", back, "--model", "internvl3")
    assert out.returncode == 0, out.stderr[-2000:]
    original, again = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    config = lambda d: json.load(open(os.path.join(d, "config.json")))  # noqa: E731
    assert config(back) == config(hf_dir)


def _convert_in_process(hf_dir, meg, back):
    from megatron_spava.models.internvl3.convert import dist_to_hf, hf_to_dist
    hf_to_dist(hf_dir, meg, progress=False)
    dist_to_hf(meg, back, max_shard_bytes=1 << 16, progress=False)


@pytest.mark.slow
def test_tied_bf16_round_trip_is_bit_exact(tmp_path):
    hf_dir, meg, back = (str(tmp_path / n) for n in ("hf", "meg", "back"))
    hf = tiny_hf_model(tiny_hf_config(tie=True), dtype=torch.bfloat16)
    hf.save_pretrained(hf_dir)
    original = _hf_tensors(hf_dir)
    assert "language_model.lm_head.weight" not in original  # tied: transformers does not store it
    run_ranks(_convert_in_process, 1, hf_dir, meg, back, timeout=300)
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))  # sharded output
    again = _hf_tensors(back)
    assert sorted(original) == sorted(again)
    assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], v) for k, v in original.items())
