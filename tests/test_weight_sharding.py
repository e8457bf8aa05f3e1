"""Weights sharded over a process group and gathered per module (weight_sharding.py), on
gloo ranks, against the same modules run unsharded in plain PyTorch."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_spava.testing import run_ranks
from megatron_spava.weight_sharding import shard_parameters


def _layers(seed):
    torch.manual_seed(seed)  # the same weights on every rank
    # odd sizes: parameter totals that do not divide by the world size (padding)
    return nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _sharded_rank(passes):
    model = _layers(0)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    modules = [model[0], model[2], model[3], model[4]]
    sharded = shard_parameters(modules, dist.group.WORLD)
    emptied = all(p.numel() == 0 for m in modules for p in m.parameters())
    outs = [model(x) for _ in range(passes)]  # every pass re-gathers
    emptied_after = all(p.numel() == 0 for m in modules for p in m.parameters())
    kept = sum(t.numel() for t in sharded.shards)
    sharded.unshard()
    restored = model(x)
    return outs, restored, emptied, emptied_after, kept


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_forward_equals_unsharded_and_frees_weights(world):
    ref = _layers(0)(torch.randn(4, 7, generator=torch.Generator().manual_seed(1)))
    total = sum(p.numel() for p in _layers(0).parameters())
    for outs, restored, emptied, emptied_after, kept in run_ranks(_sharded_rank, world, 3):
        for out in outs + [restored]:
            assert torch.equal(out, ref)  # the same values gathered before use: bit-identical
        assert emptied and emptied_after
        assert kept < total / world + 4 * world  # each rank keeps ~1/W (+ padding)


def test_mixed_dtypes_are_refused():
    module = nn.Linear(3, 3)
    module.bias.data = module.bias.data.double()
    with pytest.raises(ValueError, match="mixes parameter dtypes"):
        shard_parameters([module], None)
    with pytest.raises(ValueError, match="no modules"):
        shard_parameters([], None)
