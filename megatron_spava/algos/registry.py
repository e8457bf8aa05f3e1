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
`algos.spava.selection.SCORERS` other than the default: `spava-selection-mean`), optionally
`-merge-<kernel>` (SpavaConfig.merge_kernel: `spava-merge-triton`), plus any number of
`-no-<switch>` suffixes, one per SpavaConfig switch turned off (`spava-no-overlap-no-zigzag`);
`parse_variant` reads them. An algorithm with options (`Algorithm.options`: Megatron's
--cp-comm-type) has the variants `<algo>-<option>` instead (`split_option`). The benchmark,
the TP x CP check, the roofline and the fit read what they decide per algorithm from its
entry (`runs_on_one_rank`, `options`, `prompt_multiple`, `cost_of`), never from its name.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..config import ABLATIONS, MERGE_KERNELS, SWITCHES, SpavaConfig
from .spava.selection import DEFAULT_SELECTION, SCORERS
from .base import Algorithm

_ENTRIES: Dict[str, Algorithm] = {}
_UNAVAILABLE: Dict[str, str] = {}  # name -> why it cannot run here
_PENDING: Dict[str, str] = {}  # name -> module, imported on first use (register_module)
_MODULES: Dict[str, object] = {}  # name -> the imported module of an entry that cannot run here


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
    _MODULES.pop(name, None)


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
    here, `name` is recorded as unavailable with the reason instead. A module that
    imports but cannot build its ALGORITHM here may still define its entry's fields in
    capitals (`COST`, `OPTIONS`, `PROMPT_MULTIPLE`): charging the algorithm and naming its
    benchmark variants need no GPU library (`cost_of`, `split_option`, `prompt_multiple`)."""
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
            if loaded is not None:  # its COST and OPTIONS need no GPU library
                _MODULES[name] = loaded
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
    cost = _static(name, "cost")
    if cost is None:
        if entry is None:
            get(name)  # raises: unknown, or not available here
        raise ValueError(f"context-parallel algorithm {name!r} has no cost model (Algorithm.cost): "
                         f"the roofline and the scaling model cannot charge it")
    if entry is None:
        return cost
    return lambda req: cost(replace(req, config=entry.config(req.config)))


def _static(name: str, field: str, default=None):
    """`field` of the entry `name`; for a module entry that cannot run here, its module's
    upper-case constant (`COST`, `OPTIONS`, `PROMPT_MULTIPLE`), else `default`. None for an unknown name."""
    _load_pending()
    if name in _ENTRIES:
        return getattr(_ENTRIES[name], field)
    if name in _MODULES:
        return getattr(_MODULES[name], field.upper(), default)
    return None


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
    'spava-selection-mean' -> ('spava', {'selection': 'mean'});
    'spava-merge-triton' -> ('spava', {'merge_kernel': 'triton'}).
    ValueError for an unknown algorithm, selection score, merge kernel or switch."""
    head, *offs = variant.split("-no-")
    head, merged, merge = head.partition("-merge-")
    algo, marked, score = head.partition("-selection-")
    get(algo)
    changes: Dict[str, object] = {}
    if marked:
        if score not in SCORERS:
            raise ValueError(f"variant {variant!r}: unknown selection score {score!r}; scores: "
                             f"{', '.join(sorted(SCORERS))}")
        changes["selection"] = score
    if merged:
        if merge not in MERGE_KERNELS:
            raise ValueError(f"variant {variant!r}: unknown merge kernel {merge!r}; merge kernels: "
                             f"{', '.join(MERGE_KERNELS)}")
        changes["merge_kernel"] = merge
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


def option_variants(default_only: bool = False) -> List[str]:
    """`<algo>-<option>` for every runnable algorithm with options (`Algorithm.options`:
    megatron-p2p, megatron-a2a, ...); default_only: only its `bench_options`."""
    return [f"{e.name}-{o}" for e in entries()
            for o in (e.bench_options if default_only and e.bench_options is not None else e.options)]


def options() -> Dict[str, Tuple[str, ...]]:
    """{algorithm: its options} for every algorithm with options (`Algorithm.options`), also
    a module entry that cannot run here (its module's OPTIONS)."""
    _load_pending()
    return {name: tuple(opts) for name in (*_ENTRIES, *_MODULES)
            for opts in [_static(name, "options", ())] if opts}


def split_option(variant: str) -> Tuple[str, Optional[str]]:
    """'megatron-a2a' -> ('megatron', 'a2a'): an algorithm's name and one of its options
    (`Algorithm.options`; also for a module entry that cannot run here, from its module's
    OPTIONS); any other variant -> (variant, None)."""
    _load_pending()
    name, _, option = variant.partition("-")
    if option and option in (_static(name, "options", ()) or ()):
        return name, option
    return variant, None


def algorithm_of(variant: str) -> str:
    """The registry name of a benchmark variant: 'spava-no-zigzag' -> 'spava',
    'megatron-a2a' -> 'megatron'. ValueError for an unknown algorithm, score or switch."""
    name, option = split_option(variant)
    return name if option is not None else parse_variant(variant)[0]


def runs_on_one_rank(variant: str) -> bool:
    """Whether the variant's algorithm runs without context parallelism (`Algorithm.one_rank`)."""
    return bool(_static(algorithm_of(variant), "one_rank", False))


def prompt_multiple(variants: Sequence[str]) -> int:
    """The largest `Algorithm.prompt_multiple` of the variants' algorithms (1 if none needs
    one): a run of all of them at CP size W pads every prompt to a multiple of it times W."""
    return max([_static(algorithm_of(v), "prompt_multiple", 1) or 1 for v in variants] + [1])


def benchmark_variants() -> List[str]:
    """What tools/bench_prefill.py runs by default: every algorithm that runs inside
    SpavaCoreAttention, then each ablation of spava, then each non-default selection score
    (spava-selection-mean), then the default options of the algorithms with options that
    run here (megatron-p2p, megatron-a2a, megatron-all_gather where Transformer Engine imports)."""
    return ([e.name for e in entries() if e.attn_func is not None] + ablation_variants()
            + selection_variants() + option_variants(default_only=True))


# ---- the registry lines ------------------------------------------------------------------

from .full import FullLayout, full_attn_func, full_cost  # noqa: E402
from .ring import RingLayout, ring_attn_func, ring_cost  # noqa: E402
from .spava import SpavaLayout, apb_preset, spava_attn_func, star_preset  # noqa: E402
from .spava.cost import spava_cost  # noqa: E402

register(Algorithm("full", "exact causal attention on one rank, no context parallelism (the "
                   "paper's FlashAttn)", FullLayout, attn_func=full_attn_func, exact=True, cost=full_cost,
                   one_rank=True))
register(Algorithm("ring", "exact ZigZag ring attention over the CP group", RingLayout,
                   attn_func=ring_attn_func, exact=True, cost=ring_cost))
register(Algorithm("star", "Star Attention: a block-sized anchor, no passing blocks, exact "
                   "query", SpavaLayout, attn_func=spava_attn_func, preset=star_preset, cost=spava_cost))
register(Algorithm("apb", "APB: one block per rank, no overlap, the passing budget doubled",
                   SpavaLayout, attn_func=spava_attn_func, preset=apb_preset, cost=spava_cost))
register(Algorithm("spava", "Spava (SPAVA.md): ZigZag blocks, query-aware passing blocks, "
                   "exact query", SpavaLayout, attn_func=spava_attn_func, cost=spava_cost))
register_module("megatron", "megatron_spava.algos.megatron")  # TE's own CP; needs TE
