"""The interface every context-parallel algorithm meets: one layout class, one registry entry.

A **layout** says which global tokens each CP rank holds and in which local order. It is
planned once per request and is pure: the same (n, l_q, W, config) gives the same layout
on every rank, with no collective. Global positions index the prompt
`[context (n tokens) | query (l_q tokens)]`; l_q = 0 is a context-only pass (the first
pass of `fuse_query=False`, or a context prefilled once for several questions).

A new algorithm writes a frozen dataclass deriving from `Layout` with two methods::

    @dataclass(frozen=True)
    class MyLayout(Layout):
        @classmethod
        def plan(cls, *, context_len, query_len, cp_size, config=None) -> "MyLayout": ...
        def local_indices(self, rank) -> torch.Tensor: ...     # LongTensor [local_len(rank)]

and inherits the rest, built on `local_indices` (override for speed or another rule):

    local_len(rank)    rows of rank's local sequence
    owned_rows(rank)   bool [local_len]: rows whose loss this rank counts; a token held by
                       several ranks (replicated) is owned by the lowest of them
    cache_rows(rank)   LongTensor: local rows kept in the KV cache after prefill (default:
                       the owned rows), so that every token is cached on exactly one rank

An **Algorithm** is its registry entry (`megatron_spava.algos.registry`): a name, a help
line, the layout class, and either an attention function
`(q, k, v, *, layout, cp_group, softmax_scale) -> out` run by `SpavaCoreAttention`, or a
core-attention module class that Megatron's layer spec builds in its place (Megatron's own
CP through Transformer Engine's `TEDotProductAttention`).

The checks every plan shares live here once: `check_lengths` (integer sizes, the
fuse_query rule), `split_len` (a cut into non-empty contiguous pieces), `zigzag_pair` and
`Layout.check_rank`.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Tuple, Type

import torch

from ..config import SpavaConfig, ceil_div

#: (q [s, b, hq, d], k, v [s, b, hk, d], *, layout, cp_group, softmax_scale) -> [s, b, hq, d]
AttnFunc = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Layout(abc.ABC):
    """Base of every planned layout. Build one with `<Layout>.plan(...)` or
    `megatron_spava.algos.plan_layout(algo, ...)`.

    context_len: n. query_len: l_q (0: a context-only pass). cp_size: W.
    config: the SpavaConfig it was planned with (switches travel with the layout).
    algo: the registry name it was planned for (plan_layout sets it; a direct `plan` gives
      the class's `default_algo`). The attention is looked up by it.
    """

    context_len: int
    query_len: int
    cp_size: int
    config: SpavaConfig = field(default_factory=SpavaConfig, kw_only=True)
    algo: str = field(default="", kw_only=True)

    #: The registry name a layout planned directly (not through plan_layout) runs as.
    default_algo: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not self.algo and self.default_algo:
            object.__setattr__(self, "algo", self.default_algo)

    @classmethod
    @abc.abstractmethod
    def plan(cls, *, context_len: int, query_len: int, cp_size: int,
             config: Optional[SpavaConfig] = None) -> "Layout":
        """Plan one request. Pure; raises ValueError naming the limit for bad sizes."""

    @abc.abstractmethod
    def local_indices(self, rank: int) -> torch.Tensor:
        """LongTensor [local_len(rank)]: the global positions `rank` holds, in local order.
        Gather token ids, embeddings and RoPE positions with it."""

    @property
    def total_len(self) -> int:
        """n + l_q: the prompt length."""
        return self.context_len + self.query_len

    def local_len(self, rank: int) -> int:
        """Rows of `rank`'s local sequence."""
        return int(self.local_indices(rank).numel())

    def owned_rows(self, rank: int) -> torch.Tensor:
        """Bool [local_len(rank)]: the local rows `rank` owns (counts in a loss summed over
        the CP group). A token held by several ranks is owned by the lowest of them."""
        self.check_rank(rank)
        idx = self.local_indices(rank)
        owned = torch.ones(idx.numel(), dtype=torch.bool)
        for lower in range(rank):
            owned &= ~torch.isin(idx, self.local_indices(lower))
        return owned

    def cache_rows(self, rank: int) -> torch.Tensor:
        """LongTensor: the local rows `rank` keeps in its KV cache after prefill. Over all
        ranks every token is kept exactly once. Default: the owned rows."""
        return self.owned_rows(rank).nonzero().squeeze(1)

    def check_rank(self, rank: int) -> None:
        """ValueError unless 0 <= rank < cp_size."""
        if not isinstance(rank, int) or not 0 <= rank < self.cp_size:
            raise ValueError(f"rank {rank!r} out of range for a layout planned for "
                             f"cp_size={self.cp_size}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_lengths(who: str, context_len: int, query_len: int, cp_size: int,
                  config: Optional[SpavaConfig]) -> SpavaConfig:
    """The checks every plan shares; returns `config` (default SpavaConfig()).

    context_len >= 1, query_len >= 0 (0: a context-only pass), cp_size >= 1, all integers.
    With fuse_query=False the query is not part of the prefill: it runs in a second pass
    over the KV cache, so the prefill layout must hold the context only (query_len=0).
    """
    config = SpavaConfig() if config is None else config
    if not isinstance(config, SpavaConfig):
        raise ValueError(f"{who}: config must be a SpavaConfig, got {type(config).__name__}")
    for name, value, low in (("context_len", context_len, 1), ("query_len", query_len, 0),
                             ("cp_size", cp_size, 1)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{who}: {name} must be an integer >= {low}, got {value!r}")
    if query_len and not config.fuse_query:
        raise ValueError(
            f"{who}: fuse_query=False runs the query in a second pass over the KV cache, so the "
            f"prefill layout holds the context only: plan it with query_len=0 (got query_len="
            f"{query_len}). generate() and answer_questions() do both passes; a single forward "
            f"per batch (Megatron-LM's forward_step) needs fuse_query=True")
    return config


def split_len(total: int, parts: int, *, who: str, subject: str, unit: str, hint: str,
              detail: str = "") -> int:
    """Length ceil(total / parts) of `parts` contiguous pieces of `total` tokens, the last
    possibly short. ValueError when some piece would be empty: when total < parts (the
    `subject` is too short), or when ceil sizing leaves the last piece empty (only below
    parts * (parts - 1) tokens, e.g. 5 tokens in 4 pieces: 2, 2, 1, 0)."""
    size = ceil_div(total, parts)
    if total < parts:
        raise ValueError(f"{who}: {subject} too short: {detail}{total} tokens, which cannot be "
                         f"cut into {parts} non-empty {unit}s. {hint}")
    if (parts - 1) * size >= total:
        raise ValueError(
            f"{who}: {detail}{total} tokens cut into {parts} {unit}s of ceil({total}/{parts})="
            f"{size} tokens leave the last {unit} empty. This only happens below "
            f"{parts * (parts - 1)} tokens; change the length by a few tokens. {hint}")
    return size


def zigzag_pair(rank: int, cp_size: int) -> Tuple[int, int]:
    """The two of 2W pieces rank r holds under ZigZag balancing: (r, 2W-1-r)."""
    return rank, 2 * cp_size - 1 - rank


_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Algorithm:
    """One registry entry (`megatron_spava.algos.registry.register`).

    name: the `--context-parallel-algo` value (lowercase letters, digits, underscores; the
      benchmark's variants append `-no-<switch>` to it).
    help: one line for `--help`.
    layout: the Layout subclass `plan_layout` plans with.
    attn_func: `(q, k, v, *, layout, cp_group, softmax_scale) -> out`, run by
      SpavaCoreAttention; or
    core_attention: a megatron-core core-attention module class that the layer spec builds
      instead of SpavaCoreAttention (`specs.get_gpt_layer_spec(algo=...)`). Exactly one.
    preset: SpavaConfig -> SpavaConfig, the switches the algorithm implies. It must never
      override what a user set: combine with it or raise ValueError naming the conflict.
    exact: the algorithm computes exact causal attention at any budget.
    cost: `perf.work.LayerRequest -> perf.work.LayerWork`, what one layer costs each rank
      (attention calls, dense work, collectives), read by the roofline and the scaling
      model; None: the algorithm cannot be charged (they refuse it by name).
    one_rank: the algorithm runs without context parallelism, on one rank (cp_size 1):
      the benchmark runs it on one GPU (every rank its own replica), apart from the CP
      algorithms, and the fit files its runs as one-GPU runs.
    options: the values of the algorithm's own option (Megatron's: TE's --cp-comm-type),
      each a benchmark variant `<name>-<option>` with its own model (its core attention
      built for that option, `LayerRequest.option` for its cost); the bare name is then
      no benchmark variant. Empty: no option.
    bench_options: the options the benchmark runs by default (None: all of `options`).
    prompt_multiple: at CP size W > 1 the prompt must be a multiple of prompt_multiple x W
      tokens (Megatron's: 2, TE cuts 2W chunks); a benchmark that runs it pads every
      algorithm's prompt so, so that all compare on the same prompt.
    """

    name: str
    help: str
    layout: Type[Layout]
    attn_func: Optional[AttnFunc] = None
    core_attention: Optional[type] = None
    preset: Optional[Callable[[SpavaConfig], SpavaConfig]] = None
    exact: bool = False
    cost: Optional[Callable] = None
    one_rank: bool = False
    options: Tuple[str, ...] = ()
    bench_options: Optional[Tuple[str, ...]] = None
    prompt_multiple: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"algorithm name {self.name!r}: use lowercase letters, digits and "
                             f"underscores, starting with a letter")
        if (self.attn_func is None) == (self.core_attention is None):
            raise ValueError(f"algorithm {self.name!r}: give exactly one of attn_func (run by "
                             f"SpavaCoreAttention) and core_attention (a module Megatron builds)")
        if not (isinstance(self.layout, type) and issubclass(self.layout, Layout)):
            raise ValueError(f"algorithm {self.name!r}: layout must be a Layout subclass, got "
                             f"{self.layout!r}")
        if isinstance(self.options, str) or not all(isinstance(o, str) and o for o in self.options):
            raise ValueError(f"algorithm {self.name!r}: options must be a tuple of non-empty strings, "
                             f"got {self.options!r}")
        if self.bench_options is not None and not set(self.bench_options) <= set(self.options):
            raise ValueError(f"algorithm {self.name!r}: bench_options {self.bench_options!r} are not "
                             f"all among its options {self.options!r}")
        if not isinstance(self.prompt_multiple, int) or self.prompt_multiple < 1:
            raise ValueError(f"algorithm {self.name!r}: prompt_multiple must be an integer >= 1, got "
                             f"{self.prompt_multiple!r}")

    def config(self, config: Optional[SpavaConfig] = None) -> SpavaConfig:
        """The SpavaConfig this algorithm runs with: `config` through its preset."""
        config = SpavaConfig() if config is None else config
        return self.preset(config) if self.preset is not None else config
