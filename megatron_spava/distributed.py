"""Small distributed helpers shared by the CP attention algorithms: group rank/size,
an all-gather that returns its work handle, the ring's point-to-point exchange, the
all-reduce and broadcast of the first token, and input validation that raises the same
ValueError on every rank before any collective.

This module is the one seam where the algorithms, frame-parallel vision and weight sharding
issue collectives. Passing an `EmulatedGroup` as the group runs one rank of a W-rank
layout alone (`perf.emulate`, `megatron-spava-bench-prefill --emulate-rank R --emulate-cp W`):
every collective here becomes a local stand-in that moves no data between ranks but
returns tensors of the true shapes (an all-gather: W copies of the local tensor)."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class EmulatedGroup:
    """Rank `rank` of a `world`-rank group, run alone in one process (no process group).

    Passed wherever a CP group goes (cp_group=, `SpavaCoreAttention.cp_group`,
    `shard_weights`, `encode_video`): the helpers of this module then replace each
    collective by a local stand-in of the same shapes: all-gather -> `world` copies of the
    local tensor; ring exchange -> the rank's own buffer received back; all-reduce and
    broadcast -> the tensor unchanged; the ranks' agreement check -> skipped. Everything
    else (the rank's layout, its slice of the frames, its share of the weights) is that
    rank's. Values coming from other ranks are therefore not the real ones: only shapes
    and the work done are (for timing and FLOP counting, never for accuracy)."""

    def __init__(self, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"an emulated rank must satisfy 0 <= rank < world, got rank {rank} of {world}")
        self.rank, self.world = int(rank), int(world)

    def size(self) -> int:
        return self.world

    def __repr__(self) -> str:
        return f"EmulatedGroup(rank={self.rank}, world={self.world})"


def is_emulated(group) -> bool:
    """Whether `group` is an `EmulatedGroup` (one rank run alone)."""
    return isinstance(group, EmulatedGroup)


def group_rank_world(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(rank, size) in `group`; None means no context parallelism: (0, 1)."""
    if group is None:
        return 0, 1
    if is_emulated(group):
        return group.rank, group.world
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(output: torch.Tensor, local: torch.Tensor, group, world: int, async_op: bool):
    """Gather `local` from every rank into `output` (rank-major along dim 0). Returns a
    work handle to wait on, or None when nothing is left in flight. Emulated group: every
    rank's slot gets a copy of `local` (one copy kernel, no transfer)."""
    if world == 1:
        output.copy_(local)
        return None
    if is_emulated(group):
        output.view(world, *local.shape).copy_(local.unsqueeze(0).expand(world, *local.shape))
        return None
    work = _all_gather_single(output, local, group=group, async_op=async_op)
    return work if async_op else None


def ring_exchange(buf: torch.Tensor, group, rank: int, world: int) -> Callable[[], torch.Tensor]:
    """Send `buf` to the next rank of the ring (rank + 1) and receive the previous rank's
    buffer of the same shape, in flight while the caller computes. Returns `finish()`, which
    waits and returns the received tensor on buf's device. gloo cannot move CUDA tensors
    point to point (ranks sharing a GPU): the transfer is staged through host memory there
    (correctness runs only). Emulated group: the rank receives its own buffer (a copy)."""
    if is_emulated(group) or world == 1:
        received = buf.clone()
        return lambda: received
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    staged = buf.is_cuda and dist.get_backend(group) == "gloo"
    nxt = torch.empty_like(buf, device="cpu" if staged else None)
    ops = [dist.P2POp(dist.isend, buf.cpu() if staged else buf, send_to, group=group),
           dist.P2POp(dist.irecv, nxt, recv_from, group=group)]
    pending = dist.batch_isend_irecv(ops)

    def finish() -> torch.Tensor:
        for work in pending:
            work.wait()
        return nxt.to(buf.device) if staged else nxt
    return finish


def global_rank_world(group) -> Tuple[int, int]:
    """(this process's global rank, the world size), or an emulated group's (rank, world);
    (0, 1) without torch.distributed."""
    if is_emulated(group):
        return group.rank, group.world
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce(tensor: torch.Tensor, op: str, group=None) -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group` (None: the world), op "max" or "min";
    a no-op without torch.distributed and for an emulated group. Returns `tensor`."""
    if is_emulated(group) or not (dist.is_available() and dist.is_initialized()):
        return tensor
    dist.all_reduce(tensor, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op], group=group)
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast of `tensor` from global rank `src` over `group` (None: the world);
    a no-op without torch.distributed and for an emulated group. Returns `tensor`."""
    if is_emulated(group) or not (dist.is_available() and dist.is_initialized()):
        return tensor
    dist.broadcast(tensor, src, group=group)
    return tensor


def input_error(q, k, v, layout, rank: int, world: int) -> Optional[str]:
    """Why (q, k, v) cannot go through `layout` (any CP layout: it needs cp_size and
    local_len) on this rank, or None. Pure."""
    if world != layout.cp_size:
        return (f"the layout was planned for cp_size={layout.cp_size} but the CP group has "
                f"{world} ranks; plan it with cp_size={world}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [s, b, heads, head_dim], got " + (
                f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__)
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        return (f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in sequence, batch and "
                f"head_dim ([s, b, heads, head_dim])")
    if q.shape[2] % k.shape[2]:
        return (f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                f"({k.shape[2]}) for grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return (f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                f"{q.device}/{k.device}/{v.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return ("forward only: q, k or v requires grad and autograd is on, but the context-parallel "
                "collectives carry no gradients; run under torch.no_grad() or torch.inference_mode()")
    expected = layout.local_len(rank)
    if q.shape[0] != expected:
        return (f"rank {rank} holds {expected} tokens in this layout but q has {q.shape[0]}; "
                f"shard inputs with layout.local_indices(rank)")
    return None


def check_inputs(q, k, v, layout, group, *, collective: bool, caller: str) -> Tuple[int, int]:
    """Validate before any collective; raise ValueError naming `caller`. With
    `collective` (SpavaConfig.check_ranks_agree), every rank learns the first rank's error,
    and the ranks also compare a hash of their layouts' plans and of their inputs' shapes
    (`plan_summary`): a rank that planned another layout, or passes inputs of another batch,
    head count or dtype, raises on every rank, named. Returns (rank, world)."""
    if group is None and getattr(layout, "cp_size", 1) > 1:
        missing = "" if dist.is_available() and dist.is_initialized() else "torch.distributed is not initialised and "
        raise ValueError(f"{caller}: {missing}cp_group is None (a single rank), but the layout was planned for "
                         f"cp_size={layout.cp_size}: initialise a process group "
                         f"(torch.distributed.init_process_group, one process per rank) and pass its "
                         f"context-parallel group as cp_group")
    rank, world = group_rank_world(group)
    error = input_error(q, k, v, layout, rank, world)
    if collective:
        error = _agree_on_error(error, None if error else plan_summary(layout, q, k, v), group, world)
    if error:
        raise ValueError(f"{caller}: {error}")
    return rank, world


def plan_summary(layout, q, k, v) -> dict:
    """What every rank of a CP group must agree on, as strings: the layout's plan (its class
    and every field: sizes, budgets, the SpavaConfig) and the inputs' shapes but for their
    local sequence length, and their dtype. Pure."""
    import dataclasses
    out = {"layout": type(layout).__name__}
    if dataclasses.is_dataclass(layout):
        out.update({f.name: repr(getattr(layout, f.name)) for f in dataclasses.fields(layout)})
    else:
        out["plan"] = repr(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        out[f"{name} shape [b, heads, head_dim]"] = repr(tuple(t.shape[1:]))
    out["dtype"] = str(q.dtype)
    return out


def plan_hash(summary: dict) -> str:
    """A short hash of a `plan_summary`."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:12]


def _agree_on_error(error: Optional[str], summary: Optional[dict], group, world: int) -> Optional[str]:
    """The first rank's error, seen by every rank; else, if the ranks' plan summaries differ,
    an error naming the first rank whose plan differs from rank 0's and how (one
    all_gather_object of the error and the summary with its hash)."""
    if world == 1 or is_emulated(group):
        return error
    gathered: List = [None] * world
    mine = (error, summary, plan_hash(summary) if summary is not None else None)
    dist.all_gather_object(gathered, mine, group=group)
    first = next(((r, e) for r, (e, _, _) in enumerate(gathered) if e), None)
    if first:
        return f"(rank {first[0]}) {first[1]}"
    base_summary, base_hash = gathered[0][1], gathered[0][2]
    for r, (_, other, other_hash) in enumerate(gathered):
        if other_hash != base_hash:
            diffs = [f"{key} {other.get(key)} vs {base_summary.get(key)}"
                     for key in sorted(set(other) | set(base_summary)) if other.get(key) != base_summary.get(key)]
            return (f"(rank {r}) its layout or inputs differ from rank 0's (plan hash {other_hash} vs "
                    f"{base_hash}): {'; '.join(diffs[:3])}; every rank of the CP group must plan the same "
                    f"layout and pass inputs of the same shapes and dtype")
    return None


def gather_partials(partial, group, world: int, async_op: bool):
    """All-gather an attention partial (out [s, b, h, d], lse [s, b, h]) from every rank,
    packed with its LSE in one float32 buffer. Returns (buffer, work or None); finish with
    `merge_gathered` after the work completes."""
    out, lse = partial
    packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1)  # [s, b, h, d + 1]
    gathered = packed.new_empty(world * packed.shape[0], *packed.shape[1:])
    return gathered, all_gather(gathered, packed, group, world, async_op=async_op)


def merge_gathered(gathered: torch.Tensor, world: int, with_lse: bool = False, *,
                   out: Optional[torch.Tensor] = None, impl: str = "torch"):
    """Merge the partials of `gather_partials` by LSE (`ops.attention.merge_partials` with
    impl): out [s, b, h, d], float32 or, given `out`, written into it in its dtype
    (with_lse: (out, lse [s, b, h] float32))."""
    from .ops.attention import merge_partials

    parts = gathered.view(world, -1, *gathered.shape[1:])
    merged = merge_partials([(p[..., :-1], p[..., -1]) for p in parts], out=out, impl=impl)
    return merged if with_lse else merged[0]
