"""The multi-rank CPU harness: results in rank order, failures surface, nothing hangs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_spava.testing import RankFailure, run_ranks


def _all_reduce(x):
    t = torch.full((3,), float(dist.get_rank()) + x)
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise KeyError("only rank one fails")
    dist.barrier()  # the others wait for rank 1, which never comes


def _rank_one_dies():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _block_forever():
    if dist.get_rank() == 0:
        time.sleep(3600)
    dist.barrier()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_results_in_rank_order(world):
    results = run_ranks(_all_reduce, world, 0.5)
    expected = sum(range(world)) + 0.5 * world
    for rank, (r, w, t) in enumerate(results):
        assert (r, w) == (rank, world)
        assert torch.equal(t, torch.full((3,), expected))


def test_failure_surfaces_that_ranks_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_raise_on_rank_one, 3, timeout=30, grace=5)
    assert 1 in info.value.failures
    assert "KeyError: 'only rank one fails'" in info.value.failures[1]
    assert "_raise_on_rank_one" in info.value.failures[1]
    assert time.monotonic() - start < 30  # did not wait for the collective timeout


def test_dead_rank_is_reported():
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_one_dies, 2, timeout=20, grace=5)
    assert "exited with code 3" in info.value.failures[1]


def test_hung_collective_is_bounded():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_block_forever, 2, timeout=3, grace=2)
    assert time.monotonic() - start < 20
    assert set(info.value.failures) == {0, 1}  # 1 times out in barrier, 0 is stopped
    assert "still running" in info.value.failures[0]


def test_rejects_unimportable_functions():
    def local():
        return 1
    with pytest.raises(ValueError, match="module-level"):
        run_ranks(local, 2)
