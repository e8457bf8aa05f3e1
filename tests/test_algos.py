"""The algorithms behind --context-parallel-algo, on gloo ranks, against float64 SDPA."""

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig
from megatron_spava.algos import ALGOS, FullLayout, RingLayout, config_for, cp_attn_func, plan_layout
from megatron_spava.algos.spava import SpavaLayout
from megatron_spava.testing import run_ranks
from megatron_spava.testing.reference import (full_attention, random_qkv, relative_error, spava_mask,
                                              star_mask)


def _algo_rank(algo, n, lq, batch, hq, hk, d, cfg, seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, batch, hq, hk, d, seed=seed)
    layout = plan_layout(algo, context_len=n, query_len=lq, cp_size=world, config=SpavaConfig(**cfg))
    idx = layout.local_indices(rank)
    return idx, cp_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)


def _run(algo, world, n, lq, batch=1, hq=4, hk=2, d=16, seed=0, **cfg):
    return run_ranks(_algo_rank, world, algo, n, lq, batch, hq, hk, d, cfg, seed, timeout=60)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n,lq", [(200, 5), (197, 1), (64, 0 + 3)])
def test_ring_is_exact_at_every_cp_size(world, n, lq):
    results = _run("ring", world, n, lq, batch=2, seed=world)
    q, k, v = random_qkv(n + lq, 2, 4, 2, 16, seed=world)
    ref = full_attention(q, k, v)
    covered = torch.cat([idx for idx, _ in results]).sort().values
    assert torch.equal(covered, torch.arange(n + lq))  # every token exactly once
    for idx, out in results:
        torch.testing.assert_close(out.double(), ref[idx], rtol=1e-5, atol=1e-5)


def test_ring_layout_is_zigzag_with_short_last_chunk():
    layout = RingLayout.plan(context_len=95, query_len=5, cp_size=3)
    assert layout.chunk_len == 17
    assert [layout.chunks_of(r) for r in range(3)] == [(0, 5), (1, 4), (2, 3)]
    assert layout.chunk_range(5) == (85, 100)
    with pytest.raises(ValueError, match="non-empty chunks"):
        RingLayout.plan(context_len=4, query_len=1, cp_size=3)


def test_full_is_exact_and_refuses_cp():
    (idx, out), = _run("full", 1, 120, 4)
    q, k, v = random_qkv(124, 1, 4, 2, 16, seed=0)
    torch.testing.assert_close(out.double(), full_attention(q, k, v)[idx], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without context parallelism"):
        plan_layout("full", context_len=100, query_len=2, cp_size=2)


def test_star_is_anchor_block_without_passing():
    n, lq, world = 600, 6, 3
    results = _run("star", world, n, lq, budget_align=1)
    layout = plan_layout("star", context_len=n, query_len=lq, cp_size=world,
                         config=SpavaConfig(budget_align=1))
    assert isinstance(layout, SpavaLayout) and layout.passing_len == 0
    assert layout.num_blocks == world
    assert abs(layout.anchor_len - layout.block_len) <= 1  # the anchor is a block
    q, k, v = random_qkv(n + lq, 1, 4, 2, 16, seed=0)
    ref = full_attention(q, k, v, mask=star_mask(layout))
    for idx, out in results:
        torch.testing.assert_close(out.double(), ref[idx], rtol=1e-5, atol=1e-5)


def test_apb_matches_its_dense_mask_oracle():
    n, lq, world = 900, 6, 3
    cfg = dict(anchor_len=30, budget_align=1, pool_kernel=1, passing_divisor=30)
    results = _run("apb", world, n, lq, **cfg)
    layout = plan_layout("apb", context_len=n, query_len=lq, cp_size=world, config=SpavaConfig(**cfg))
    assert (layout.config.zigzag, layout.config.overlap) == (False, False)
    assert layout.passing_len == 2 * (n // 30) and layout.passing_len < layout.block_len
    q, k, v = random_qkv(n + lq, 1, 4, 2, 16, seed=0)
    ref = full_attention(q, k, v, mask=spava_mask(layout, q, k))
    for idx, out in results:
        torch.testing.assert_close(out.double(), ref[idx], rtol=1e-5, atol=1e-5)
    assert relative_error(results[-1][1], full_attention(q, k, v)[results[-1][0]]) > 1e-3


def test_config_for_presets():
    base = SpavaConfig(passing_len=None, kernel="math")
    assert config_for("spava", base) == base
    star = config_for("star", base)
    assert (star.anchor_len, star.passing, star.zigzag, star.kernel) == ("block", False, False, "math")
    apb = config_for("apb", base)
    assert (apb.zigzag, apb.overlap, apb.passing_scale) == (False, False, 2)
    with pytest.raises(ValueError, match="unknown context-parallel algorithm"):
        config_for("ulysses")
    # ALGOS is the registry's names; "megatron" joins where Transformer Engine imports
    assert set(ALGOS) - {"megatron"} == {"full", "ring", "star", "apb", "spava"}
    assert isinstance(plan_layout("full", context_len=10, query_len=1, cp_size=1), FullLayout)
