"""`algos.spava.selection.select_passing_blocks` (a rank's blocks selected in one pass) keeps, for
every block, exactly what the one-block-at-a-time path keeps. The reference here is that path
written out from the seam's public pieces (the scorer of SCORERS, max-pool, top-k, gather),
as `select_passing` was before the blocks were batched."""

import pytest
import torch
import torch.nn.functional as F

from megatron_spava.algos.spava import selection


def _one_block(k_block, v_block, probes, budget, pool, scale, score):
    """The per-block path: score, max-pool within the block, per-head top-k, gather."""
    scores = selection.SCORERS[score](k_block, probes, scale).float()
    scores = F.max_pool1d(scores, pool, stride=1, padding=pool // 2)
    index = scores.topk(budget, dim=-1, sorted=False).indices
    return selection.gather_index(k_block, v_block, index), index, scores


def _inputs(s, b, hq, hk, d, lq, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(s, b, hk, d, generator=g).to(device, dtype) for _ in range(2))
    return k, v, torch.randn(lq, b, hq, d, generator=g).to(device, dtype)


@pytest.mark.parametrize("score", ["lse", "mean", "rownorm-max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1000, 19, 8, 2, 32, 64, 2, 1), (517, 7, 4, 4, 16, 40, 3, 2),
                                   (2000, 300, 28, 4, 64, 128, 2, 1)])
def test_blocks_together_keep_what_each_block_keeps(score, dtype, shape):
    """Contiguous, equal blocks (pool, top-k and gather for all at once): the same keys,
    values, order and reported indices / pooled scores as the per-block path, bit for bit."""
    l, lq, hq, hk, d, budget, n, b = shape
    k, v, qq = _inputs(50 + n * l + 30, b, hq, hk, d, lq, dtype)
    bounds = [(50 + j * l, 50 + (j + 1) * l) for j in range(n)]
    with selection.record_selection() as events:
        got = selection.select_passing_blocks(k, v, bounds, qq, budget, 5, d ** -0.5, score,
                                              reports=[dict(block=j) for j in range(n)])
    assert len(got) == len(events) == n
    for j, ((lo, hi), g, e) in enumerate(zip(bounds, got, events)):
        ref, index, pooled = _one_block(k[lo:hi], v[lo:hi], qq, budget, 5, d ** -0.5, score)
        assert g.shape == (budget, b, hk, 2 * d) and g.is_contiguous()
        assert torch.equal(g, ref), (score, j)
        assert e["block"] == j and torch.equal(e["indices"], index) and torch.equal(e["scores"], pooled)
        assert torch.equal(e["keys"], k[lo:hi])


def _block_local(k_block, probes, scale):
    """A score that is not per key: each key's dot with the probes' mean, minus the block's
    mean of it (it depends on the whole block, so it must see the blocks one by one)."""
    s = selection.mean_scores(k_block, probes, scale)
    return s - s.mean(dim=-1, keepdim=True)


@pytest.mark.parametrize("case", ["together", "unequal", "gap"])
def test_every_block_is_scored_alone(case):
    """Scores are always one call per block (a score may depend on the whole block): with
    contiguous equal blocks (pool, top-k and gather together), unequal ones or a gap
    (each block alone), the result is the per-block path's."""
    k, v, qq = _inputs(900, 1, 8, 2, 16, 5)
    bounds = {"together": [(0, 300), (300, 600)], "unequal": [(0, 300), (300, 700)],
              "gap": [(0, 300), (310, 610)]}[case]
    calls = []
    with selection.registered_scorer("block_local", lambda *a: calls.append(a[0].shape[0]) or _block_local(*a)):
        got = selection.select_passing_blocks(k, v, bounds, qq, 64, 5, 0.25, "block_local")
        assert calls == [hi - lo for lo, hi in bounds]
        for (lo, hi), g in zip(bounds, got):
            assert torch.equal(g, _one_block(k[lo:hi], v[lo:hi], qq, 64, 5, 0.25, "block_local")[0])


def test_block_shorter_than_the_budget_is_a_clear_error():
    k, v, qq = _inputs(100, 1, 4, 2, 8, 3)
    with pytest.raises(ValueError, match="blocks of at least 64 keys"):
        selection.select_passing_blocks(k, v, [(0, 50), (50, 100)], qq, 64, 5, 0.3)


@pytest.mark.cuda
@pytest.mark.parametrize("score", ["lse", "mean"])
@pytest.mark.parametrize("l", [4032, 24000])  # torch's single-block and multi-block top-k
def test_blocks_together_on_cuda_are_the_per_block_result(score, l):
    """On the GPU (the fused lse kernel, cuBLAS for mean; top-k over 8 rows instead of 4):
    the same keys and values in the same order as the per-block path, bit for bit."""
    lq, hq, hk, d, budget = 512, 28, 4, 128, 256
    k, v, qq = _inputs(64 + 2 * l, 1, hq, hk, d, lq, torch.bfloat16, "cuda", seed=3)
    bounds = [(64, 64 + l), (64 + l, 64 + 2 * l)]
    with selection.record_selection() as events:
        got = selection.select_passing_blocks(k, v, bounds, qq, budget, 5, d ** -0.5, score,
                                              reports=[dict(block=0), dict(block=1)])
    for (lo, hi), g, e in zip(bounds, got, events):
        ref, index, pooled = _one_block(k[lo:hi], v[lo:hi], qq, budget, 5, d ** -0.5, score)
        assert torch.equal(e["scores"], pooled) and torch.equal(e["indices"], index)
        assert torch.equal(g, ref)
