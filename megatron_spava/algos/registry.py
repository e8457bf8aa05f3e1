"""The registry of context-parallel algorithms: one entry per algorithm, one line each.

The CLI (`--context-parallel-algo` choices and help), validation, `plan_layout`, the
attention dispatch of `SpavaCoreAttention`, the layer spec's choice of core-attention
module and the benchmark's list of algorithms and ablation variants all read it.

Adding an algorithm is one module in `algos/` (a Layout subclass and an attention
function, see `algos/base.py`) and one `register(Algorithm(...))` line below. An
algorithm whose dependencies may be missing (Megatron's own CP needs Transformer Engine)
is registered by `register_module(name, module)`: the module defines
`ALGORITHM = Algorithm(...)` and raises ImportError where it cannot run; it is imported
on the registry's first use, and where it does not import it is left out of the choices
and asking for it says why.

Benchmark variants are `<algo>`, optionally `-selection-<score>` (a selection score of
`algos.spava.selection.SCORERS` other than the default: `spava-selection-mean`), plus any number of
`-no-<switch>` suffixes, one per SpavaConfig switch turned off (`spava-no-overlap-no-zigzag`);
`parse_variant` reads them.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..config import ABLATIONS, SWITCHES, SpavaConfig
from .spava.selection import DEFAULT_SELECTION, SCORERS
from .base import Algorithm

_ENTRIES: Dict[str, Algorithm] = {}
_UNAVAILABLE: Dict[str, str] = {}  # name -> why it cannot run here
_PENDING: Dict[str, str] = {}  # name -> module, imported on first use (register_module)
_COSTS: Dict[str, Callable] = {}  # name -> the COST of a module entry that cannot run here


def register(entry: Algorithm, *, replace: bool = False) -> Algorithm:
    """Add `entry` under `entry.name`. Re-registering a name raises unless replace=True."""
    if not isinstance(entry, Algorithm):
        raise TypeError(f"register() takes an Algorithm, got {type(entry).__name__}")
    if entry.name in _ENTRIES and not replace and _ENTRIES[entry.name] is not entry:
        raise ValueError(f"context-parallel algorithm {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    _UNAVAILABLE.pop(entry.name, None)
    return entry


def unregister(name: str) -> None:
    """Remove `name` (no error if absent)."""
    _ENTRIES.pop(name, None)
    _UNAVAILABLE.pop(name, None)
    _PENDING.pop(name, None)
    _COSTS.pop(name, None)


@contextlib.contextmanager
def registered(entry: Algorithm) -> Iterator[Algorithm]:
    """Register `entry` for the duration of a `with` block (tests, experiments)."""
    register(entry)
    try:
        yield entry
    finally:
        unregister(entry.name)


def register_module(name: str, module: str) -> None:
    """Register the `ALGORITHM` of `module` (its name must be `name`) on the registry's
    first use, not at import, so that the module may import any part of megatron_spava.
    When the module, or a package it needs (e.g. Transformer Engine), does not import
    here, `name` is recorded as unavailable with the reason instead."""
    _PENDING[name] = module


def _load_pending() -> None:
    while _PENDING:
        name = next(iter(_PENDING))
        module = _PENDING.pop(name)
        loaded = None
        try:
            loaded = importlib.import_module(module)
            entry = loaded.ALGORITHM
        except (ImportError, OSError) as err:  # a missing package or a broken native extension
            missing = getattr(err, "name", None) or ""
            if missing.startswith("megatron_spava") and missing != module:
                raise  # our own code is broken: not a missing dependency
            _UNAVAILABLE[name] = f"{module} does not import here ({type(err).__name__}: {err})"
            if getattr(loaded, "COST", None) is not None:  # a cost model needs no GPU library
                _COSTS[name] = loaded.COST
            continue
        if entry.name != name:
            raise ValueError(f"{module}.ALGORITHM is named {entry.name!r}, registered as {name!r}")
        register(entry)


def get(name: str) -> Algorithm:
    """The entry for `name`; ValueError listing the choices (or why `name` cannot run)."""
    _load_pending()
    entry = _ENTRIES.get(name)
    if entry is not None:
        return entry
    if name in _UNAVAILABLE:
        raise ValueError(f"context-parallel algorithm {name!r} is not available here: "
                         f"{_UNAVAILABLE[name]}")
    raise ValueError(f"unknown context-parallel algorithm {name!r}; choose from {names()}")


def cost_of(name: str) -> Callable:
    """The cost model of `name` (`Algorithm.cost`, through the entry's preset): a function
    `perf.work.LayerRequest -> perf.work.LayerWork`. Also for an algorithm registered by
    `register_module` that cannot run here, when its module defines `COST` (charging an
    algorithm needs no GPU library). ValueError for an unknown name or one without a cost."""
    from dataclasses import replace
    _load_pending()
    entry = _ENTRIES.get(name)
    cost = entry.cost if entry is not None else _COSTS.get(name)
    if cost is None:
        if entry is None:
            get(name)  # raises: unknown, or not available here
        raise ValueError(f"context-parallel algorithm {name!r} has no cost model (Algorithm.cost): "
                         f"the roofline and the scaling model cannot charge it")
    if entry is None:
        return cost
    return lambda req: cost(replace(req, config=entry.config(req.config)))


def names() -> Tuple[str, ...]:
    """Registered names, in registration order."""
    _load_pending()
    return tuple(_ENTRIES)


def entries() -> Tuple[Algorithm, ...]:
    _load_pending()
    return tuple(_ENTRIES.values())


def unavailable() -> Dict[str, str]:
    """Algorithms known but not runnable here, with the reason."""
    _load_pending()
    return dict(_UNAVAILABLE)


def help_text() -> str:
    """'name: help; ...' for every entry, for `--context-parallel-algo`'s help."""
    text = "; ".join(f"{e.name}: {e.help}" for e in entries())
    if _UNAVAILABLE:
        text += " (not available here: " + ", ".join(sorted(_UNAVAILABLE)) + ")"
    return text


# ---- benchmark variants ------------------------------------------------------------------

def _flag(switch: str) -> str:
    return switch.replace("_", "-")


def parse_variant(variant: str) -> Tuple[str, Dict[str, object]]:
    """'spava-no-overlap-no-zigzag' -> ('spava', {'overlap': False, 'zigzag': False});
    'spava-selection-mean' -> ('spava', {'selection': 'mean'}).
    ValueError for an unknown algorithm, selection score or switch."""
    head, *offs = variant.split("-no-")
    algo, marked, score = head.partition("-selection-")
    get(algo)
    changes: Dict[str, object] = {}
    if marked:
        if score not in SCORERS:
            raise ValueError(f"variant {variant!r}: unknown selection score {score!r}; scores: "
                             f"{', '.join(sorted(SCORERS))}")
        changes["selection"] = score
    for off in offs:
        switch = off.replace("-", "_")
        if switch not in SWITCHES:
            raise ValueError(f"variant {variant!r}: unknown switch {off!r}; switches: "
                             f"{', '.join(map(_flag, SWITCHES))}")
        changes[switch] = False
    return algo, changes


def variant_config(variant: str, config: Optional[SpavaConfig] = None) -> Tuple[str, SpavaConfig]:
    """(algorithm name, config with the variant's switches off)."""
    algo, changes = parse_variant(variant)
    return algo, (config or SpavaConfig()).replace(**changes)


def ablation_variants(algo: str = "spava", switches: Sequence[str] = tuple(ABLATIONS)) -> List[str]:
    """One variant per switch (default: the paper's ablation chain, `config.ABLATIONS`):
    spava-no-overlap, spava-no-shard-anchor, ..."""
    return [f"{algo}-no-{_flag(s)}" for s in switches]


def ablation_chain(algo: str = "spava") -> List[str]:
    """The paper's chain, each step removing one more: spava-no-overlap,
    spava-no-overlap-no-shard-anchor, ..., down to no frame-parallel vision."""
    chain, name = [], algo
    for s in ABLATIONS:
        name += f"-no-{_flag(s)}"
        chain.append(name)
    return chain


def selection_variants(algo: str = "spava") -> List[str]:
    """One variant per selection score other than the default: spava-selection-mean, ..."""
    return [f"{algo}-selection-{name}" for name in SCORERS if name != DEFAULT_SELECTION]


def benchmark_variants() -> List[str]:
    """What tools/bench_prefill.py runs by default: every algorithm that runs inside
    SpavaCoreAttention, then each ablation of spava, then each non-default selection score
    (spava-selection-mean)."""
    return ([e.name for e in entries() if e.attn_func is not None] + ablation_variants()
            + selection_variants())


# ---- the registry lines ------------------------------------------------------------------

from .full import FullLayout, full_attn_func, full_cost  # noqa: E402
from .ring import RingLayout, ring_attn_func, ring_cost  # noqa: E402
from .spava import SpavaLayout, apb_preset, spava_attn_func, star_preset  # noqa: E402
from .spava.cost import spava_cost  # noqa: E402

register(Algorithm("full", "exact causal attention on one rank, no context parallelism (the "
                   "paper's FlashAttn)", FullLayout, attn_func=full_attn_func, exact=True, cost=full_cost))
register(Algorithm("ring", "exact ZigZag ring attention over the CP group", RingLayout,
                   attn_func=ring_attn_func, exact=True, cost=ring_cost))
register(Algorithm("star", "Star Attention: a block-sized anchor, no passing blocks, exact "
                   "query", SpavaLayout, attn_func=spava_attn_func, preset=star_preset, cost=spava_cost))
register(Algorithm("apb", "APB: one block per rank, no overlap, the passing budget doubled",
                   SpavaLayout, attn_func=spava_attn_func, preset=apb_preset, cost=spava_cost))
register(Algorithm("spava", "Spava (SPAVA.md): ZigZag blocks, query-aware passing blocks, "
                   "exact query", SpavaLayout, attn_func=spava_attn_func, cost=spava_cost))
register_module("megatron", "megatron_spava.algos.megatron")  # TE's own CP; needs TE
