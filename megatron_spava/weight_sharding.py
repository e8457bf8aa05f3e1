"""Inference weights sharded over the context-parallel group, gathered one layer at a time.

Under context parallelism every rank holds every weight (tensor parallelism aside): for a
7B model that is 15 GiB of each GPU, a floor under the memory a long prefill needs. With

    sharded = shard_parameters(model.language_model.decoder.layers, cp_group)

each rank keeps 1/W of every layer's parameters (one flat bf16 shard per layer). Just
before a layer runs, a forward pre-hook all-gathers its full parameters into one of two
rotating buffers and points the parameters at them; the next layer's gather is launched
at the same time, so it runs (on NCCL's stream) under this layer's compute. After the
layer, its parameters point at an empty tensor again. The result is bit-identical to the
unsharded model: the same values are gathered before use.

Costs: two layers' worth of buffers, one all-gather of a layer per layer and forward
(about 1/W of the layer's bytes in, per rank), also per decoded token. Inference only:
call after loading the weights; the parameters of a sharded module are empty between
forwards, so save or load checkpoints before sharding (or `unshard()` first).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import ceil_div
from .distributed import all_gather, group_rank_world


class ShardedParameters:
    """The hooks and shards of `shard_parameters`. `modules` run in list order."""

    def __init__(self, modules: Sequence[nn.Module], group: Optional[dist.ProcessGroup]):
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.modules = list(modules)
        self.layouts: List[List[Tuple[nn.Parameter, int, torch.Size]]] = []
        self.shards: List[torch.Tensor] = []
        size = 0
        for i, module in enumerate(self.modules):
            params = list(module.parameters())
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"shard_parameters: module {i} mixes parameter dtypes {dtypes}; "
                                 f"cast the model to one dtype first")
            total = sum(p.numel() for p in params)
            chunk = ceil_div(total, self.world)
            flat = params[0].new_zeros(chunk * self.world)
            layout, offset = [], 0
            for p in params:
                flat[offset:offset + p.numel()].copy_(p.data.flatten())
                layout.append((p, offset, p.shape))
                offset += p.numel()
            self.shards.append(flat[self.rank * chunk:(self.rank + 1) * chunk].clone())
            self.layouts.append(layout)
            size = max(size, flat.numel())
            del flat
            self._release(i)
        ref = self.shards[0]
        self.buffers = [ref.new_empty(size) for _ in range(min(2, len(self.modules)))]
        self.pending = {}
        self.handles = []
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, i=i: self._release(i)))

    def _launch(self, i: int) -> None:
        """Start gathering module i's parameters into its buffer (async)."""
        if i in self.pending:
            return
        shard = self.shards[i]
        out = self.buffers[i % len(self.buffers)][: shard.numel() * self.world]
        self.pending[i] = (out, all_gather(out, shard, self.group, self.world, async_op=True))

    def _before(self, i: int) -> None:
        self._launch(i)
        out, work = self.pending.pop(i)
        if work is not None:
            work.wait()
        for p, offset, shape in self.layouts[i]:
            p.data = out[offset:offset + shape.numel()].view(shape)
        if i + 1 < len(self.modules):
            self._launch(i + 1)  # overlaps this module's compute

    def _release(self, i: int) -> None:
        for p, _, _ in self.layouts[i]:
            p.data = p.data.new_empty(0)

    def unshard(self) -> None:
        """Restore full parameters on every rank (collective) and remove the hooks."""
        for h in self.handles:
            h.remove()
        for i, layout in enumerate(self.layouts):
            shard = self.shards[i]
            full = shard.new_empty(shard.numel() * self.world)
            all_gather(full, shard, self.group, self.world, async_op=False)
            for p, offset, shape in layout:
                p.data = full[offset:offset + shape.numel()].view(shape).clone()
        self.shards, self.buffers, self.pending = [], [], {}


def shard_parameters(modules: Sequence[nn.Module],
                     group: Optional[dist.ProcessGroup]) -> ShardedParameters:
    """Shard each module's parameters over `group` (every rank calls it, with the same
    modules holding the same values) and gather them per forward; see the module doc.
    modules: run once each, in this order, per forward (a transformer's layers)."""
    if not modules:
        raise ValueError("shard_parameters: no modules given")
    return ShardedParameters(modules, group)
