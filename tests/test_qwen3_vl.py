"""Qwen3-VL on megatron-core against HF transformers' own Qwen3VLForConditionalGeneration,
on a tiny random checkpoint built offline and a real video prompt (12 frames = 6 temporal
groups, each behind its timestamp): rope index, vision encoder with DeepStack, every
layer's hidden states and the first-token logits at TP 1 and 2, Spava at full budget at
CP 2 and 3, 16 decoded tokens, checkpoint conversion both ways, the prompt."""

import json
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig
from megatron_spava.testing import run_ranks

FULL_BUDGET = dict(budget_align=1, anchor_len=8, passing_len=4096)
MAX_NEW = 16
QUESTION = "What is happening in this video?"


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _clip(frames=12, seed=0):
    """A 'real' sampled video: frames 0, 12, 24, ... of a 24 fps source (timestamps 0.25 s,
    1.25 s, ...), 64 x 128 pixels."""
    from megatron_spava.video.io import VideoClip
    gen = np.random.default_rng(seed)
    return VideoClip(gen.integers(0, 256, (frames, 64, 128, 3), dtype=np.uint8), 2.0, "synthetic",
                     [12 * i for i in range(frames)], 12 * frames, 24.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_spava.models.qwen3_vl.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3vl") / "tiny"))


@pytest.fixture(scope="module")
def inputs(checkpoint):
    from megatron_spava.models.qwen3_vl.prompt import Qwen3VLPrompter
    return Qwen3VLPrompter(checkpoint)(_clip(), QUESTION)


def _hf_model(checkpoint):
    import transformers
    kind = json.load(open(os.path.join(checkpoint, "config.json")))["architectures"][0]
    return getattr(transformers, kind).from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_reference(checkpoint, inputs):
    return _hf_reference(checkpoint, inputs)


def _hf_reference(checkpoint, inputs):
    """HF's vision output (merger and DeepStack), hidden states, first-token logits and its
    own greedy decode (its own rope index and rope deltas throughout)."""
    from megatron_spava.models.qwen3_vl.rope import token_types
    hf = _hf_model(checkpoint)
    cfg = hf.config
    ids = inputs.input_ids
    with torch.no_grad():
        vis = hf.model.visual(inputs.pixel_values_videos, grid_thw=inputs.video_grid_thw)
        vision = torch.cat([vis.pooler_output, *vis.deepstack_features], dim=-1)
        out = hf(input_ids=ids, pixel_values_videos=inputs.pixel_values_videos,
                 video_grid_thw=inputs.video_grid_thw,
                 mm_token_type_ids=token_types(ids, cfg.image_token_id, cfg.video_token_id),
                 output_hidden_states=True, use_cache=True)
        first, hidden = out.logits[0, -1], [h[0] for h in out.hidden_states]
        token, tokens, past = int(first.argmax()), [], out.past_key_values
        while True:
            tokens.append(token)
            if len(tokens) == MAX_NEW:
                break
            out = hf(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    assert len(set(tokens)) > 4  # the tiny model's answer varies: a real decode test
    return dict(vision=vision, hidden=hidden, first=first, tokens=tokens)


# ---------------------------------------------------------------- prompt and rope index

def test_prompt_has_timestamped_frame_groups_inside_the_outer_pair(checkpoint, inputs):
    """The pinned processor's text (transformers 5.23 keeps the chat template's outer
    <|vision_start|>...<|vision_end|>): six groups, each <t seconds> + its own pair."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(checkpoint)
    text = tok.decode(inputs.input_ids[0])
    groups = "".join(f"<{t} seconds><|vision_start|>{'<|video_pad|>' * 8}<|vision_end|>"
                     for t in ("0.2", "1.2", "2.2", "3.2", "4.2", "5.2"))  # (0 + 0.5) / 2 = 0.25 -> "0.2"
    assert f"<|im_start|>user\n<|vision_start|>{groups}<|vision_end|>{QUESTION}<|im_end|>\n" in text
    assert torch.equal(inputs.video_grid_thw, torch.tensor([[6, 4, 8]]))
    assert inputs.pixel_values_videos.shape == (6 * 4 * 8, 3 * 2 * 16 * 16)


def test_placeholder_and_timestamps_are_hf_processors():
    """Our frame-group text and timestamps equal HF's Qwen3VLProcessor.replace_video_token
    (run on a stand-in processor: its video half needs torchvision)."""
    from transformers import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata
    from megatron_spava.models.qwen3_vl.prompt import group_timestamps, video_placeholder
    stub = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                                 video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                                 vision_end_token="<|vision_end|>")
    stub._calculate_timestamps = types.MethodType(Qwen3VLProcessor._calculate_timestamps, stub)
    indices = [0, 7, 15, 22, 30]  # odd count: the last frame is repeated
    meta = VideoMetadata(total_num_frames=31, fps=7.5, frames_indices=indices)
    video = {"video_grid_thw": torch.tensor([[3, 4, 6]]), "video_metadata": [meta]}
    hf = Qwen3VLProcessor.replace_video_token(stub, video, 0)
    ours = video_placeholder(group_timestamps(indices, 7.5), 6)
    assert ours == hf and hf.count("seconds>") == 3


def test_fallback_matches_the_hf_processor_where_torchvision_loads(checkpoint):
    """Where torchvision imports (not on the CPU test machine), the torch fallback gives the
    pinned processor's token ids and, to resampling noise, its pixels."""
    pytest.importorskip("torchvision")
    from megatron_spava.models.qwen3_vl.prompt import Qwen3VLPrompter
    ours = Qwen3VLPrompter(checkpoint, use_hf_processor=False)(_clip(), QUESTION)
    hf = Qwen3VLPrompter(checkpoint, use_hf_processor=True)(_clip(), QUESTION)
    assert torch.equal(ours.input_ids, hf.input_ids)
    assert torch.equal(ours.video_grid_thw, hf.video_grid_thw)
    torch.testing.assert_close(ours.pixel_values_videos, hf.pixel_values_videos.float(), rtol=0, atol=2e-2)


def test_rope_index_matches_transformers():
    """Our rope index (written from the rule) equals HF's get_rope_index for the video
    prompt, a text-only prompt and a padded batch with an image and a video."""
    from megatron_spava.models.qwen3_vl.rope import rope_index, token_types
    from megatron_spava.models.qwen3_vl.tiny import TINY_SPECIAL, tiny_hf_config, tiny_hf_model
    hf = tiny_hf_model(tiny_hf_config()).model
    IMG, VID, VS, VE = (TINY_SPECIAL[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                  "<|vision_end|>"))
    # the video prompt with the tiny config's ids: 6 runs of 8 video tokens behind timestamps
    row = [1, 2, VS]
    for g in range(6):
        row += [3 + g, VS] + [VID] * 8 + [VE]
    row += [VE, 9, 10, 11]
    batch = torch.tensor([row + [0] * 4, [5, 6, VS] + [IMG] * 6 + [VE, 7] + [VS] + [VID] * 8 + [VE]
                          + [8] * (len(row) + 4 - 21)])
    mask = torch.ones_like(batch)
    mask[0, -4:] = 0
    cases = [(torch.tensor([row]), None, torch.tensor([[6, 4, 8]]), None),
             (torch.arange(20)[None], None, None, None),
             (batch, torch.tensor([[1, 4, 6]]), torch.tensor([[6, 4, 8], [1, 4, 8]]), mask)]  # padded batch
    for ids_, image_grid, video_grid, attn in cases:
        ref_pos, ref_delta = hf.get_rope_index(
            ids_, token_types(ids_, IMG, VID), image_grid_thw=image_grid,
            video_grid_thw=None if video_grid is None else video_grid.clone(), attention_mask=attn)
        pos, delta = rope_index(ids_, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                                image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=attn)
        assert torch.equal(pos, ref_pos) and torch.equal(delta.view(-1), ref_delta.view(-1))
    with pytest.raises(ValueError, match="does not match its grid"):
        rope_index(torch.tensor([row]), image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                   video_grid_thw=torch.tensor([[6, 4, 4]]))


def test_interleaved_mrope_is_hfs():
    """The rotary angles equal HF's Qwen3VLTextRotaryEmbedding (interleaved sections)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    from transformers import Qwen3VLTextConfig
    from megatron_spava.models.qwen3_vl.rope import interleaved_mrope
    hf = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(head_dim=128, rope_parameters={
        "rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_theta": 5e6}))
    pos = torch.randint(0, 5000, (3, 2, 37))
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    ours = interleaved_mrope(pos, hf.inv_freq, (24, 20, 20))  # [s, b, 1, d]
    torch.testing.assert_close(ours[:, :, 0].cos().transpose(0, 1), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, :, 0].sin().transpose(0, 1), sin, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- model parity vs HF

def _build(tp, cp, source, dist_ckpt=False):
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.qwen3_vl import Qwen3VLConfig, Qwen3VLModel
    from megatron_spava.models.qwen3_vl.convert import load_dist_into_model, load_hf_into_model

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_rng_tracker(inference_rng_tracker=True)
    model = Qwen3VLModel(Qwen3VLConfig.from_hf(source), tensor_parallel=tp, context_parallel=cp,
                         perform_initialization=False).eval()
    if dist_ckpt:
        load_dist_into_model(model, source)
    else:
        load_hf_into_model(model, source, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
                           progress=False)
    return model


def _run(model, inputs, algo, budget, hidden=False):
    """Frame-parallel vision output, and generate()'s tokens and first-token logits; with
    `hidden`, every LLM layer's prefill output before DeepStack is added (HF's hidden
    states), the embeddings and the final norm's output."""
    from megatron.core import parallel_state as ps
    from megatron_spava.inference.generate import generate
    group = ps.get_context_parallel_group()
    with torch.no_grad():
        vision = model.encode_video(inputs, group)
    captured, handles = [], []
    if hidden:
        lm = model.language_model
        record = lambda m, args, out: captured.append((out[0] if isinstance(out, tuple) else out)[:, 0].clone())  # noqa: E731
        handles.append(lm.decoder.register_forward_pre_hook(  # the embeddings with vision rows placed
            lambda m, args, kwargs: captured.append(kwargs["hidden_states"][:, 0].clone()), with_kwargs=True))
        for layer in list(lm.decoder.layers)[:-1]:  # prepend: before the DeepStack hook
            handles.append(layer.register_forward_hook(record, prepend=True))
        handles.append(lm.decoder.register_forward_hook(record))
    out = generate(model, inputs, algo=algo, config=SpavaConfig(**budget), cp_group=group,
                   max_new_tokens=MAX_NEW, eos_token_ids=[])
    for h in handles:
        h.remove()
    n = len(model.language_model.decoder.layers) + 1
    return vision, out.tokens, out.first_logits, captured[:n]


def _rank(tp, cp, algo, budget, checkpoint, inputs, hidden=False, shard=False):
    """The model at TP x CP (shard: its LLM layers' weights sharded over the CP group,
    gathered layer by layer) and `_run`'s results."""
    from megatron.core import parallel_state as ps
    model = _build(tp, cp, checkpoint)
    if shard:
        model.shard_weights(ps.get_context_parallel_group())
        assert all(p.numel() == 0 for p in model.language_model.decoder.layers[0].parameters())
    return _run(model, inputs, algo, budget, hidden)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_hidden_states_and_logits_match_hf(hf_reference, checkpoint, inputs, tp):
    """Full attention at TP 1 and 2: the vision encoder (merger and both DeepStack mergers),
    the embeddings, every layer's hidden states, the final norm and the first-token logits
    within 1e-5 relative of HF; 16 greedy tokens the same."""
    ref = hf_reference
    for vision, tokens, first, hidden in run_ranks(_rank, tp, tp, 1, "full", {}, checkpoint, inputs, True,
                                                   timeout=240):
        assert _relative(vision, ref["vision"]) < 1e-5
        assert len(hidden) == len(ref["hidden"]) == 4
        errors = [_relative(ours, theirs) for ours, theirs in zip(hidden, ref["hidden"])]
        print(f"\nTP {tp}: relative error of the embeddings, layers and final norm vs HF: "
              + ", ".join(f"{e:.1e}" for e in errors) + f"; logits {_relative(first, ref['first']):.1e}")
        assert max(errors) < 1e-5, errors
        assert _relative(first, ref["first"]) < 1e-5
        assert tokens == ref["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,algo", [(1, 2, "spava"), (1, 3, "spava"), (2, 2, "ring")])
def test_context_parallel_at_full_budget_matches_hf(hf_reference, checkpoint, inputs, tp, cp, algo):
    """Spava at full budget over CP 2 and 3 (frame-parallel vision, each rank placing its
    DeepStack rows by the layout's indices; at CP 3 with the LLM weights sharded over the
    ranks, as the benchmark runs) is full attention: HF's first-token logits and 16 tokens;
    ring at TP 2 x CP 2 too. Every rank gives the same answer."""
    ref = hf_reference
    results = run_ranks(_rank, tp * cp, tp, cp, algo, FULL_BUDGET, checkpoint, inputs, False, cp == 3,
                        timeout=240)
    for vision, tokens, first, _ in results:
        assert _relative(vision, ref["vision"]) < 1e-5
        assert _relative(first, ref["first"]) < 1e-5
        assert tokens == ref["tokens"]
    assert all(torch.equal(first, results[0][2]) for _, _, first, _ in results)


def _registry_rank(checkpoint, inputs):
    """Every registry algorithm that is an attention function and runs context parallel, on
    one model at CP 2 (`full` is the one-rank reference: the other tests), then Spava at a
    small budget."""
    from megatron_spava.algos import registry
    model = _build(1, 2, checkpoint)
    out = {}
    for entry in registry.entries():
        if entry.attn_func is not None and entry.name != "full":
            budget = FULL_BUDGET if entry.name == "spava" else dict(budget_align=1)  # presets own theirs
            out[entry.name] = _run(model, inputs, entry.name, budget)[1:3]
    out["spava-small"] = _run(model, inputs, "spava", dict(budget_align=1, anchor_len=8, passing_len=8))[1:3]
    return out


@pytest.mark.slow
def test_every_registry_algorithm_runs_qwen3_vl(hf_reference, checkpoint, inputs):
    """At CP 2, every algorithm of the registry that SpavaCoreAttention runs (Megatron's own
    CP, `megatron`, needs Transformer Engine: tests/test_te.py): exact ones (ring) and
    Spava at full budget give HF's logits and tokens; star and apb, and Spava at a small
    budget, are approximate: finite, near, and the same on both ranks."""
    from megatron_spava.algos import registry
    ref = hf_reference
    ranks = run_ranks(_registry_rank, 2, checkpoint, inputs, timeout=300)
    assert set(ranks[0]) >= {"ring", "star", "apb", "spava"}
    for name, (tokens, first) in ranks[0].items():
        assert torch.equal(first, ranks[1][name][1]) and tokens == ranks[1][name][0], name
        rel = _relative(first, ref["first"])
        if name == "spava" or (name in registry.names() and registry.get(name).exact):
            assert rel < 1e-5 and tokens == ref["tokens"], (name, rel)
        else:
            assert torch.isfinite(first).all() and rel < 0.5, (name, rel)
    assert _relative(ranks[0]["spava-small"][1], ref["first"]) > 1e-5  # the small budget is approximate


# ---------------------------------------------------------------- conversion

def _hf_tensors(path):
    from megatron_spava.models.common.checkpoint_io import iter_hf_tensors
    return dict(iter_hf_tensors(path))


def _convert_rank(hf_dir, meg, back):
    from megatron_spava.models.qwen3_vl.convert import dist_to_hf, hf_to_dist
    hf_to_dist(hf_dir, meg, progress=False)
    dist_to_hf(meg, back, progress=False)


@pytest.mark.slow
def test_tied_bf16_round_trip_is_bit_exact(tmp_path):
    from megatron_spava.models.qwen3_vl.tiny import tiny_hf_config, tiny_hf_model
    hf_dir, meg, back = (str(tmp_path / n) for n in ("hf", "meg", "back"))
    tiny_hf_model(tiny_hf_config(tie=True), dtype=torch.bfloat16).save_pretrained(hf_dir)
    original = _hf_tensors(hf_dir)
    run_ranks(_convert_rank, 1, hf_dir, meg, back, timeout=240)
    again = _hf_tensors(back)
    assert sorted(original) == sorted(again)
    assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], v) for k, v in original.items())


def _te_layout_rank(checkpoint):
    """The weight map against a TE-layout model's names (CPU: names only; TE cannot build)."""
    from megatron_spava import specs
    from megatron_spava.models.common.checkpoint_io import iter_hf_tensors, to_model_layout
    from megatron_spava.models.qwen3_vl.checkpoint import HFToMegatron, megatron_to_hf
    model = _build(1, 1, checkpoint)
    params = dict(model.named_parameters())
    te_names = {specs.local_to_te_key(n) for n in params}
    assert "language_model.decoder.layers.0.self_attention.q_layernorm.weight" in te_names
    conv, landed = HFToMegatron(model.cfg), []
    for name, tensor in iter_hf_tensors(checkpoint):
        landed += [to_model_layout(m, te_names) for m, _ in conv.feed(name, tensor)]
    conv.finish()
    assert sorted(landed) == sorted(te_names)
    for name, tensor in params.items():
        ours = megatron_to_hf(to_model_layout(name, te_names), tensor, model.cfg)
        assert [k for k, _ in ours] == [k for k, _ in megatron_to_hf(name, tensor, model.cfg)]
    return True


@pytest.mark.slow
def test_weight_map_handles_the_te_key_layout(checkpoint):
    assert run_ranks(_te_layout_rank, 1, checkpoint, timeout=120) == [True]


# ---------------------------------------------------------------- MoE (Qwen3-VL-30B-A3B's architecture)

@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The tiny MoE checkpoint (8 experts, top 2, every layer), the video prompt, HF's answers."""
    from megatron_spava.models.qwen3_vl.prompt import Qwen3VLPrompter
    from megatron_spava.models.qwen3_vl.tiny import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3vlmoe") / "tiny"), moe=True)
    inputs = Qwen3VLPrompter(ckpt)(_clip(), QUESTION)
    return ckpt, inputs, _hf_reference(ckpt, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,algo", [(2, 1, "full")])
def test_moe_matches_hf(moe, tp, cp, algo):
    """megatron-core's MoE layers (router, SequentialMLP experts, all-gather dispatcher) with
    the converted weights: at TP 2 (experts TP-split) every layer's hidden states and the
    first-token logits within 1e-5 of Qwen3VLMoeForConditionalGeneration and its 16 tokens.
    (Spava at full budget with CP, the round trip: tests/test_families.py[qwen3_vl_moe].)"""
    ckpt, inputs, ref = moe
    budget = FULL_BUDGET if algo == "spava" else {}
    for vision, tokens, first, hidden in run_ranks(_rank, tp * cp, tp, cp, algo, budget, ckpt, inputs, cp == 1,
                                                   timeout=300):
        if cp == 1:
            errors = [_relative(ours, theirs) for ours, theirs in zip(hidden, ref["hidden"])]
            assert len(hidden) == 4 and max(errors) < 1e-5, errors
            print(f"\nMoE TP {tp}: hidden states vs HF " + ", ".join(f"{e:.1e}" for e in errors)
                  + f"; logits {_relative(first, ref['first']):.1e}")
        assert _relative(vision, ref["vision"]) < 1e-5
        assert _relative(first, ref["first"]) < 1e-5, _relative(first, ref["first"])
        assert tokens == ref["tokens"]


def test_moe_checkpoint_stores_the_experts_stacked(tmp_path):
    """The tiny MoE checkpoint holds HF's stacked expert tensors (what the conformance
    suite's round trip of qwen3_vl_moe then reproduces bit for bit)."""
    from megatron_spava.models.common.checkpoint_io import iter_hf_tensors
    from megatron_spava.models.qwen3_vl.moe.tiny import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(str(tmp_path / "moe"))
    assert any("experts.gate_up_proj" in name for name, _ in iter_hf_tensors(ckpt))


# ---------------------------------------------------------------- limits and errors

def test_config_errors_are_clear():
    from megatron_spava.models.qwen3_vl import Qwen3VLConfig
    from megatron_spava.models.qwen3_vl.tiny import tiny_hf_config
    cfg = tiny_hf_config()
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 3"):
        Qwen3VLConfig.from_hf(cfg).validate(3)
    with pytest.raises(ValueError, match="model_type 'qwen2_5_vl' is not"):
        Qwen3VLConfig.from_hf({**cfg, "model_type": "qwen2_5_vl"})
    mixed = tiny_hf_config(moe=True)
    mixed["text_config"]["mlp_only_layers"] = [1]
    with pytest.raises(ValueError, match="only models whose every layer is MoE"):
        Qwen3VLConfig.from_hf(mixed)
    bad = json.loads(json.dumps(cfg))
    bad["vision_config"]["deepstack_visual_indexes"] = [0, 5]
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        Qwen3VLConfig.from_hf(bad)
    yarn = json.loads(json.dumps(cfg))
    yarn["text_config"]["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        Qwen3VLConfig.from_hf(yarn)


# ---------------------------------------------------------------- Transformer Engine (GPU)

def _te_convert_rank(checkpoint, tmp):
    """The tiny checkpoint's dist checkpoints, written by local and by TE layers."""
    from megatron.core import parallel_state as ps
    from megatron_spava.models.qwen3_vl.convert import hf_to_dist
    ps.initialize_model_parallel()
    return {b: hf_to_dist(checkpoint, os.path.join(tmp, f"dist_{b}"), backend=b, progress=False)
            for b in ("local", "te")}


def _te_rank(checkpoint, paths, inputs):
    """HF -> dist checkpoints written by local and by TE layers -> the model on TE layers at
    this TP size (gloo ranks sharing one GPU, as tests/test_te.py does): every weight
    bit-identical to the local model's, and full-attention prefill + decode agree."""
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.inference.generate import generate
    from megatron_spava.models.qwen3_vl import Qwen3VLConfig, Qwen3VLModel
    from megatron_spava.models.qwen3_vl.convert import load_dist_into_model
    from megatron_spava.specs import te_to_local_key
    tp = dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    initialize_rng_tracker(inference_rng_tracker=True)
    cfg = Qwen3VLConfig.from_hf(checkpoint)

    def model(backend, path):
        m = Qwen3VLModel(cfg, tensor_parallel=tp, backend=backend, perform_initialization=False)
        load_dist_into_model(m, path)
        return m.cuda().eval()

    local = model("local", paths["local"])
    ref = {te_to_local_key(n): p.detach().cpu() for n, p in local.named_parameters()}
    out = {}
    for name, (backend, path) in {"local": ("local", paths["local"]), "te<-local": ("te", paths["local"]),
                                  "te<-te": ("te", paths["te"])}.items():
        m = local if name == "local" else model(backend, path)
        w = {te_to_local_key(n): p.detach().cpu() for n, p in m.named_parameters()}
        same = sorted(w) == sorted(ref) and all(torch.equal(w[k], ref[k]) for k in w)
        g = generate(m, inputs, algo="full", max_new_tokens=8, eos_token_ids=[], device=torch.device("cuda"))
        out[name] = (same, g.tokens, g.first_logits)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("tp", [1, 2])
def test_te_layers_load_the_checkpoint_and_agree(tmp_path, checkpoint, inputs, tp):
    """A checkpoint converted once (by local or by TE layers) loads at TP 1 and 2 into TE
    layers bit-exact, and TE's prefill + decode agree with local layers' (float32, no TF32)."""
    from megatron_spava.specs import te_available
    if not te_available():
        pytest.skip("Transformer Engine (transformer_engine.pytorch) does not import")
    paths = run_ranks(_te_convert_rank, 1, checkpoint, str(tmp_path), timeout=300)[0]
    for out in run_ranks(_te_rank, tp, checkpoint, paths, inputs, timeout=300):
        assert all(same for same, _, _ in out.values()), {k: v[0] for k, v in out.items()}
        ref = out["local"][2]
        for name, (_, tokens, first) in out.items():
            assert _relative(first, ref) < 2e-3, name
            assert tokens == out["local"][1], name


# ---------------------------------------------------------------- everywhere the other families are

def test_bench_prompts_are_the_processors_layout_and_fit_the_8b_shape():
    """The prefill benchmark's Qwen3-VL prompts (perf.inputs, (models.qwen3_vl.bench): the lengths it
    reports, one timestamped group per temporal group (the rope index accepts them), and
    the released 8B shape (Qwen/Qwen3-VL-8B-Instruct) fits TP 1-8 but not 3 (placement)."""
    from megatron_spava.perf import bench_prefill as bp
    from megatron_spava.perf.inputs import prompt_lengths, synthetic_inputs
    from megatron_spava.models.qwen3_vl.rope import rope_index
    from megatron_spava.placement import fit_error, request_of
    cfg = bp.model_config("tiny", "qwen3_vl")
    for multiple in (1, 8):
        groups, context, query = prompt_lengths(3000, cfg, multiple)
        inputs = synthetic_inputs(cfg, 3000, 0, multiple)
        ids = inputs.input_ids
        assert ids.shape[1] == context + query and ids.shape[1] % multiple == 0
        assert int((ids == cfg.vision_start_token_id).sum()) == groups + 1 == inputs.frame_groups + 1
        assert cfg.query_length(ids) == query
        rope_index(ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                   spatial_merge_size=2, video_grid_thw=inputs.video_grid_thw)
    big = bp.model_config("qwen3-vl-8b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads, big.head_dim,
            big.vision.depth, big.deepstack_layers) == (36, 4096, 32, 8, 128, 27, 3)
    assert all(fit_error(tp=tp, cp=2, algos=["spava"], model_config=big) is None for tp in (1, 2, 4, 8))
    assert "does not fit TP=3" in fit_error(tp=3, cp=2, algos=["spava"], model_config=big)
    req = request_of(synthetic_inputs(cfg, 3000, 0), cfg)
    assert "frame groups for 16 ranks (CP=16" in fit_error(tp=1, cp=16, algos=["spava"], requests=[req])
    # with the model's config, in its family's words (a temporal group of 2 frames)
    assert "temporal groups for 16 ranks (CP=16" in fit_error(tp=1, cp=16, algos=["spava"], requests=[req],
                                                              model_config=cfg)
