"""Bad input raises one clear ValueError on every rank, before any collective, and
nothing hangs (the harness bounds every run)."""

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
from megatron_spava.testing import run_ranks

FREE = dict(budget_align=1, anchor_len=4)


def _qkv(layout, rank, hq=4, hk=2, d=8, batch=1):
    s = layout.local_len(rank)
    return torch.randn(s, batch, hq, d), torch.randn(s, batch, hk, d), torch.randn(s, batch, hk, d)


def _case(name):
    """Build the bad input `name` on this rank; return the ValueError's message."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    ok = SpavaLayout.plan(context_len=100, query_len=3, cp_size=world, config=SpavaConfig(**FREE))
    q, k, v = _qkv(ok, rank)
    try:
        if name == "short_context":
            SpavaLayout.plan(context_len=4 + 2 * world - 1, query_len=3, cp_size=world,
                             config=SpavaConfig(**FREE))
        elif name == "long_query":
            SpavaLayout.plan(context_len=100, query_len=65, cp_size=world,
                             config=SpavaConfig(max_query_len=64, **FREE))
        elif name == "gqa_heads":
            q, k, v = _qkv(ok, rank, hq=6, hk=4)
            spava_attn_func(q, k, v, layout=ok, cp_group=group)
        elif name == "qk_length":
            spava_attn_func(q, k[:-1], v[:-1], layout=ok, cp_group=group)
        elif name == "qk_batch":
            q2, _, _ = _qkv(ok, rank, batch=2)
            spava_attn_func(q2, k, v, layout=ok, cp_group=group)
        elif name == "kv_shape":
            spava_attn_func(q, k, v[..., :4], layout=ok, cp_group=group)
        elif name == "non_128_budget":
            SpavaConfig(passing_len=200)
        elif name == "wrong_world":
            other = SpavaLayout.plan(context_len=100, query_len=3, cp_size=world + 1,
                                     config=SpavaConfig(**FREE))
            spava_attn_func(*_qkv(other, rank), layout=other, cp_group=group)
        elif name == "wrong_local_len":
            spava_attn_func(q[1:], k[1:], v[1:], layout=ok, cp_group=group)
        elif name == "dtype":
            spava_attn_func(q.double(), k, v, layout=ok, cp_group=group)
        else:
            raise AssertionError(name)
    except ValueError as err:
        dist.barrier()  # every rank got here: no rank is stuck in a collective
        return str(err)
    return None


CASES = {
    "short_context": "context too short",
    "long_query": "more than max_query_len=64",
    "gqa_heads": r"query heads \(6\) must be a multiple of key/value heads \(4\)",
    "qk_length": "must agree in sequence, batch and head_dim",
    "qk_batch": "must agree in sequence, batch and head_dim",
    "kv_shape": "k and v must have the same shape",
    "non_128_budget": "passing_len=200 is not a multiple of budget_align=128",
    "wrong_world": "planned for cp_size=3 but the CP group has 2 ranks",
    "wrong_local_len": "holds .* tokens in this layout",
    "dtype": "must share dtype and device",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_the_same_value_error_on_every_rank(name):
    messages = run_ranks(_case, 2, name, timeout=30)
    assert messages[0] is not None
    assert __import__("re").search(CASES[name], messages[0]), messages[0]
    if name != "wrong_local_len":  # that message names the rank's own token count
        assert messages[0] == messages[1]
    else:
        assert messages[1] is not None


def _one_rank_bad(check):
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = SpavaLayout.plan(context_len=100, query_len=3, cp_size=world,
                              config=SpavaConfig(check_ranks_agree=check, **FREE))
    q, k, v = _qkv(layout, rank)
    if rank == 1:
        q = q[:, :, :3]  # 3 query heads over 2 KV heads, on rank 1 only
    try:
        spava_attn_func(q, k, v, layout=layout, cp_group=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return None


def test_check_ranks_agree_raises_everywhere_for_a_one_rank_error():
    messages = run_ranks(_one_rank_bad, 3, True, timeout=30)
    assert all(m is not None and "(rank 1)" in m and "query heads (3)" in m for m in messages)
    assert len(set(messages)) == 1


def _decode_without_begin_token(case):
    """A decode step whose cache bookkeeping is missing raises on every rank, before the
    gather of partials (so nothing hangs)."""
    from megatron_spava.inference import DistributedKVCache
    from megatron_spava.inference.decode import decode_attn_func
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = SpavaLayout.plan(context_len=100, query_len=3, cp_size=world, config=SpavaConfig(**FREE))
    q, k, v = _qkv(layout, rank)
    cache = DistributedKVCache(layout, rank, world, max_new_tokens=2)
    cache.store_prefill(1, k, v)
    one = (q[-1:], k[-1:], v[-1:])
    try:
        if case == "never_begun":
            decode_attn_func(*one, cache=cache, layer=1, cp_group=dist.group.WORLD)
        elif case == "second_step_not_begun":
            cache.begin_token()
            decode_attn_func(*one, cache=cache, layer=1, cp_group=dist.group.WORLD)
            decode_attn_func(*one, cache=cache, layer=1, cp_group=dist.group.WORLD)
        elif case == "full":
            for _ in range(2 * world + 1):
                cache.begin_token()
    except RuntimeError as err:
        dist.barrier()
        return str(err)
    return None


@pytest.mark.parametrize("case,match", [("never_begun", "without cache.begin_token()"),
                                        ("second_step_not_begun", "already appended in step 1"),
                                        ("full", "KV cache full")])
def test_decode_without_its_bookkeeping_raises_on_every_rank(case, match):
    messages = run_ranks(_decode_without_begin_token, 2, case, timeout=30)
    assert all(m is not None and __import__("re").search(match, m) for m in messages), messages
    assert messages[0] == messages[1]


def test_cache_snapshot_restore_and_step_sizes():
    from megatron_spava.inference import DistributedKVCache
    layout = SpavaLayout.plan(context_len=100, query_len=0, cp_size=1, config=SpavaConfig(**FREE))
    cache = DistributedKVCache(layout, 0, 1, max_new_tokens=8)
    k = torch.randn(100, 1, 2, 8)
    cache.store_prefill(1, k, k)
    state = cache.snapshot()
    cache.begin_tokens(3)
    with pytest.raises(RuntimeError, match="booked 3 token"):
        cache.append(1, k[:2], k[:2])
    cache.append(1, k[:3], k[:3])
    assert cache.kv(1)[0].shape[0] == 103 and cache.lengths == [103]
    cache.restore(state)
    assert cache.kv(1)[0].shape[0] == 100 and cache.lengths == [100]
    with pytest.raises(RuntimeError, match="without cache.begin_token"):
        cache.append(1, k[:1], k[:1])  # restore ends the step: begin a new one first
    with pytest.raises(ValueError, match="integer >= 1"):
        cache.begin_tokens(0)
