"""SpavaLayout and SpavaConfig: placement, coverage, defaults, limits (SPAVA.md 1 and 6)."""

import pytest
import torch

from megatron_spava import SpavaConfig, SpavaLayout
from megatron_spava.config import round_up

FREE = dict(budget_align=1)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("n,lq,anchor", [(1000, 7, 13), (997, 1, 0), (4096, 33, None), (130, 2, 3)])
def test_local_indices_cover_every_position_once(world, zigzag, n, lq, anchor):
    cfg = SpavaConfig(anchor_len=anchor, zigzag=zigzag, **FREE)
    layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=cfg)
    la = layout.anchor_len
    replicated = set(range(la)) | set(range(n, n + lq))
    counts = torch.zeros(n + lq, dtype=torch.long)
    for rank in range(world):
        idx = layout.local_indices(rank)
        assert idx.dtype == torch.long and idx.numel() == layout.local_len(rank)
        # every rank holds A first and Q last, in order
        assert idx[:la].tolist() == list(range(la))
        assert idx[-lq:].tolist() == list(range(n, n + lq))
        counts.index_add_(0, idx, torch.ones_like(idx))
    for pos in range(n + lq):
        assert counts[pos] == (world if pos in replicated else 1), pos


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zigzag_places_block_v_on_rank_min_v_mirror(world):
    layout = SpavaLayout.plan(context_len=64 * world + 50, query_len=3, cp_size=world,
                              config=SpavaConfig(anchor_len=10, **FREE))
    holder = {}
    for rank in range(world):
        blocks = layout.blocks_of(rank)
        assert blocks == (rank, 2 * world - 1 - rank)
        idx = layout.local_indices(rank)
        for v in blocks:
            lo, hi = layout.block_range(v)
            holder[v] = rank
            assert set(range(lo, hi)) <= set(idx.tolist())
    for v in range(2 * world):
        assert holder[v] == min(v, 2 * world - 1 - v) == layout.rank_of_block(v)


def test_blocks_are_contiguous_ceil_sized_last_short():
    layout = SpavaLayout.plan(context_len=1000, query_len=5, cp_size=3,
                              config=SpavaConfig(anchor_len=13, **FREE))
    rest = 1000 - 13
    assert layout.block_len == -(-rest // 6) == 165
    ends = [layout.block_range(v) for v in range(6)]
    assert ends[0][0] == 13 and ends[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    assert [hi - lo for lo, hi in ends] == [165] * 5 + [rest - 5 * 165]


def test_without_zigzag_one_block_per_rank():
    layout = SpavaLayout.plan(context_len=500, query_len=4, cp_size=4,
                              config=SpavaConfig(anchor_len=20, zigzag=False, **FREE))
    assert layout.num_blocks == 4
    for rank in range(4):
        assert layout.blocks_of(rank) == (rank,)
        lo, hi = layout.block_range(rank)
        assert layout.local_indices(rank)[20:-4].tolist() == list(range(lo, hi))


@pytest.mark.parametrize("n", [300, 8191, 8192, 100_000, 1_000_000])
def test_default_budgets_match_reference(n):
    layout = SpavaLayout.plan(context_len=n, query_len=10, cp_size=2)
    anchor = min(round_up(n // 64, 128), n)
    assert layout.anchor_len == anchor
    block = -(-(n - anchor) // 4)
    assert layout.block_len == block
    assert layout.passing_len == min(round_up(n // 128, 128), block)
    cfg = SpavaConfig()
    assert (cfg.pool_kernel, cfg.anchor_divisor, cfg.passing_divisor) == (5, 64, 128)


def test_passing_off_has_zero_budget():
    layout = SpavaLayout.plan(context_len=5000, query_len=1, cp_size=2,
                              config=SpavaConfig(passing=False))
    assert layout.passing_len == 0


@pytest.mark.parametrize("world,expected", [(1, [(0, 10)]), (3, [(0, 4), (4, 8), (8, 10)]),
                                            (4, [(0, 3), (3, 6), (6, 9), (9, 10)])])
def test_anchor_shards(world, expected):
    layout = SpavaLayout.plan(context_len=200, query_len=1, cp_size=world,
                              config=SpavaConfig(anchor_len=10, **FREE))
    assert [layout.anchor_shard(r) for r in range(world)] == expected
    unsharded = SpavaLayout.plan(context_len=200, query_len=1, cp_size=world,
                                 config=SpavaConfig(anchor_len=10, shard_anchor=False, **FREE))
    assert [unsharded.anchor_shard(r) for r in range(world)] == [(0, 10)] + [(0, 0)] * (world - 1)


def test_plan_is_pure_and_equal_across_calls():
    a = SpavaLayout.plan(context_len=12345, query_len=17, cp_size=4)
    b = SpavaLayout.plan(context_len=12345, query_len=17, cp_size=4)
    assert a == b
    assert all(torch.equal(a.local_indices(r), b.local_indices(r)) for r in range(4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(context_len=10, query_len=1, cp_size=2, config=SpavaConfig(anchor_len=8, **FREE)),
     "context too short"),
    (dict(context_len=130, query_len=1, cp_size=2), "context too short"),  # default anchor 128
    (dict(context_len=5, query_len=1, cp_size=2, config=SpavaConfig(anchor_len=0, **FREE)),
     "last block empty"),
    (dict(context_len=100, query_len=9000, cp_size=2), "max_query_len"),
    # query_len=0 is a context-only pass (fuse_query=False); negative is still refused
    (dict(context_len=100, query_len=-1, cp_size=2), "query_len must be an integer >= 0"),
    (dict(context_len=100, query_len=True, cp_size=2), "query_len must be an integer >= 0"),
    (dict(context_len=100, query_len=0, cp_size=2, config=SpavaConfig(anchor_len=0, passing_len=8, **FREE)),
     "anchor_len=0 leaves none"),  # a context-only pass needs anchor tokens to probe with
    (dict(context_len=300, query_len=4, cp_size=2, config=SpavaConfig(fuse_query=False)),
     "plan it with query_len=0"),  # the query is not part of an unfused prefill
    (dict(context_len=100, query_len=1, cp_size=0), "cp_size must be an integer >= 1"),
    (dict(context_len=100, query_len=1, cp_size=2, config=SpavaConfig(anchor_len=200, **FREE)),
     "longer than the context"),
])
def test_plan_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpavaLayout.plan(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(passing_len=100), "not a multiple of budget_align=128"),
    (dict(anchor_len=300), "not a multiple of budget_align=128"),
    (dict(passing_len=-128), "integer >= 0"),
    (dict(pool_kernel=4), "must be odd"),
    (dict(pool_kernel=0), "integer >= 1"),
    (dict(kernel="fast"), "kernel must be one of"),
    (dict(zigzag=1), "must be a bool"),
    (dict(budget_align=0), "integer >= 1"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpavaConfig(**kwargs)


def test_config_accepts_aligned_budgets_and_replace_validates():
    cfg = SpavaConfig(anchor_len=256, passing_len=384)
    assert cfg.replace(passing_len=0).passing_len == 0
    with pytest.raises(ValueError):
        cfg.replace(passing_len=5)
