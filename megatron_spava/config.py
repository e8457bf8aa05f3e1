"""Spava hyper-parameters and ablation switches (SPAVA.md sections 5 and 6).

`SpavaConfig` is a frozen dataclass that validates itself, as megatron-core's
configs do. It holds no sequence lengths: `SpavaLayout.plan` turns a config and
the lengths of one request into concrete budgets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

#: Attention kernels `ops.attention.attend` can run; "auto" picks per device.
KERNELS = ("auto", "cpu_flash", "flash", "cudnn", "efficient", "flex", "math")

#: Implementations of the LSE merge of attention partials (`ops.attention.MERGE_IMPLS`).
MERGE_KERNELS = ("torch", "triton", "auto")


#: The paper's ablation chain (SPAVA.md section 5), in the order it removes them: each is a
#: SpavaConfig switch (True = on), a `--spava-no-*` flag and a benchmark variant
#: (`spava-no-overlap`, ...). Values: what turning it off does.
ABLATIONS = {
    "overlap": "wait for each passing-block exchange as soon as it is launched, computing nothing "
               "while it is in flight",
    "shard_anchor": "rank 0 attends the whole anchor for the query rows (no anchor shards)",
    "fuse_query": "prefill the context alone first (passing blocks chosen with query-agnostic "
                  "probes: the anchor's last context_probe_len tokens), then the query in a second "
                  "pass over the distributed KV cache",
    "zigzag": "one block per rank instead of two ZigZag virtual hosts",
    "frame_parallel": "every rank encodes the whole video instead of its slice of the frames",
}

#: Every boolean switch with a `--spava-no-*` flag: the ablations and `passing`.
SWITCHES = {**ABLATIONS,
            "passing": "exchange no passing blocks (with a block-sized anchor: Star Attention)"}


def ceil_div(x: int, d: int) -> int:
    """ceil(x / d) for integers x >= 0, d >= 1."""
    return -(-x // d)


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x (x >= 0, multiple >= 1)."""
    return ceil_div(x, multiple) * multiple


@dataclass(frozen=True)
class SpavaConfig:
    """Budgets and switches of Spava. Every field is validated on construction.

    Budgets (tokens; n is the context length of the request):
      anchor_len: tokens of the anchor A, replicated on every rank. None gives the
        reference default round_up(n // anchor_divisor, budget_align), clamped to n.
        "block" makes the anchor as long as a context block (Star Attention).
      passing_len: passing-block budget l_p per virtual block and per KV head. None gives
        passing_scale * round_up(n // passing_divisor, budget_align). A block keeps
        min(passing_len, its length) tokens.
      passing_scale: multiplies the default passing budget (APB uses 2: half as many
        blocks, the same exchanged volume). Ignored when passing_len is set.
      anchor_divisor, passing_divisor: the n // divisor of the defaults (64 and 128).
      budget_align: defaults are rounded up to it, and budgets set explicitly must be
        multiples of it (128 = the row tile of the flash kernels the reference targets).
        Set 1 to allow any budget.
      pool_kernel: odd width of the max-pool that smooths the selection scores.
      max_query_len: longest query (question + assistant prefix) accepted. The query is
        replicated on every rank and its rows are computed in full on every rank, so a
        long query costs every rank; raise it deliberately.

    Switches (the paper's ablations, SPAVA.md section 5):
      zigzag: two virtual hosts per rank, r and 2W-1-r. Off: one block per rank.
      overlap: compute while the passing blocks are in flight. Off: wait for each
        exchange as soon as it is launched.
      shard_anchor: the query rows attend to the anchor in W shards, one per rank.
        Off: rank 0 attends to the whole anchor for the query.
      fuse_query: prefill the context and the query in one pass, selecting passing blocks
        with the query (query-aware). Off: the context is prefilled alone into the
        distributed KV cache, selecting with the queries of the anchor's last
        `context_probe_len` tokens (query-agnostic), and the query runs in a second pass over
        that cache (exact). Several questions can then share one context prefill
        (`inference.generate.answer_questions`).
      frame_parallel: the vision encoder runs on W disjoint slices of the frames, one per rank,
        then all-gathers. Off: every rank encodes the whole video.
      passing: exchange passing blocks. Off (with the anchor the size of a block): Star
        Attention.
      `ABLATIONS` lists the paper's chain in order; `SWITCHES` adds `passing`.

    Selection (SPAVA.md section 2 step 1):
      selection: the name of the score that picks the passing blocks' keys, an entry of
        `algos.spava.selection.SCORERS`: "lse" (the default: each key's log-sum-exp of its scaled
        logits over every query token and query head of its GQA group, the log of the
        attention mass the question would give it) or "mean" (the reference's rule: each key
        against the mean of those queries, no softmax, no scaling; docs/NOTES.md says why it
        is not the default), or one beyond SPAVA.md ("lse-max", "rownorm", "rownorm-max";
        docs/NOTES.md). `algos.spava.selection.register_scorer` adds more.
      context_probe_len: tokens at the end of the anchor whose queries probe the selection of
        a pass that holds no query (fuse_query=False), scored by `selection` as the query's are.

    Execution:
      kernel: attention kernel, one of KERNELS; "auto" picks the fastest measured one
        for the device and dtype (see ops.attention).
      merge_kernel: the LSE merge of attention partials (`ops.attention.merge_partials`), one of
        MERGE_KERNELS: "torch" (elementwise torch ops), "triton" (one fused kernel that reads
        each partial once and writes the layer's output in its dtype; needs triton and CUDA
        tensors, else ValueError before any collective) or "auto" (the default: triton on CUDA
        where triton imports, else torch; on one H100 the kernel runs at its bytes floor, 6x
        faster than the torch path: BENCHMARKS.md section 13).
      check_ranks_agree: validate inputs collectively, so that a bad input seen on one
        rank only still raises on every rank. Costs one small all-reduce and a host sync
        per call; inputs that are bad on every rank raise everywhere without it.
    """

    anchor_len: Optional[Union[int, str]] = None
    passing_len: Optional[int] = None
    anchor_divisor: int = 64
    passing_divisor: int = 128
    passing_scale: int = 1
    budget_align: int = 128
    pool_kernel: int = 5
    max_query_len: int = 8192
    context_probe_len: int = 64
    zigzag: bool = True
    overlap: bool = True
    shard_anchor: bool = True
    fuse_query: bool = True
    frame_parallel: bool = True
    passing: bool = True
    selection: str = "lse"
    kernel: str = "auto"
    merge_kernel: str = "auto"
    check_ranks_agree: bool = False

    def __post_init__(self) -> None:
        for name in (*SWITCHES, "check_ranks_agree"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SpavaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name, low in (("anchor_divisor", 1), ("passing_divisor", 1), ("passing_scale", 1),
                          ("budget_align", 1),
                          ("pool_kernel", 1), ("max_query_len", 1), ("context_probe_len", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"SpavaConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"SpavaConfig.pool_kernel must be odd (it is centred on each token), "
                             f"got {self.pool_kernel}")
        for name in ("anchor_len", "passing_len"):
            value = getattr(self, name)
            if value is None or (name == "anchor_len" and value == "block"):
                continue
            if not _is_int(value) or value < 0:
                extra = ', "block"' if name == "anchor_len" else ""
                raise ValueError(f"SpavaConfig.{name} must be None{extra} or an integer >= 0, "
                                 f"got {value!r}")
            if value % self.budget_align:
                raise ValueError(
                    f"SpavaConfig.{name}={value} is not a multiple of budget_align="
                    f"{self.budget_align}; use {round_up(value, self.budget_align)}, "
                    f"or set budget_align=1 to allow any size")
        from .algos.spava.selection import SCORERS
        if self.selection not in SCORERS:
            raise ValueError(f"SpavaConfig.selection must be one of {sorted(SCORERS)}, "
                             f"got {self.selection!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"SpavaConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.merge_kernel not in MERGE_KERNELS:
            raise ValueError(f"SpavaConfig.merge_kernel must be one of {MERGE_KERNELS}, got {self.merge_kernel!r}")

    def replace(self, **changes) -> "SpavaConfig":
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
