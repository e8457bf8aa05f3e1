"""The selection-score seam (algos.spava.selection): a score defined and registered here only, in
this file, runs through Spava's attention (checked against a dense-mask SDPA written from
its rule) and through the needle evaluation; and the selection hook reports what was chosen.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
from megatron_spava.algos.spava import selection
from megatron_spava.testing import run_ranks
from megatron_spava.testing.tools import run_tool
from megatron_spava.testing.reference import full_attention, random_qkv, relative_error, star_mask

CALLS = []


def _first_tokens(k_block, probes, scale):
    """A toy score: the earlier a key in its block, the higher (-t); ignores the probes."""
    CALLS.append((tuple(k_block.shape), tuple(probes.shape)))
    l, b, hk, _ = k_block.shape
    return -torch.arange(l, dtype=torch.float32).expand(b, hk, l)


def _first_tokens_mask(layout) -> torch.Tensor:
    """Dense [S, S] mask of Spava with the toy score, from its rule: rows of a block see the
    anchor, their block causally, and the first min(passing, len) tokens of every earlier
    block (every head keeps the same tokens)."""
    n, total = layout.context_len, layout.context_len + layout.query_len
    mask = star_mask(layout)
    for u in range(layout.num_blocks):
        lo, hi = layout.block_range(u)
        mask[hi:n, lo:lo + min(layout.passing_len, hi - lo)] = True
    return mask & torch.ones(total, total, dtype=torch.bool).tril()


def _toy_rank(n, lq, cfg, seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, 1, 4, 2, 16, seed=seed)
    with selection.registered_scorer("first", _first_tokens):
        config = SpavaConfig(**cfg, selection="first")
        layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=config)
        idx = layout.local_indices(rank)
        with selection.record_selection() as events:
            out = spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    blocks = [(e["block"], e["selection"], e["indices"].clone()) for e in events if e["kind"] == "block"]
    return idx, out, list(CALLS), blocks, [e["lse"].shape for e in events if e["kind"] == "query"]


@pytest.mark.parametrize("world", [2, 3])
def test_a_score_registered_in_a_test_runs_through_the_layer(world):
    n, lq = 400, 5
    cfg = dict(anchor_len=16, passing_len=20, budget_align=1, pool_kernel=1)
    results = run_ranks(_toy_rank, world, n, lq, cfg, 11, timeout=60)
    layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=SpavaConfig(**cfg))
    q, k, v = random_qkv(n + lq, 1, 4, 2, 16, seed=11)
    ref = full_attention(q, k, v, mask=_first_tokens_mask(layout))
    for rank, (idx, out, calls, blocks, query) in enumerate(results):
        torch.testing.assert_close(out.double(), ref[idx], rtol=1e-5, atol=1e-5)
        mine = [v for v in layout.blocks_of(rank) if v != layout.num_blocks - 1]
        assert [c[1] for c in calls] == [(lq, 1, 4, 16)] * len(mine)  # the query tokens are the probes
        assert [b[0] for b in blocks] == mine and all(b[1] == "first" for b in blocks)
        for _, _, index in blocks:  # the hook reports the kept positions: the first 20
            assert sorted(index[0, 0].tolist()) == list(range(20))
        assert query == [(lq, 1, 4)]
    assert relative_error(results[-1][1], full_attention(q, k, v)[results[-1][0]]) > 1e-3
    assert "first" not in selection.SCORERS  # registered for the with block only


def test_config_arguments_and_variants_read_the_table():
    from megatron_spava.algos.registry import benchmark_variants, parse_variant
    from megatron_spava.arguments import add_spava_args, spava_config_from_args
    import argparse
    assert SpavaConfig().selection == "lse"
    with pytest.raises(ValueError, match="SpavaConfig.selection must be one of"):
        SpavaConfig(selection="first")
    with selection.registered_scorer("first", _first_tokens):
        assert SpavaConfig(selection="first").selection == "first"
        assert parse_variant("spava-selection-first") == ("spava", {"selection": "first"})
        assert "spava-selection-first" in benchmark_variants()
        args = add_spava_args(argparse.ArgumentParser(), algorithm=False).parse_args(
            ["--spava-selection", "first"])
        assert spava_config_from_args(args).selection == "first"
    assert "spava-selection-first" not in benchmark_variants()
    assert {"spava-selection-mean", "spava-selection-rownorm", "spava-selection-rownorm-max"} <= set(benchmark_variants())
    assert parse_variant("spava-selection-rownorm-max") == ("spava", {"selection": "rownorm-max"})
    with pytest.raises(SystemExit):
        add_spava_args(argparse.ArgumentParser(), algorithm=False).parse_args(["--spava-selection", "first"])


def _evaluate_with_toy(checkpoint, out):
    from megatron_spava.tasks import evaluate
    with selection.registered_scorer("first", _first_tokens):
        args = evaluate.build_parser().parse_args(
            ["--checkpoint", checkpoint, "--tokens", "1024", "--samples", "1", "--tasks", "ordering",
             "--algos", "spava", "spava-selection-first", "--cp-sizes", "2", "--json", out])
        result = evaluate.run(args)
    return result, len(CALLS)


@pytest.mark.slow
def test_a_score_registered_in_a_test_runs_through_the_needle_evaluation(tmp_path):
    from test_needles import _write_checkpoint
    ckpt = _write_checkpoint(tmp_path / "ckpt", seed=1)
    (result, calls), (_, calls1) = run_ranks(_evaluate_with_toy, 2, ckpt, str(tmp_path / "r.json"),
                                             timeout=300)
    assert calls > 0 and calls1 > 0  # the toy score selected on both ranks
    by = {r["algo"]: r for r in result["records"]}
    assert set(by) == {"full", "spava", "spava-selection-first"}
    assert result["meta"]["algos"] == ["full", "spava", "spava-selection-first"]
    assert by["spava-selection-first"]["passing_len"] < by["spava-selection-first"]["block_len"]
    assert by["spava-selection-first"]["kl"] != by["spava"]["kl"]  # a different selection
    for algo in ("spava", "spava-selection-first"):  # the measured recall, per decoder layer
        recall = by[algo]["recall"]
        assert len(recall) == 4 and all(0 < r <= 1 for r in recall), recall
    assert by["spava"]["recall"] != by["spava-selection-first"]["recall"]
    assert "Measured recall" in evaluate_markdown(result)


def evaluate_markdown(result):
    from megatron_spava.tasks.evaluate import markdown
    return markdown(result)


def _recall_rank(n, lq, cfg, seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, 1, 4, 2, 16, seed=seed)
    q[n:] *= 3.0  # a peaked question: the scores differ from chance
    layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=SpavaConfig(**cfg))
    idx = layout.local_indices(rank)
    with selection.measure_recall() as recall, selection.record_selection() as events:
        spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    return recall, [(e["block_range"], e["indices"].clone()) for e in events if e["kind"] == "block"]


@pytest.mark.parametrize("score", ["lse", "mean"])
def test_measured_recall_equals_the_exact_attention_mass_share(score):
    """measure_recall's per-layer share of the question's attention mass on each block that
    the kept keys carry, against float64 softmax probabilities of the query rows over the
    whole sequence, computed here from q and k."""
    n, lq, world = 600, 4, 2
    cfg = dict(anchor_len=16, passing_len=32, budget_align=1, selection=score)
    results = run_ranks(_recall_rank, world, n, lq, cfg, 5, timeout=60)
    q, k, _ = random_qkv(n + lq, 1, 4, 2, 16, seed=5)
    q[n:] *= 3.0
    logits = torch.einsum("ihd,thd->hit", q[n:, 0].double(), k[:, 0].double().repeat_interleave(2, dim=1)) / 4.0
    logits[:, :, n:] += torch.full((lq, lq), float("-inf")).triu(1)  # the query is causal within itself
    p = logits.softmax(-1)  # [hq, lq, S]
    shares, total, count = [], 0.0, 0
    for recall, blocks in results:
        (s, c), = recall.values()  # one layer
        total, count = total + s, count + c
        for (lo, hi), index in blocks:
            for h in range(2):
                kept = p[2 * h:2 * h + 2, :, lo + index[0, h]].sum()
                shares.append(float(kept / p[2 * h:2 * h + 2, :, lo:hi].sum()))
    assert count == len(shares) > 0
    assert abs(total / count - sum(shares) / len(shares)) < 1e-5, (total / count, shares)
    chance = 32 / ((n - 16) / (2 * world))
    assert max(shares) < 1 and min(shares) > 0
    if score == "lse":  # the log-sum-exp score keeps more of the mass than a random pick would
        assert total / count > chance


def test_no_subscriber_no_report(monkeypatch):
    """With nobody listening, the selection builds and publishes nothing."""
    def refuse(event):
        raise AssertionError("published with no subscriber")
    monkeypatch.setattr(selection, "publish", refuse)
    k, v, qq = torch.randn(50, 1, 2, 8), torch.randn(50, 1, 2, 8), torch.randn(3, 1, 4, 8)
    selection.select_passing(k, v, qq, 8, 5, 0.3, report=dict(block=0))
    with selection.at_layer(3):
        assert selection.current_layer() is None
    with selection.record_selection() as events, selection.at_layer(3):
        monkeypatch.undo()
        selection.select_passing(k, v, qq, 8, 5, 0.3, report=dict(block=0))
    (e,), = [events]
    assert e["layer"] == 3 and e["block"] == 0 and e["indices"].shape == (1, 2, 8)
    assert e["scores"].shape == (1, 2, 50) and e["selection"] == "lse"
    assert not selection.listening()


@pytest.mark.slow  # the tool as a command, ~10 s
def test_recall_tool_on_random_inputs(tmp_path):
    """tools/selection_recall.py (no trained model): every score of the table is measured;
    the default keeps the planted keys and more of the question's mass than a random pick."""
    out = tmp_path / "recall.json"
    assert run_tool("tools/selection_recall.py", ["--tokens", "2048", "--query-len", "16", "--head-dim", "32",
                                  "--json", str(out)]) == 0
    rows = {r["selection"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(selection.SCORERS)
    for r in rows.values():
        assert 0 < r["chance"] < r["recall"] < 1 and r["budget"] == 128
    assert rows["lse"]["planted_kept"] > 0.9 > rows["mean"]["planted_kept"]
    assert rows["lse"]["recall"] > rows["mean"]["recall"]


@pytest.mark.cuda
def test_lse_on_cuda_is_the_fused_kernel_and_matches_the_torch_path(monkeypatch):
    """On a CUDA device the default score runs ops.lse_score's kernel; its scores equal the
    CPU torch path's (fp32 inputs), so the same keys are kept."""
    from megatron_spava.ops import lse_score
    torch.manual_seed(0)
    k, qq = torch.randn(777, 1, 4, 64), torch.randn(19, 1, 28, 64)
    calls = []
    real = lse_score.lse_scores
    monkeypatch.setattr(lse_score, "lse_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = selection.selection_scores(k.cuda(), qq.cuda(), 1, 0.125).cpu()
    assert calls and got.shape == (1, 4, 777)
    torch.testing.assert_close(got, selection.lse_scores_torch(k, qq, 0.125), rtol=1e-4, atol=1e-4)


def _rownorm_reference(k_block, probes, scale):
    """float64, from the definition with loops: for each (batch, KV head), each probe row
    (token j, head g of the group) gets its softmax over the block's keys; a key's score is
    the log of the sum of those probabilities over the rows. [b, hk, l]."""
    l, b, hk, d = k_block.shape
    m, _, hq, _ = probes.shape
    group = hq // hk
    out = torch.empty(b, hk, l, dtype=torch.float64)
    for bi in range(b):
        for h in range(hk):
            keys = k_block[:, bi, h].double()  # [l, d]
            total = torch.zeros(l, dtype=torch.float64)
            for j in range(m):
                for g in range(h * group, (h + 1) * group):
                    total += torch.softmax(scale * (keys @ probes[j, bi, g].double()), dim=0)
            out[bi, h] = total.log()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 1, 2, 2, 8, 1), (101, 2, 6, 2, 16, 5), (257, 1, 28, 4, 32, 3),
                                   (64, 3, 4, 4, 8, 9)])
@pytest.mark.parametrize("chunk", [None, 50])
def test_rownorm_is_each_probe_rows_block_softmax_summed(shape, dtype, chunk, monkeypatch):
    """selection "rownorm" against a float64 loop over its definition (GQA, odd lengths,
    batch > 1, bf16 operands, the torch path in several key chunks); "rownorm-max" is it
    shared by the KV heads as "lse-max" shares "lse" (each head's log share of the block's
    mass, maximised over the heads); every probe row counts once."""
    l, b, hq, hk, d, m = shape
    g = torch.Generator().manual_seed(l + hq)
    k_block = torch.randn(l, b, hk, d, generator=g).to(dtype)
    probes = (torch.randn(m, b, hq, d, generator=g) * torch.rand(1, 1, hq, 1, generator=g) * 4).to(dtype)
    scale = d ** -0.5
    if chunk:  # rownorm's torch path is ops.lse_score's
        from megatron_spava.ops import lse_score
        monkeypatch.setattr(lse_score, "_LOGITS_PER_CHUNK", chunk)
    expected = _rownorm_reference(k_block, probes, scale)
    got = selection.selection_scores(k_block, probes, 1, scale, "rownorm")
    assert got.dtype == torch.float32 and got.shape == (b, hk, l)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected.exp().sum(-1), torch.full((b, hk), float(m * hq // hk), dtype=torch.float64))
    share = expected - torch.logsumexp(expected, dim=-1, keepdim=True)
    shared = share.amax(dim=1, keepdim=True).expand(b, hk, l)
    torch.testing.assert_close(selection.selection_scores(k_block, probes, 1, scale, "rownorm-max").double(),
                               shared, rtol=1e-5, atol=1e-5)
    # pooled as every score is; and a real difference from lse here (rows of unequal scale)
    padded = F.pad(expected, (2, 2), value=float("-inf"))
    pooled = torch.stack([padded[..., t:t + 5].amax(-1) for t in range(l)], dim=-1)
    torch.testing.assert_close(selection.selection_scores(k_block, probes, 5, scale, "rownorm").double(),
                               pooled, rtol=1e-5, atol=1e-5)


def test_rownorm_keeps_the_key_a_quiet_row_wants_where_lse_keeps_the_loud_rows():
    """Where one probe row's logits are much larger than another's, lse follows the loud
    row alone; rownorm gives the quiet row's favourite key the same weight (its softmax
    counts once), so it keeps it."""
    d, l = 4, 16
    e = torch.eye(d)
    loud, quiet = 8 * e[0], 1.5 * e[1]
    qq = torch.stack([loud, quiet]).reshape(2, 1, 1, d)
    k = (0.5 * e[0] + 0.1 * torch.randn(l, d, generator=torch.Generator().manual_seed(0))).reshape(l, 1, 1, d)
    k[11, 0, 0] = 3 * e[1]  # the key the quiet row wants
    v = torch.randn(l, 1, 1, d)
    for score, hit in (("lse", False), ("rownorm", True), ("rownorm-max", True)):
        sel = selection.select_passing(k, v, qq, 3, pool_kernel=1, scale=1.0, selection=score)
        assert bool((sel[:, 0, 0, :d] == k[11, 0, 0]).all(-1).any()) is hit, score


@pytest.mark.cuda
@pytest.mark.parametrize("score", ["rownorm", "rownorm-max"])
def test_rownorm_on_cuda_matches_the_cpu(score):
    torch.manual_seed(0)
    k, qq = torch.randn(777, 1, 4, 64), torch.randn(19, 1, 28, 64)
    got = selection.selection_scores(k.cuda(), qq.cuda(), 1, 0.125, score).cpu()
    torch.testing.assert_close(got, selection.selection_scores(k, qq, 1, 0.125, score), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("lq", [64, 512])
def test_rownorm_on_cuda_is_the_fused_kernel_and_matches_the_torch_path(lq, monkeypatch):
    """On a CUDA device "rownorm" runs ops.lse_score's kernel twice (the swapped row pass,
    then the per-key pass with the row offset) on a 16K-key block of the 7B shape (bf16); its
    scores match a float64 reference (matmul + logsumexp) and the torch path on the same
    inputs, and keep nearly the same top-k keys."""
    from megatron_spava.ops import _lse_score_triton, lse_score
    if not lse_score.triton_available():
        pytest.skip("triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(lq)
    k = torch.randn(16384, 1, 4, 128, device="cuda", generator=gen).bfloat16()
    qq = (torch.randn(lq, 1, 28, 128, device="cuda", generator=gen)
          * (0.5 + 2 * torch.rand(1, 1, 28, 1, device="cuda", generator=gen))).bfloat16()
    scale = 128 ** -0.5
    launches = []
    real = _lse_score_triton.launch
    monkeypatch.setattr(_lse_score_triton, "launch", lambda *a, **kw: launches.append(kw.get("row_offset") is not None) or real(*a, **kw))
    got = selection.selection_scores(k, qq, 1, scale, "rownorm")
    assert launches == [False, True] and got.shape == (1, 4, 16384) and torch.isfinite(got).all()
    torch_path = lse_score.rownorm_scores(qq, k, scale, impl="torch").permute(1, 2, 0)  # [b, hk, l]
    x = torch.matmul(k.double().permute(1, 2, 0, 3),  # [b, hk, l, R], rows (j, g) g fastest
                     qq.double().reshape(lq, 1, 4, 7, 128).permute(1, 2, 4, 0, 3).reshape(1, 4, 128, -1)) * scale
    expected = torch.logsumexp(x - torch.logsumexp(x, dim=2, keepdim=True), dim=-1)
    del x
    assert float((got.double() - expected).abs().max()) < 1e-3
    assert float((got - torch_path).abs().max()) < 1e-3
    top_fused, top_torch = got.topk(1024, dim=-1).indices, torch_path.topk(1024, dim=-1).indices
    kept = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_fused[0], top_torch[0])])
    assert float(kept.min()) >= 0.99 * 1024, kept
