"""Qwen2.5-VL on megatron-core against HF transformers' own model, on tiny random configs
built offline: vision encoder, prefill logits and greedy decode under TP x CP, M-RoPE
positions, frame parallelism and its limits."""

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig
from megatron_spava.models.qwen2_5_vl.rope import decode_positions, rope_index, token_types
from megatron_spava.models.qwen2_5_vl.tiny import tiny_hf_config, tiny_hf_model
from megatron_spava.testing import run_ranks

IMG, VID, VS, VE = 246, 247, 243, 244  # tiny config special ids
FULL_BUDGET = dict(budget_align=1, anchor_len=8, passing_len=4096)
MAX_NEW = 8


def _prompt(grid=(6, 8, 12), seed=1):
    """[5 text | vision_start | video | vision_end | 7 text] and random pixel patches."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_video = t * (h // 2) * (w // 2)
    ids = torch.cat([torch.randint(0, 240, (5,), generator=g), torch.tensor([VS]),
                     torch.full((n_video,), VID), torch.tensor([VE]),
                     torch.randint(0, 240, (7,), generator=g)])[None]
    pixels = torch.randn(t * h * w, 1176, generator=g)
    return ids, pixels, torch.tensor([list(grid)]), torch.tensor([1.0])


def _positions(ids, grid, seconds):
    return rope_index(ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                      tokens_per_second=2, video_grid_thw=grid, second_per_grid_ts=seconds)


# ---------------------------------------------------------------- M-RoPE positions

def _mixed_prompt():
    """text | video (8 groups of 2x2 merged, interval 2 -> long in t) | text | image | text."""
    ids = [1, 2, 3, VS] + [VID] * (8 * 2 * 2) + [VE, 4, 5, VS] + [IMG] * (1 * 2 * 3) + [VE, 6, 7]
    return (torch.tensor([ids]), torch.tensor([[1, 4, 6]]), torch.tensor([[8, 4, 4]]),
            torch.tensor([1.0]))


def _original_qwen_rope(ids, image_grid, video_grid, seconds, tps=2, merge=2):
    """Qwen's original get_rope_index rule, written out independently: text resumes at
    max(previous positions) + 1; a vision block sits at st + (t * interval, h, w)."""
    out, st, i, vi, ii = [], 0, 0, 0, 0
    seq = ids[0].tolist()
    while i < len(seq):
        if seq[i] in (IMG, VID):
            kind = seq[i]
            t, h, w = (video_grid[vi] if kind == VID else image_grid[ii]).tolist()
            interval = tps * float(seconds[vi]) if kind == VID else 0.0
            vi, ii = (vi + 1, ii) if kind == VID else (vi, ii + 1)
            for tt in range(t):
                for hh in range(h // merge):
                    for ww in range(w // merge):
                        out.append((st + int(tt * interval), st + hh, st + ww))
            i += t * (h // merge) * (w // merge)
            st = max(max(p) for p in out) + 1
        else:
            out.append((st, st, st))
            st += 1
            i += 1
    return torch.tensor(out).t()


def test_rope_index_qwen_convention_matches_the_original_rule():
    ids, image_grid, video_grid, seconds = _mixed_prompt()
    pos, deltas = rope_index(ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                             tokens_per_second=2, image_grid_thw=image_grid,
                             video_grid_thw=video_grid, second_per_grid_ts=seconds)
    expected = _original_qwen_rope(ids, image_grid, video_grid, seconds)
    assert torch.equal(pos[:, 0], expected)
    assert int(deltas) == int(expected.max()) + 1 - ids.shape[1]
    step = decode_positions(pos, deltas, 0, ids.shape[1])
    assert step.shape == (3, 1, 1) and int(step[0, 0, 0]) == int(expected.max()) + 1


@pytest.mark.parametrize("prompt", ["mixed", "video", "text"])
def test_rope_index_hf_convention_matches_transformers(prompt):
    hf = tiny_hf_model(tiny_hf_config())
    if prompt == "mixed":
        ids, image_grid, video_grid, seconds = _mixed_prompt()
    elif prompt == "video":
        ids, _, video_grid, seconds = _prompt()
        image_grid = None
    else:
        ids, image_grid, video_grid, seconds = torch.arange(20)[None], None, None, None
    kwargs = dict(image_grid_thw=image_grid, video_grid_thw=video_grid, second_per_grid_ts=seconds)
    ref_pos, ref_delta = hf.model.get_rope_index(ids, token_types(ids, IMG, VID), **kwargs)
    pos, delta = rope_index(ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                            tokens_per_second=2, convention="hf", **kwargs)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta.view(-1), ref_delta.view(-1))
    qwen, _ = rope_index(ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                         tokens_per_second=2, **kwargs)
    # the conventions differ only when a video's t extent passes max(h, w) / merge
    assert torch.equal(qwen, pos) == (prompt == "text")


def test_rope_conventions_agree_for_a_short_video():
    ids, _, grid, seconds = _prompt(grid=(2, 8, 12))  # t positions 0, 2 < max(4, 6)
    kwargs = dict(image_token_id=IMG, video_token_id=VID, spatial_merge_size=2, tokens_per_second=2,
                  video_grid_thw=grid, second_per_grid_ts=seconds)
    assert torch.equal(rope_index(ids, **kwargs)[0], rope_index(ids, convention="hf", **kwargs)[0])


def test_rope_index_rejects_grid_mismatch():
    ids, pixels, grid, seconds = _prompt()
    with pytest.raises(ValueError, match="does not match its grid"):
        _positions(ids, torch.tensor([[6, 8, 8]]), seconds)


# ---------------------------------------------------------------- model parity vs HF

def _megatron_rank(tp, cp, algo, cfg_kwargs, what, shard=False):
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel, encode_video_frame_parallel
    from megatron_spava.models.qwen2_5_vl.convert import load_hf_into_model
    from megatron_spava.inference.generate import generate
    from megatron_spava.video.inputs import VideoQAInputs

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_rng_tracker(inference_rng_tracker=True)
    hf_cfg = tiny_hf_config()
    cfg = Qwen25VLConfig.from_hf(hf_cfg)
    model = Qwen25VLModel(cfg, tensor_parallel=tp, context_parallel=cp).eval()
    load_hf_into_model(model, tiny_hf_model(hf_cfg).state_dict().items(),
                       tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp, progress=False)
    ids, pixels, grid, seconds = _prompt()
    group = ps.get_context_parallel_group()
    if what == "vision":
        with torch.no_grad():
            return encode_video_frame_parallel(model.visual, pixels, grid, group)
    if what == "questions":
        return _questions(model, (ids, pixels, grid, seconds), algo, SpavaConfig(**cfg_kwargs), group)
    if shard:
        sharded = model.shard_weights(group)
        layer = model.language_model.decoder.layers[0]
        assert all(p.numel() == 0 for p in layer.parameters())  # freed between forwards
    out = generate(model, VideoQAInputs(ids, pixels, grid, seconds), algo=algo,
                   config=SpavaConfig(**cfg_kwargs), cp_group=group, max_new_tokens=MAX_NEW,
                   eos_token_ids=[])
    if shard:
        assert all(p.numel() == 0 for p in layer.parameters())
        assert sum(t.numel() for t in sharded.shards) * cp >= sum(
            shape.numel() for layout in sharded.layouts for _, _, shape in layout)
    return out.tokens, out.first_logits


@pytest.fixture(scope="module")
def hf_reference():
    """HF's vision output, and HF's own greedy decode with the same M-RoPE positions."""
    hf = tiny_hf_model(tiny_hf_config())
    ids, pixels, grid, seconds = _prompt()
    pos, deltas = _positions(ids, grid, seconds)
    S = ids.shape[1]
    with torch.no_grad():
        vision = hf.model.visual(pixels, grid_thw=grid).pooler_output
        out = hf(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,
                 second_per_grid_ts=seconds, position_ids=pos, use_cache=True)
        first = out.logits[0, -1]
        token, tokens, past = int(first.argmax()), [], out.past_key_values
        for step in range(MAX_NEW):
            tokens.append(token)
            if len(tokens) == MAX_NEW:
                break
            out = hf(input_ids=torch.tensor([[token]]), position_ids=decode_positions(pos, deltas, step, S),
                     past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    assert len(set(tokens)) > 3  # the tiny model's answer varies: a real decode test
    return vision, tokens, first


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4)])
def test_vision_encoder_frame_parallel_matches_hf(hf_reference, tp, cp):
    for out in run_ranks(_megatron_rank, tp * cp, tp, cp, "full", {}, "vision", timeout=180):
        torch.testing.assert_close(out, hf_reference[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,algo", [(2, 1, "full"), (1, 2, "spava"), (1, 4, "spava"), (2, 4, "spava"),
                                        (2, 2, "ring"), (1, 2, "apb")])  # 1x1 full, 2x2 spava: test_families
def test_prefill_logits_and_greedy_decode_match_hf(hf_reference, tp, cp, algo):
    _, ref_tokens, ref_first = hf_reference
    results = run_ranks(_megatron_rank, tp * cp, tp, cp, algo, FULL_BUDGET, "generate", timeout=180)
    for tokens, first in results:
        assert tokens == ref_tokens
        torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(first, results[0][1]) for _, first in results)  # one answer everywhere


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,algo", [(1, 2, "spava"), (2, 2, "ring")])
def test_weights_sharded_over_cp_still_match_hf(hf_reference, tp, cp, algo):
    """Language-model weights sharded over the CP group and gathered layer by layer
    (Qwen25VLModel.shard_weights): the same tokens and logits as HF, prefill and decode."""
    _, ref_tokens, ref_first = hf_reference
    results = run_ranks(_megatron_rank, tp * cp, tp, cp, algo, FULL_BUDGET, "generate", True, timeout=180)
    for tokens, first in results:
        assert tokens == ref_tokens
        torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("algo,switch", [("spava", "fuse_query"), ("ring", "fuse_query"),
                                         ("spava", "frame_parallel")])
def test_ablation_switches_at_full_budget_match_hf(hf_reference, algo, switch):
    """Without fuse_query (the context prefilled alone, the query over the KV cache) or
    without frame-parallel vision (every rank encodes the whole video), the full-budget
    answer is still HF's: prefill logits and greedy decode."""
    _, ref_tokens, ref_first = hf_reference
    results = run_ranks(_megatron_rank, 2, 1, 2, algo, {**FULL_BUDGET, switch: False}, "generate",
                        timeout=180)
    for tokens, first in results:
        assert tokens == ref_tokens
        torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)


def _queries():
    """Three queries (text after <|vision_end|>) of different lengths; the first is _prompt's."""
    g = torch.Generator().manual_seed(7)
    return [_prompt()[0][:, -7:], torch.randint(0, 240, (1, 4), generator=g),
            torch.randint(0, 240, (1, 10), generator=g)]


def _questions(model, prompt, algo, config, group):
    """One context, three queries: answered over one cached context, each also by a fresh
    two-pass generate and by the fused (query-aware) generate of its whole prompt."""
    from dataclasses import replace
    from megatron_spava.inference.generate import answer_questions, generate
    from megatron_spava.video.inputs import VideoQAInputs
    ids, pixels, grid, seconds = prompt
    context = VideoQAInputs(ids[:, :-7], pixels, grid, seconds)
    kwargs = dict(algo=algo, cp_group=group, max_new_tokens=4, eos_token_ids=[])
    cached = answer_questions(model, context, _queries(), config=config, **kwargs)
    runs = {"cached": cached, "fresh": [], "fused": []}
    for q in _queries():
        whole = replace(context, input_ids=torch.cat([context.input_ids, q], dim=1))
        runs["fresh"].append(generate(model, whole, config=config.replace(fuse_query=False), **kwargs))
        runs["fused"].append(generate(model, whole, config=config.replace(fuse_query=True), **kwargs))
    return {k: [(o.tokens, o.first_logits) for o in v] for k, v in runs.items()}


@pytest.mark.slow
def test_several_questions_over_one_cached_context(hf_reference):
    """answer_questions prefills the video context once and answers each query over the
    cache, rolled back between queries. Each answer equals a fresh two-pass prefill of its
    own prompt (prefill logits and decoded tokens). At approximate budgets it differs from
    the fused, query-aware prefill: relative difference of the first-token logits 0.016,
    0.018, 0.021 for the three queries on this random tiny model; for the first query,
    fused vs exact (HF) 0.015 and two-pass vs exact 0.014 (recorded in docs/NOTES.md)."""
    budgets = dict(budget_align=1, anchor_len=8, passing_len=16, context_probe_len=8)
    results = run_ranks(_megatron_rank, 2, 1, 2, "spava", budgets, "questions", timeout=180)
    for runs in results:
        for (tokens, first), (fresh_tokens, fresh_first) in zip(runs["cached"], runs["fresh"]):
            assert tokens == fresh_tokens and torch.equal(first, fresh_first)
    runs = results[0]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(runs["cached"], results[1]["cached"]))
    firsts = [first for _, first in runs["cached"]]
    assert not torch.equal(firsts[0], firsts[1])  # different questions, different answers
    rel = [float((c[1] - f[1]).norm() / f[1].norm()) for c, f in zip(runs["cached"], runs["fused"])]
    exact = hf_reference[2]
    to_exact = {k: float((runs[k][0][1] - exact).norm() / exact.norm()) for k in ("cached", "fused")}
    print(f"\nfirst-token logits, cached two-pass vs fused query-aware (relative): "
          + ", ".join(f"{r:.3g}" for r in rel) + f"; first query vs exact (HF): {to_exact}")
    assert all(0 < r < 0.5 for r in rel) and all(0 < r < 0.5 for r in to_exact.values()), (rel, to_exact)


@pytest.mark.slow
def test_star_generates_with_exact_query_rows_given_inputs(hf_reference):
    """Star Attention (no passing blocks) runs the same pipeline: it answers, every rank
    agrees, and its first-token logits stay finite and near HF's."""
    _, _, ref_first = hf_reference
    results = run_ranks(_megatron_rank, 2, 1, 2, "star", dict(budget_align=1), "generate", timeout=180)
    (tokens, first), (tokens2, first2) = results
    assert len(tokens) == MAX_NEW and tokens == tokens2 and torch.equal(first, first2)
    assert torch.isfinite(first).all()
    assert float((first - ref_first).norm() / ref_first.norm()) < 1.0


@pytest.mark.slow
def test_default_budgets_stay_close_to_hf(hf_reference):
    """Spava at default-like small budgets: approximate, but the first-token logits stay
    close and finite (the query rows are exact given their inputs)."""
    _, _, ref_first = hf_reference
    results = run_ranks(_megatron_rank, 2, 1, 2, "spava",
                        dict(budget_align=1, anchor_len=8, passing_len=16), "generate", timeout=180)
    first = results[0][1]
    rel = float((first - ref_first).norm() / ref_first.norm())
    assert torch.isfinite(first).all() and 0 < rel < 0.5, rel


def _prompt_cache_rank():
    """Five runs (four configurations) on one prompt, twice: each call on its own, and all
    sharing one prompt_cache. Returns (fresh, cached) (tokens, first logits, vision_s,
    ttft_s) per run and the position / encoder calls made while the cache was shared."""
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from megatron_spava.models.qwen2_5_vl.convert import load_hf_into_model
    from megatron_spava.inference.generate import generate
    from megatron_spava.video.inputs import VideoQAInputs

    ps.initialize_model_parallel(1, context_parallel_size=2)
    initialize_rng_tracker(inference_rng_tracker=True)
    hf_cfg = tiny_hf_config()
    model = Qwen25VLModel(Qwen25VLConfig.from_hf(hf_cfg), context_parallel=2).eval()
    load_hf_into_model(model, tiny_hf_model(hf_cfg).state_dict().items(), tp_rank=0, tp_size=1, progress=False)
    inputs = VideoQAInputs(*_prompt())
    group = ps.get_context_parallel_group()
    base = SpavaConfig(budget_align=1, anchor_len=8, passing_len=16, context_probe_len=8)
    runs = [("ring", base), ("spava", base), ("spava", base.replace(fuse_query=False)),
            ("spava", base.replace(frame_parallel=False)), ("spava", base)]
    calls = []
    encode = model.encode_video
    model.encode_video = lambda inputs, cp_group=None: calls.append(cp_group) or encode(inputs, cp_group)
    positions = model.prompt_positions
    model.prompt_positions = lambda *a, **k: calls.append("positions") or positions(*a, **k)
    answer = lambda algo, config, cache: generate(model, inputs, algo=algo, config=config, cp_group=group,
                                                  max_new_tokens=4, eos_token_ids=[], prompt_cache=cache)
    fresh = [answer(algo, config, None) for algo, config in runs]
    calls.clear()
    cache = {}
    cached = [answer(algo, config, cache) for algo, config in runs]
    pack = lambda outs: [(o.tokens, o.first_logits, o.timings["vision_s"], o.ttft_s) for o in outs]
    return pack(fresh), pack(cached), [c if c == "positions" else c is None for c in calls]


def test_prompt_cache_reuses_positions_and_one_encoding_per_frame_parallel_setting(hf_reference):
    """generate(prompt_cache=...) computes the rope positions once and encodes the video
    once per frame_parallel setting (and CP group); every later algorithm (the two-pass
    no-fuse-query one included) reuses them: tokens and first-token logits equal those of
    fresh calls bit for bit (ring's equal HF's), and a reused encoding reports the first
    one's vision seconds inside its TTFT."""
    results = run_ranks(_prompt_cache_rank, 2, timeout=180)
    _, _, ref_first = hf_reference
    for fresh, cached, calls in results:
        # positions once; frame-parallel over the CP group, then the whole video on each rank
        assert calls == ["positions", False, True]
        for (t1, l1, _, _), (t2, l2, _, _) in zip(fresh, cached):
            assert t1 == t2 and torch.equal(l1, l2)
        assert torch.allclose(fresh[0][1], ref_first, atol=2e-4, rtol=1e-4)  # ring is exact
        assert not torch.equal(fresh[0][1], fresh[1][1])  # spava at small budgets is not
        vision = [v for _, _, v, _ in cached]
        assert vision[0] == vision[1] == vision[2] == vision[4] > 0 and vision[3] > 0
        assert all(ttft >= v for _, _, v, ttft in cached)


def _few_frames_rank():
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron_spava.models.qwen2_5_vl.model import split_frame_groups
    try:
        split_frame_groups(torch.tensor([[3, 8, 8]]), dist.get_world_size())
    except ValueError as err:
        return str(err)


def test_too_few_frame_groups_raise_on_every_rank():
    messages = run_ranks(_few_frames_rank, 4, timeout=60)
    assert all(m and "3 temporal groups for 4 ranks" in m for m in messages)


def test_kv_cache_holds_every_token_once_and_appends_to_the_least_loaded_rank():
    from megatron_spava.algos import plan_layout
    from megatron_spava.inference import DistributedKVCache, cache_rows
    for algo in ("spava", "ring", "star", "apb"):
        layout = plan_layout(algo, context_len=500, query_len=9, cp_size=3,
                             config=SpavaConfig(budget_align=1))
        held = torch.cat([layout.local_indices(r)[cache_rows(layout, r)] for r in range(3)])
        assert torch.equal(held.sort().values, torch.arange(509)), algo
    caches = [DistributedKVCache(layout, r, 3, max_new_tokens=5) for r in range(3)]
    owners = [[c.begin_token() for c in caches] for _ in range(5)]
    assert all(len(set(o)) == 1 for o in owners)  # every rank picks the same owner
    lengths = [len(cache_rows(layout, r)) for r in range(3)]
    for (owner, *_) in owners:
        assert lengths[owner] == min(lengths)
        lengths[owner] += 1


@pytest.mark.parametrize("lengths", [[64] * 5, [64, 32, 64, 32, 16], [7], [3, 3, 5, 3]])
def test_segment_attention_matches_a_block_diagonal_mask(lengths):
    """Slab (view) and gathered segments alike equal dense attention under a
    block-diagonal mask (plain SDPA in float64)."""
    from megatron_spava.models.common.vision import segment_attention, segment_groups
    n, heads, d = sum(lengths), 3, 8
    gen = torch.Generator().manual_seed(len(lengths))
    qkv = torch.randn(n, heads, 3, d, generator=gen)  # strided q/k/v views, as in the encoder
    q, k, v = qkv.unbind(2)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = seg[:, None] == seg[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(0, 1) for t in (q, k, v)), attn_mask=mask, scale=0.3).transpose(0, 1)
    groups = segment_groups(lengths, "cpu")
    if lengths == [64] * 5:
        assert len(groups) == 1 and groups[0].rows is None  # one slab: the view path
    out = segment_attention(q, k, v, groups, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- vision encoder: fused add + norm

def _tiny_vision_encoder(dtype, seed=0):
    """A 4-block tiny VisionEncoder (TP = 1) in `dtype`, random weights: norms 1 + N(0, 0.1),
    the rest N(0, 0.1). Call inside single_process_parallel_state."""
    from megatron_spava.models.common.vision import vision_tp_config
    from megatron_spava.models.qwen2_5_vl.vision import VisionConfig, VisionEncoder
    cfg = VisionConfig.from_hf(tiny_hf_config(vision_depth=4)["vision_config"])
    visual = VisionEncoder(cfg, vision_tp_config(cfg, 1, dtype, cpu_init=True, init=False)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "norm" in name or "ln_q" in name else noise)
    return visual


def _unfused_reference(visual, pixels, grid_thw):
    """The encoder's forward as it was before the residual adds were fused with the norms:
    `x = x + branch` in the model dtype, then a separate RMSNorm (HF Qwen2's, written out);
    the other stages through the encoder's own (unchanged) helpers."""
    from megatron_spava.models.common.vision import column, row, segment_attention, segment_groups
    from megatron_spava.models.qwen2_5_vl.vision import fused, vision_position_ids, window_index

    def norm(mod, x):
        xf = x.float()
        return mod.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.eps)).to(x.dtype)

    cfg, unit = visual.cfg, visual.cfg.spatial_merge_size ** 2
    weight = visual.patch_embed.proj.weight
    x = pixels.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
    n = x.shape[0]
    pos = vision_position_ids(grid_thw, cfg.spatial_merge_size)
    freqs = (pos[..., None].float() * visual.inv_freq).flatten(1)
    windows, lengths = window_index(grid_thw, cfg)
    permute = lambda t: t.reshape(n // unit, unit, -1)[windows].reshape(n, -1)  # noqa: E731
    x, freqs = permute(x), permute(freqs)
    cos, sin = freqs.cos(), freqs.sin()
    frames = segment_groups([h * w for t, h, w in grid_thw.tolist() for _ in range(t)], "cpu")
    wins = segment_groups(lengths, "cpu")
    for i, b in enumerate(visual.blocks.children()):
        qkv = column(b.attn.qkv, norm(b.norm1, x)).view(n, -1, 3, b.head_dim)
        q, k = fused("rotary", qkv[:, :, :2], cos, sin).unbind(2)
        o = segment_attention(q, k, qkv[:, :, 2], frames if i in cfg.fullatt_block_indexes else wins,
                              b.head_dim ** -0.5)
        x = x + row(b.attn.proj, o.reshape(n, -1))
        gate_up, gate_up_bias, down = b._fused_mlp_weights()
        gate, up = torch.nn.functional.linear(norm(b.norm2, x), gate_up, gate_up_bias).chunk(2, dim=-1)
        x = x + row(b.mlp.down_proj, torch.nn.functional.silu(gate) * up, weight=down)
    mlp = visual.merger.mlp
    merged = norm(visual.merger.ln_q, x).reshape(n // unit, -1)
    merged = row(getattr(mlp, "2"), torch.nn.functional.gelu(column(getattr(mlp, "0"), merged)))
    return merged[torch.argsort(windows)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid", [(4, 8, 8), (2, 6, 10)])  # uniform windows; ragged
def test_vision_encoder_fused_add_norm_is_bit_identical_to_unfused(dtype, grid):
    """Each residual add fused with the norm that reads it (the next block's norm1, the
    merger's ln_q) gives bit for bit the output of separate `x = x + y` and norm passes."""
    from megatron_spava.models.common.checkpoint_io import single_process_parallel_state
    t, h, w = grid
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3))
    grid_thw = torch.tensor([list(grid)])
    with single_process_parallel_state(), torch.no_grad():
        visual = _tiny_vision_encoder(dtype)
        out, ref = visual(pixels, grid_thw), _unfused_reference(visual, pixels, grid_thw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
