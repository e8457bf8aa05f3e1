"""`megatron`: Megatron's own context parallelism, i.e. Transformer Engine's CP attention
(`TEDotProductAttention` with `--cp-comm-type p2p | a2a | all_gather | a2a+p2p`), as the
baseline a Megatron user would otherwise pick. Exact.

Layout (Megatron's sharding, `megatron.core.utils.get_batch_on_this_cp_rank`): the whole
prompt, S = n + l_q tokens, is cut into 2W equal chunks and rank r keeps chunks r and
2W-1-r. S must be divisible by 2W (TE's requirement as well). Every rank owns all its rows
(nothing is replicated) and caches all of them.

    layout = MegatronLayout.plan(context_len=n, query_len=lq, cp_size=W)
    spec = get_gpt_layer_spec("te", core_attention=megatron_core_attention("p2p"))

The core attention is megatron-core's `TEDotProductAttention` (so TE's own kernels and
its own CP communication run the prefill over `pg_collection.cp`, q/k/v in sbhd, causal,
GQA native); a decode step attends the new token over megatron_spava's distributed KV
cache (`inference.decode_attn_func`), so `generate` works with it. Needs Transformer
Engine; `megatron_core_attention` raises ImportError without it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

from ..config import SpavaConfig
from ..perf.work import Call, Comm, LayerRequest, LayerWork, Op, Shape, dense_split
from .base import Algorithm, Layout, check_lengths, zigzag_pair

NAME = "megatron"
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


@dataclass(frozen=True)
class MegatronLayout(Layout):
    """Megatron's 2W-chunk layout of the whole prompt. context_len: n; query_len: l_q;
    cp_size: W; chunk_len: S / 2W (S at W = 1). config: only its `kernel` (decode) is used.
    Every token is held by exactly one rank."""

    chunk_len: int
    default_algo = NAME

    @classmethod
    def plan(cls, *, context_len: int, query_len: int, cp_size: int,
             config: Optional[SpavaConfig] = None) -> "MegatronLayout":
        """Plan the layout; ValueError unless S = context_len + query_len is divisible by
        2 * cp_size (at cp_size 1 any S: the layout is the identity)."""
        config = check_lengths("megatron layout", context_len, query_len, cp_size, config)
        total = context_len + query_len
        chunks = 2 * cp_size
        if cp_size > 1 and total % chunks:
            raise ValueError(
                f"megatron layout: {total} tokens are not divisible by 2 x context-parallel size = "
                f"{chunks}; Megatron's context parallelism (Transformer Engine) cuts the sequence "
                f"into {chunks} equal chunks. Pad the prompt to a multiple of {chunks} tokens, or use "
                f"--context-parallel-algo ring, which takes any length")
        return cls(context_len, query_len, cp_size, total // chunks if cp_size > 1 else total,
                   config=config)

    def chunk_range(self, c: int) -> Tuple[int, int]:
        """Global [start, end) of chunk c (of 2W; at W = 1 the two halves of one range)."""
        if self.cp_size == 1:
            return (0, self.total_len) if c == 0 else (self.total_len, self.total_len)
        return c * self.chunk_len, (c + 1) * self.chunk_len

    def chunks_of(self, rank: int) -> Tuple[int, int]:
        self.check_rank(rank)
        return zigzag_pair(rank, self.cp_size)

    def local_len(self, rank: int) -> int:
        self.check_rank(rank)
        return self.total_len // self.cp_size

    def local_indices(self, rank: int) -> torch.Tensor:
        """LongTensor [local_len(rank)]: global positions of chunks r and 2W-1-r."""
        return torch.cat([torch.arange(*self.chunk_range(c)) for c in self.chunks_of(rank)])

    def owned_rows(self, rank: int) -> torch.Tensor:
        """Bool [local_len(rank)]: all rows (nothing is replicated)."""
        return torch.ones(self.local_len(rank), dtype=torch.bool)


def plan(*, context_len: int, query_len: int, cp_size: int,
         config: Optional[SpavaConfig] = None) -> MegatronLayout:
    """The registry's planning function for `megatron`."""
    return MegatronLayout.plan(context_len=context_len, query_len=query_len, cp_size=cp_size,
                               config=config)


def _require_te() -> None:
    from ..specs import te_available
    if not te_available():
        raise ImportError(
            "--context-parallel-algo megatron is Transformer Engine's context parallelism "
            "(TEDotProductAttention); it needs the transformer_engine package on a CUDA machine, "
            "which does not import here. Use ring for exact context parallelism without TE")


def megatron_core_attention(cp_comm_type: Optional[str] = None):
    """The core-attention class for Megatron's spec that runs `--context-parallel-algo
    megatron` with TE's `cp_comm_type` (None: whatever megatron-core passes, i.e.
    TransformerConfig.cp_comm_type, default p2p). Pass it as
    `get_gpt_layer_spec(..., core_attention=...)`. ImportError without TE."""
    if cp_comm_type is not None and cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}, got {cp_comm_type!r}")
    _require_te()
    return _core_attention_class(cp_comm_type)


def core_attention_for(algo: str, cp_comm_type: Optional[str] = None):
    """The core-attention class a model needs for `algo` with `--cp-comm-type`: the
    registry entry's module (for "megatron", fixed to `cp_comm_type`), or None (the default,
    SpavaCoreAttention) for algorithms that are attention functions."""
    if algo is None:  # megatron-core's stock layers
        return None
    if algo == NAME:
        return megatron_core_attention(cp_comm_type)  # ImportError without TE
    from .registry import get
    return get(algo).core_attention


@functools.lru_cache(maxsize=None)
def _core_attention_class(fixed_comm: Optional[str]):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from .. import profiling
    from ..context import current_request
    from ..inference.decode import decode_attn_func
    from ..modules import check_normalization

    class MegatronCoreAttention(TEDotProductAttention):
        """megatron-core's TEDotProductAttention with TE's context parallelism over
        `pg_collection.cp` for prefill and the distributed KV cache for decode.

        forward: query [s_local, b, np/tp, hn], key/value [s_local, b, ng/tp, hn]
        (post-RoPE, in Megatron's layout: chunks r and 2W-1-r) -> [s_local, b, np/tp * hn].
        Without an active request it is TEDotProductAttention as megatron-core uses it
        (inputs sharded by Megatron's get_batch_on_this_cp_rank). Under a request its
        layout must be a MegatronLayout; with a KV cache the prefill stores this rank's
        K/V; a decode request attends one new token over the whole distributed cache.
        """

        CP_COMM_TYPE = fixed_comm

        def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                     attention_type: str, attention_dropout: Optional[float] = None,
                     softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                     v_channels: Optional[int] = None, num_splits: Optional[int] = None,
                     cp_comm_type: Optional[str] = "p2p", pg_collection=None,
                     expected_normalization: Optional[str] = None):
            check_normalization(config, expected_normalization)
            comm = fixed_comm or cp_comm_type or "p2p"
            if comm not in CP_COMM_TYPES:
                raise ValueError(f"cp_comm_type must be one of {CP_COMM_TYPES}, got {comm!r}")
            if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
                raise ValueError(f"the megatron algorithm is causal self-attention; got {attn_mask_type}")
            if attention_type != "self":
                raise ValueError(f"the megatron algorithm supports self-attention only, got {attention_type!r}")
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
            cp = pg_collection.cp
            cp_size = cp.size() if cp is not None else 1
            if cp_size != config.context_parallel_size:
                raise ValueError(f"TransformerConfig.context_parallel_size={config.context_parallel_size} "
                                 f"but the context-parallel group has {cp_size} ranks")
            tp = config.tensor_model_parallel_size
            heads, groups = config.num_attention_heads // tp, max(1, config.num_query_groups // tp)
            if comm in ("a2a", "a2a+p2p") and cp_size > 1:
                a2a = cp_size
                if comm == "a2a+p2p":
                    from megatron.core import parallel_state
                    hcp = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
                    if not hcp:
                        raise ValueError("--cp-comm-type a2a+p2p needs hierarchical context-parallel "
                                         "groups: initialize_model_parallel(..., "
                                         "hierarchical_context_parallel_sizes=[a2a, p2p])")
                    a2a = hcp[0].size()
                if heads % a2a or groups % a2a:
                    raise ValueError(f"--cp-comm-type {comm}: the {heads} attention heads and {groups} "
                                     f"KV groups per tensor-parallel rank must both divide by the "
                                     f"all-to-all size {a2a}")
            super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                             attention_type=attention_type, attention_dropout=attention_dropout,
                             softmax_scale=softmax_scale, k_channels=k_channels,
                             v_channels=v_channels, num_splits=num_splits, cp_comm_type=comm,
                             pg_collection=pg_collection)
            self.spava_cp_group = cp
            self.spava_layer = max(1, layer_number)
            self.spava_scale = (softmax_scale if softmax_scale is not None
                                else 1.0 / math.sqrt(k_channels or config.kv_channels))
            self.spava_comm = comm

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, num_splits=None):
            """query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]."""
            request = current_request()
            mask_type = attn_mask_type if attn_mask_type is not None else AttnMaskType.causal
            with profiling.region("attention", query):
                if request is None:
                    return super().forward(query, key, value, attention_mask, mask_type,
                                           attention_bias, packed_seq_params, num_splits)
                layout = request.layout
                if layout.algo != NAME:
                    raise ValueError(
                        f"this model's core attention is Megatron's own context parallelism "
                        f"(--context-parallel-algo megatron), but the request's layout was "
                        f"planned for {layout.algo!r}; build the model with the default core "
                        f"attention for other algorithms")
                cp = self.spava_cp_group
                world = cp.size() if cp is not None else 1
                if layout.cp_size != world:
                    raise ValueError(f"layout planned for cp_size={layout.cp_size}, but the "
                                     f"context-parallel group has {world} ranks")
                if request.decode:
                    out = decode_attn_func(query, key, value, cache=request.cache,
                                           layer=self.spava_layer, cp_group=cp if world > 1 else None,
                                           softmax_scale=self.spava_scale, kernel=layout.config.kernel)
                    return out.reshape(out.shape[0], out.shape[1], -1)
                rank = cp.rank() if world > 1 else 0
                if query.shape[0] != layout.local_len(rank):
                    raise ValueError(f"rank {rank} got {query.shape[0]} tokens; the megatron layout "
                                     f"gives it {layout.local_len(rank)}")
                out = super().forward(query, key, value, None, AttnMaskType.causal,
                                      attention_bias, packed_seq_params, num_splits)
                if request.cache is not None:
                    request.cache.store_prefill(self.spava_layer, key, value)
                return out

    return MegatronCoreAttention


# ---- cost (the roofline's and the scaling model's; needs no Transformer Engine) -----------

def a2a_ops(S: int, W: int, r: int, shape: Shape, tp: int, group: List[int],
            weights: Optional[Comm]) -> List[Op]:
    """Ulysses all-to-all (Transformer Engine's cp_comm_type "a2a"): Q, K, V all-to-all'd from
    sequence shards to head shards, full causal attention over S on H/W heads, the output
    all-to-all'd back. Local tokens S/W (zigzag chunks; the count is what matters)."""
    me, d = group[r], shape.head_dim
    local = -(-S // W)
    pre = dense_split(shape)
    per_peer_qkv = int(local / W * (shape.heads + 2 * shape.kv_heads) / tp * d * shape.act_bytes)
    per_peer_o = int(local / W * shape.heads / tp * d * shape.act_bytes)
    ops = [Op(comm=weights)] if weights is not None else []
    n = 1 if weights is not None else 0
    ops += [Op(dense=pre * local, gemm_rows=local),
            Op(comm=Comm("all_to_all", group, per_peer_qkv, me, name="a2a_qkv")),
            Op(wait=n), Op(calls=[Call(S, S, True, 1.0 / (W * tp))]),
            Op(comm=Comm("all_to_all", group, per_peer_o, me, name="a2a_out")), Op(wait=n + 1),
            Op(dense=(1 - pre) * local, gemm_rows=local)]
    return ops


def allgather_ops(layout: RingLayout, r: int, shape: Shape, tp: int, group: List[int],
                  weights: Optional[Comm]) -> List[Op]:
    """Transformer Engine's cp_comm_type "all_gather": every rank's K/V all-gathered (one
    collective, waited before attention), then each local chunk attends to the keys before it."""
    W = layout.cp_size
    me, d, hf = group[r], shape.head_dim, 1.0 / tp
    hk = shape.kv_heads / tp
    local = layout.local_len(r)
    pre = dense_split(shape)
    ops = [Op(comm=weights)] if weights is not None else []
    n = 1 if weights is not None else 0
    ops.append(Op(dense=pre * local, gemm_rows=local))
    ops.append(Op(comm=Comm("all_gather", group, int(2 * layout.chunk_len * hk * 2 * d * shape.act_bytes), me,
                            name="kv_all_gather")))
    ops.append(Op(wait=n))
    calls = []
    for c in layout.chunks_of(r):
        lo, hi = layout.chunk_range(c)
        calls += [Call(hi - lo, lo, False, hf), Call(hi - lo, hi - lo, True, hf)]
    ops.append(Op(calls=[c for c in calls if c.keys], merged=local * shape.heads * hf * d * 2))
    ops.append(Op(dense=(1 - pre) * local, gemm_rows=local))
    return ops


def a2a_feasible(shape: Shape, size: int) -> bool:
    """Ulysses splits heads over the group: query heads divisible, KV heads divisible (or
    replicated: size a multiple of them)."""
    return shape.heads % size == 0 and (shape.kv_heads % size == 0 or size % shape.kv_heads == 0)


def megatron_cost(req: LayerRequest) -> LayerWork:
    """`Algorithm.cost` of megatron, per `--cp-comm-type` (req.option): p2p, TE's ring (the
    ring's chunks and bytes, its output corrections taken as free: TE fuses them); a2a,
    Ulysses; a2a+p2p, all-to-all inside groups of up to 8 ranks, ring across them;
    all_gather (or allgather), K/V all-gathered. Exact: at CP size 1, full attention."""
    from .full import full_cost
    from .ring import RingLayout, ring_ops
    comm = {"allgather": "all_gather", None: "p2p"}.get(req.option, req.option)
    if comm not in CP_COMM_TYPES:
        raise ValueError(f"megatron: unknown --cp-comm-type {req.option!r}; choose from {CP_COMM_TYPES}")
    if req.cp == 1:
        return full_cost(req)
    cp, tp, shape, S = req.cp, req.tp, req.shape, req.tokens
    group, w, weights = list(req.group), req.weights_of, req.weights
    context, query = req.context, req.query
    layout = None
    if comm in ("p2p", "all_gather"):
        layout = RingLayout.plan(context_len=context, query_len=query, cp_size=cp)
        local = tuple(layout.local_len(r) for r in range(cp))
        if comm == "p2p":
            ops = [[replace(o, merged=0.0) for o in ring_ops(layout, r, shape, tp, group, w(r))] for r in range(cp)]
        else:
            ops = [allgather_ops(layout, r, shape, tp, group, w(r)) for r in range(cp)]
        return LayerWork(layout, local, ops)
    if comm == "a2a":
        if not a2a_feasible(shape, cp):
            raise ValueError(f"megatron-a2a needs {shape.heads} query and {shape.kv_heads} KV heads "
                             f"split over CP={cp}")
        ops = [a2a_ops(S, cp, r, shape, tp, group, w(r)) for r in range(cp)]
        return LayerWork(None, tuple(-(-S // cp) for _ in range(cp)), ops)
    ops = []
    a = max(s for s in range(1, min(cp, 8) + 1) if cp % s == 0 and a2a_feasible(shape, s))
    inner = cp // a  # a2a inside groups of `a` consecutive CP ranks, ring over `inner` groups
    layout = RingLayout.plan(context_len=context, query_len=query, cp_size=inner) if inner > 1 else None
    local = tuple(-(-S // cp) for _ in range(cp))
    for r in range(cp):
        sub, pos = r // a, r % a
        a2a_group = group[sub * a:(sub + 1) * a]
        ring_group = [group[g * a + pos] for g in range(inner)]
        me = group[r]
        per_peer_qkv = int(local[r] / a * (shape.heads + 2 * shape.kv_heads) / tp * shape.head_dim * shape.act_bytes)
        per_peer_o = int(local[r] / a * shape.heads / tp * shape.head_dim * shape.act_bytes)
        head = [Op(comm=w(r))] if weights is not None else []
        n0 = len(head)
        body = [Op(dense=dense_split(shape) * local[r], gemm_rows=local[r]),
                Op(comm=Comm("all_to_all", a2a_group, per_peer_qkv, me, name="a2a_qkv")), Op(wait=n0)]
        if layout is not None:
            inner_ops = ring_ops(layout, sub, shape, tp, ring_group, None, heads_frac=1.0 / a, name="kv")
            for o in inner_ops[1:-1]:  # drop the ring's own dense ops; renumber its comms
                if o.wait is not None:
                    o = replace(o, wait=o.wait + n0 + 1)
                body.append(o)
        else:
            body.append(Op(calls=[Call(S, S, True, 1.0 / (a * tp))]))
        n_comm = sum(1 for o in head + body if o.comm is not None)
        body += [Op(comm=Comm("all_to_all", a2a_group, per_peer_o, me, name="a2a_out")),
                 Op(wait=n_comm), Op(dense=(1 - dense_split(shape)) * local[r], gemm_rows=local[r])]
        ops.append(head + body)
    return LayerWork(layout, local, ops)


COST = megatron_cost  # the registry reads it even where ALGORITHM cannot be built (no TE)
#: Its benchmark variants megatron-<cp-comm-type>, named even where ALGORITHM cannot be built
OPTIONS = CP_COMM_TYPES
PROMPT_MULTIPLE = 2  # TE cuts the prompt into 2 x CP chunks (MegatronLayout)


@functools.lru_cache(maxsize=1)
def _algorithm() -> Algorithm:
    _require_te()
    return Algorithm(
        NAME, "Megatron's own context parallelism: Transformer Engine's CP attention "
        "(TEDotProductAttention, --cp-comm-type p2p|a2a|all_gather|a2a+p2p), exact; needs TE",
        MegatronLayout, core_attention=_core_attention_class(None), exact=True, cost=megatron_cost,
        options=OPTIONS, prompt_multiple=PROMPT_MULTIPLE,
        bench_options=CP_COMM_TYPES[:3])  # a2a+p2p needs hierarchical CP groups: asked for by name


def __getattr__(name: str):
    """`ALGORITHM`, the registry entry, is built on first access and raises ImportError
    where Transformer Engine does not import (the registry then lists `megatron` as
    unavailable, with the reason); the layout stays importable everywhere."""
    if name == "ALGORITHM":
        return _algorithm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ALGORITHM", "COST", "CP_COMM_TYPES", "MegatronLayout", "NAME", "OPTIONS", "PROMPT_MULTIPLE",
           "core_attention_for", "megatron_core_attention", "plan"]
