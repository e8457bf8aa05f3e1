"""Query-aware selection of passing blocks (SPAVA.md section 2, steps 1-3).

score (a named scorer) -> max-pool within the block -> per-head top-k -> gather; several
blocks of one sequence at once with `select_passing_blocks` (same result as one by one).
Pure functions of tensors; no communication.

The selection score is a named choice (`SpavaConfig.selection`, `--spava-selection`), one
entry of `SCORERS`. A scorer is one function

    scorer(k_block [l, b, hk, d], probes [m, b, hq, d], scale) -> scores [b, hk, l] float32

of the block's keys and the query-side probes (the query tokens' queries, post-RoPE, every
head; or, in a context-only pass, the anchor's last tokens' queries), with hq % hk == 0 and
`scale` the attention's softmax scale. It returns raw (unpooled) scores, higher = keep.
Adding a score is one `register_scorer(name, fn)` (or one entry below); the config, the
`--spava-selection` choices, the registry's `spava-selection-<name>` variants and the
needle evaluation read the table.

  lse (the default; beyond the reference): every probe token's query of every head of the
    KV head's GQA group is a probe; s[t, h] = logsumexp_{j, g}(scale * q[j, g] . k[t, h]),
    the log of the attention mass (before normalisation) the question puts on key t.
  mean (the reference's rule): one probe per KV head, the probes averaged over the GQA
    group and the probe tokens; s[t, h] = k[t, h] . probe[h] (no softmax, no scaling).
  lse-max (beyond SPAVA.md): lse normalised per KV head over the block (the log share of
    the head's mass each key carries) and maximised over the KV heads: every head keeps
    the same keys, those any head wants most.
  rownorm (beyond SPAVA.md): each probe row's attention within the block counts once:
    s[t, h] = log sum_{j, g} softmax over the block's keys t' of (scale * q[j, g] . k[t', h]),
    evaluated at t (SnapKV-like). Unlike lse, rows with large logits do not drown the others.
  rownorm-max (beyond SPAVA.md): rownorm shared by the KV heads as lse-max shares lse.

A scorer is always called with one whole block's keys (`select_passing_blocks` scores each
block alone, also in the context-only pass), so a score normalised over the block's keys
(lse-max, rownorm, rownorm-max) is normalised over exactly that block.

Subscribers (`record_selection`) are told what each selection chose; with none listening
nothing is reported and nothing is copied.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

#: scorer(k_block [l, b, hk, d], probes [m, b, hq, d], scale: float) -> [b, hk, l] float32.
Scorer = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

#: log-sum-exp scores are computed over key chunks of at most this many logits.
_LOGITS_PER_CHUNK = 1 << 24


def _grouped(probes: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """probes [m, b, hq, d] -> float32 [b, hk, m * group, d], each KV head's probe vectors."""
    m, b, hq, d = probes.shape
    if hq % num_kv_heads:
        raise ValueError(f"selection: {hq} query heads are not a multiple of {num_kv_heads} KV heads")
    grouped = probes.float().reshape(m, b, num_kv_heads, hq // num_kv_heads, d)
    return grouped.permute(1, 2, 0, 3, 4).reshape(b, num_kv_heads, -1, d)


def mean_scores(k_block: torch.Tensor, probes: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's score: s[t, h] = k[t, h] . mean over the probe tokens and the GQA
    group of q (no softmax, no scaling; `scale` is unused). The mean of dot products is
    the dot product with the mean. Shapes as `Scorer`."""
    keys = k_block.permute(1, 2, 0, 3).float()  # [b, hk, l, d]
    probe = _grouped(probes, k_block.shape[2]).mean(dim=2)  # [b, hk, d]
    return torch.matmul(keys, probe.unsqueeze(-1)).squeeze(-1)


def lse_scores_torch(k_block: torch.Tensor, probes: torch.Tensor, scale: float) -> torch.Tensor:
    """s[t, h] = logsumexp over the probe tokens j and the group's heads g of
    (scale * q[j, g] . k[t, h]): `ops.lse_score`'s torch path (float32 logits over key chunks
    of bounded memory). Shapes as `Scorer`."""
    from ...ops import lse_score
    return lse_score.lse_scores(probes, k_block, scale, impl="torch").permute(1, 2, 0)  # [b, hk, l]


def lse_scores(k_block: torch.Tensor, probes: torch.Tensor, scale: float) -> torch.Tensor:
    """The default score (`lse_scores_torch`'s definition), from `ops.lse_score`: on CUDA,
    where triton imports, its fused kernel (one pass over the keys, no logits in memory);
    elsewhere its torch path. Shapes as `Scorer`."""
    from ...ops import lse_score
    return lse_score.lse_scores(probes, k_block, scale).permute(1, 2, 0)  # [b, hk, l], no copy


def max_share(scorer: Scorer) -> Scorer:
    """`scorer` shared by the KV heads: each head's log share of the block's score mass,
    s[t, h] - logsumexp over the block's t' of s[t', h], maximised over the KV heads, so that
    every head keeps the keys any head's question wants most. Returns a scorer (shapes as
    `Scorer`; every head's row of its result is the same)."""
    def shared(k_block: torch.Tensor, probes: torch.Tensor, scale: float) -> torch.Tensor:
        s = scorer(k_block, probes, scale)
        s = (s - torch.logsumexp(s, dim=-1, keepdim=True)).amax(dim=1, keepdim=True)
        return s.expand(-1, k_block.shape[2], -1)
    shared.__name__ = shared.__qualname__ = f"{scorer.__name__}_max_share"
    shared.__doc__ = f"`{scorer.__name__}` shared by the KV heads (`max_share`)."
    return shared


#: `lse` shared by the KV heads (`max_share`). Measured on the needle model (docs/NOTES.md):
#: where one KV head's question does not look at the needles, the other's does, and the
#: needle tokens of later blocks need them under both heads.
lse_max_scores = max_share(lse_scores)


def rownorm_scores(k_block: torch.Tensor, probes: torch.Tensor, scale: float) -> torch.Tensor:
    """s[t, h] = log sum over the probe tokens j and the group's heads g of
    softmax_{t' in block}(scale * q[j, g] . k[t', h]) at t: each probe row's attention
    within the block counts once, whatever its logit scale (SnapKV-like; BENCHMARKS.md
    section 11). Per KV head, sum_t exp(s[t, h]) = the number of probe rows; the normaliser
    is over k_block, which is one whole block. `ops.lse_score.rownorm_scores`: on CUDA, where
    triton imports, two calls of the fused lse kernel (each row's log-sum-exp over the block,
    then each key's score with it as a per-row offset; no logits in memory); elsewhere its
    torch path over key chunks. Shapes as `Scorer`."""
    from ...ops import lse_score
    return lse_score.rownorm_scores(probes, k_block, scale).permute(1, 2, 0)  # [b, hk, l], no copy


#: `rownorm` shared by the KV heads as `lse-max` shares `lse` (`max_share`).
rownorm_max_scores = max_share(rownorm_scores)


#: name -> scorer. "lse" is SpavaConfig's default (SPAVA.md section 6); "mean" is the
#: reference's rule; "lse-max" is `lse` shared by the KV heads; "rownorm" normalises each
#: probe row over the block; "rownorm-max" is `rownorm` shared by the KV heads.
SCORERS: Dict[str, Scorer] = {"lse": lse_scores, "mean": mean_scores, "lse-max": lse_max_scores,
                              "rownorm": rownorm_scores, "rownorm-max": rownorm_max_scores}
DEFAULT_SELECTION = "lse"


def register_scorer(name: str, fn: Scorer, *, replace: bool = False) -> Scorer:
    """Add the score `name` (usable as SpavaConfig(selection=name), --spava-selection name
    and the variant spava-selection-name). Re-registering a name raises unless replace."""
    if not isinstance(name, str) or not name or "-no-" in f"-{name}-" or not callable(fn):
        raise ValueError(f"register_scorer: needs a non-empty name without '-no-' and a callable, "
                         f"got {name!r}, {fn!r}")
    if name in SCORERS and not replace and SCORERS[name] is not fn:
        raise ValueError(f"selection score {name!r} is already registered")
    SCORERS[name] = fn
    return fn


def unregister_scorer(name: str) -> None:
    """Remove `name` (no error if absent). The default cannot be removed."""
    if name == DEFAULT_SELECTION:
        raise ValueError(f"the default selection score {name!r} cannot be removed")
    SCORERS.pop(name, None)


@contextlib.contextmanager
def registered_scorer(name: str, fn: Scorer) -> Iterator[Scorer]:
    """Register `fn` as `name` for the duration of a `with` block (tests, experiments)."""
    register_scorer(name, fn)
    try:
        yield fn
    finally:
        unregister_scorer(name)


def get_scorer(name: str) -> Scorer:
    """The scorer `name`; ValueError listing the choices."""
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selection score {name!r}; choose from {sorted(SCORERS)}") from None


def _scores(k_run: torch.Tensor, probes: torch.Tensor, scale: float, selection: str) -> torch.Tensor:
    """The raw `selection` scores of k_run [l, b, hk, d]: [b, hk, l] float32 (shape checked)."""
    scores = get_scorer(selection)(k_run, probes, scale)
    expected = (k_run.shape[1], k_run.shape[2], k_run.shape[0])
    if tuple(scores.shape) != expected:
        raise ValueError(f"selection score {selection!r} returned shape {tuple(scores.shape)}, "
                         f"expected [b, hk, l] = {list(expected)}")
    return scores.float()


def _pool(scores: torch.Tensor, n: int, pool_kernel: int) -> torch.Tensor:
    """scores [b, hk, n * l] of n blocks of l keys -> [b, hk, n, l]: a max-pool of width
    pool_kernel (stride 1, same padding) along t within each block (one call for all)."""
    b, hk, length = scores.shape
    pooled = F.max_pool1d(scores.reshape(b, hk * n, length // n), pool_kernel, stride=1,
                          padding=pool_kernel // 2)
    return pooled.view(b, hk, n, length // n)


def selection_scores(k_block: torch.Tensor, probes: torch.Tensor, pool_kernel: int, scale: float,
                     selection: str = DEFAULT_SELECTION) -> torch.Tensor:
    """The `selection` scores of the block's keys in float32, smoothed by a max-pool of
    width `pool_kernel` (stride 1, same padding) along t within this block.

    k_block: [l, b, hk, d]; probes: [m, b, hq, d] (the query-side queries). Returns
    [b, hk, l] float32."""
    return _pool(_scores(k_block, probes, scale, selection), 1, pool_kernel)[:, :, 0]


def select_passing(k_block: torch.Tensor, v_block: torch.Tensor, probes: torch.Tensor,
                   budget: int, pool_kernel: int, scale: float, selection: str = DEFAULT_SELECTION,
                   *, report: Optional[dict] = None) -> torch.Tensor:
    """The passing block of one virtual block: per (batch, KV head), the `budget` tokens
    with the highest smoothed scores (`selection_scores`). Different heads keep different
    tokens.

    k_block, v_block: [l, b, hk, d] with l >= budget; probes: [m, b, hq, d].
    Returns [budget, b, hk, 2d]: selected keys and values packed along the last dim
    (one tensor, so one collective moves both). Token order within it is unspecified;
    passing keys are fully visible, so it does not matter.

    report: fields (e.g. block, block_range) to publish to the `record_selection`
    subscribers, with the indices and scores; ignored when nobody listens.
    """
    return select_passing_blocks(k_block, v_block, [(0, k_block.shape[0])], probes, budget, pool_kernel,
                                 scale, selection, reports=[report])[0]


def select_passing_blocks(k: torch.Tensor, v: torch.Tensor, bounds: Sequence[Tuple[int, int]],
                          probes: torch.Tensor, budget: int, pool_kernel: int, scale: float,
                          selection: str = DEFAULT_SELECTION, *,
                          reports: Optional[Sequence[Optional[dict]]] = None) -> List[torch.Tensor]:
    """The passing blocks of several blocks of one sequence: for each (lo, hi) in `bounds`,
    exactly what `select_passing(k[lo:hi], v[lo:hi], ...)` gives.

    k, v: [s, b, hk, d]; bounds: blocks as row ranges of k, each with hi - lo >= budget;
    probes: [m, b, hq, d]. Returns one [budget, b, hk, 2d] tensor per block (contiguous).
    reports: one `select_passing` report (or None) per block.

    Where the blocks follow each other and are equally long (a rank's two blocks, in its
    local order), the score is still one call per block (the same call, so the same scores,
    as alone), but the max-pool, the top-k and the gather are one call each for all the
    blocks: fewer launches and less host work. Otherwise each block is selected alone.
    """
    bounds = [(int(lo), int(hi)) for lo, hi in bounds]
    reports = list(reports) if reports is not None else [None] * len(bounds)
    if len(reports) != len(bounds):
        raise ValueError(f"select_passing_blocks: {len(reports)} reports for {len(bounds)} blocks")
    if not bounds:
        return []
    if len({hi - lo for lo, hi in bounds}) > 1 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        return [_select_run(k[lo:hi], v[lo:hi], 1, probes, budget, pool_kernel, scale, selection, [r])[0]
                for (lo, hi), r in zip(bounds, reports)]
    lo, hi = bounds[0][0], bounds[-1][1]
    return _select_run(k[lo:hi], v[lo:hi], len(bounds), probes, budget, pool_kernel, scale, selection, reports)


def _select_run(k_run: torch.Tensor, v_run: torch.Tensor, n: int, probes: torch.Tensor, budget: int,
                pool_kernel: int, scale: float, selection: str, reports: Sequence[Optional[dict]]
                ) -> List[torch.Tensor]:
    """k_run, v_run: [n * l, b, hk, d], n blocks of l keys one after the other. One score
    call per block; one pool, top-k and gather for all n (per-row operations: each block's
    result is the one it gets alone). Returns n tensors [budget, b, hk, 2d]."""
    length, b, hk, d = k_run.shape
    l = length // n
    if l * n != length or l < budget:
        raise ValueError(f"selection: {length} keys are not {n} blocks of at least {budget} keys")
    scores = [_scores(k_run[j * l:(j + 1) * l], probes, scale, selection) for j in range(n)]
    pooled = _pool(scores[0] if n == 1 else torch.cat(scores, dim=-1), n, pool_kernel)  # [b, hk, n, l]
    index = pooled.topk(budget, dim=-1, sorted=False).indices  # [b, hk, n, budget]
    if _SUBSCRIBERS:
        for j, report in enumerate(reports):
            if report is not None:
                publish(dict(report, kind="block", selection=selection, indices=index[:, :, j].contiguous(),
                             scores=pooled[:, :, j].contiguous(), keys=k_run[j * l:(j + 1) * l],
                             probes=probes, scale=scale, layer=current_layer()))
    # one gather per tensor: the blocks as a leading dim (splitting dim 0 is always a view)
    idx = index.permute(2, 3, 0, 1).unsqueeze(-1).expand(-1, -1, -1, -1, d)  # [n, budget, b, hk, d]
    kv = torch.cat([k_run.view(n, l, b, hk, d).gather(1, idx), v_run.view(n, l, b, hk, d).gather(1, idx)],
                   dim=-1)
    return list(kv.unbind(0))


def gather_top(k_block: torch.Tensor, v_block: torch.Tensor, scores: torch.Tensor,
               budget: int) -> torch.Tensor:
    """Per (batch, KV head), the keys and values of the `budget` highest `scores`.

    k_block, v_block: [l, b, hk, d]; scores: [b, hk, l]. Returns [budget, b, hk, 2d] (keys |
    values), in unspecified token order."""
    return gather_index(k_block, v_block, scores.topk(budget, dim=-1, sorted=False).indices)


def gather_index(k_block: torch.Tensor, v_block: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """k_block, v_block: [l, b, hk, d]; index: [b, hk, n] token positions in the block.
    Returns [n, b, hk, 2d] (keys | values)."""
    index = index.permute(2, 0, 1).unsqueeze(-1).expand(-1, -1, -1, k_block.shape[-1])
    return torch.cat([k_block.gather(0, index), v_block.gather(0, index)], dim=-1)


# ---- the selection hook ------------------------------------------------------------------

_SUBSCRIBERS: List[Callable[[dict], None]] = []
_LAYER: List[Optional[int]] = [None]


def listening() -> bool:
    """Whether anybody subscribes to selection reports (callers skip building them if not)."""
    return bool(_SUBSCRIBERS)


def publish(event: dict) -> None:
    """Send `event` to every subscriber."""
    for fn in list(_SUBSCRIBERS):
        fn(event)


@contextlib.contextmanager
def subscribe(fn: Callable[[dict], None]) -> Iterator[None]:
    """Call fn(event) for every selection event inside the `with` block."""
    _SUBSCRIBERS.append(fn)
    try:
        yield
    finally:
        _SUBSCRIBERS.remove(fn)


@contextlib.contextmanager
def record_selection() -> Iterator[List[dict]]:
    """Collect the selection events of every Spava layer run inside the `with` block:

        with record_selection() as events:
            model(...)

    kind "block" (one per selected block, per rank): layer (0-based decoder layer when run
    inside SpavaCoreAttention, else None), block (virtual block index), block_range (its
    [lo, hi) in the original token order), selection (the score's name), indices [b, hk,
    budget] (positions within the block of the kept keys, per KV head), scores [b, hk, l]
    (the pooled scores), keys [l, b, hk, d] and probes [m, b, hq, d] (the inputs), scale.
    kind "query" (one per layer, per rank, when the layer has query rows): layer, lse
    [lq, b, hq] float32 (the query rows' exact log-sum-exp over the whole sequence), scale.
    Tensors are the layer's own (not copies): read them, do not modify them."""
    events: List[dict] = []
    with subscribe(events.append):
        yield events


def current_layer() -> Optional[int]:
    """The layer `at_layer` set (None outside one, or when nobody listens)."""
    return _LAYER[0]


@contextlib.contextmanager
def at_layer(layer: Optional[int]) -> Iterator[None]:
    """Tag the selection events inside the block with `layer` (SpavaCoreAttention does)."""
    if not _SUBSCRIBERS:
        yield
        return
    before, _LAYER[0] = _LAYER[0], layer
    try:
        yield
    finally:
        _LAYER[0] = before


# ---- measured recall ---------------------------------------------------------------------

def _row_lse(keys: torch.Tensor, grouped: torch.Tensor, scale: float) -> torch.Tensor:
    """keys [b, hk, l, d] float32, grouped [b, hk, R, d] float32 -> [b, hk, R]: each probe
    row's log-sum-exp of scale * q . k over the l keys (key chunks of bounded memory)."""
    b, hk, r, _ = grouped.shape
    step = max(1, _LOGITS_PER_CHUNK // max(1, b * hk * r))
    probes_t = grouped.transpose(-1, -2) * scale  # [b, hk, d, R]
    parts = [torch.logsumexp(torch.matmul(keys[:, :, t:t + step], probes_t), dim=2)
             for t in range(0, keys.shape[2], step)]
    return torch.logsumexp(torch.stack(parts), dim=0)


def block_row_mass(event: dict):
    """For a "block" event: (lse over the kept keys, lse over all the block's keys), each
    [b, hk, R] float32, per probe row (R = probe tokens x GQA group, token-major) of
    scale * q . k: the log of each row's unnormalised attention mass on those keys."""
    keys = event["keys"].permute(1, 2, 0, 3).float()  # [b, hk, l, d]
    grouped = _grouped(event["probes"], keys.shape[1])
    index = event["indices"]
    kept = keys.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    return _row_lse(kept, grouped, event["scale"]), _row_lse(keys, grouped, event["scale"])


@contextlib.contextmanager
def measure_recall() -> Iterator[Dict[Optional[int], List[float]]]:
    """Measured recall of the selections inside the `with` block, per layer:

        with measure_recall() as recall:
            model(...)
        recall  # {layer: [sum over (block, batch, KV head) of the share, their count]}

    For each selected block and KV head, the share of the question's exact attention mass on
    the block's keys that the kept keys carry: sum over the query rows i and the group's
    heads g of p[i, g](kept) / the same over the whole block, with p the exact attention
    probabilities of the query rows over the whole sequence (their log-sum-exp comes from
    the layer's "query" event). Mean per layer = sum / count; sums of several ranks add.
    Only passes with query rows (fused query) are measured."""
    sums: Dict[Optional[int], List[float]] = {}
    pending: Dict[tuple, list] = {}

    def on(event: dict) -> None:
        key = (event["layer"], event.get("rank"))
        if event["kind"] == "block":
            pending.setdefault(key, []).append(block_row_mass(event))
        elif event["kind"] == "query":
            lse = event["lse"].float()  # [lq, b, hq]
            for kept, whole in pending.pop(key, []):
                hk = kept.shape[1]
                rows = lse.reshape(lse.shape[0], lse.shape[1], hk, -1, ).permute(1, 2, 0, 3).reshape(kept.shape)
                block = torch.exp(whole - rows).sum(-1)
                share = torch.where(block > 0, torch.exp(kept - rows).sum(-1) / block.clamp_min(1e-38),
                                    torch.ones_like(block))
                acc = sums.setdefault(event["layer"], [0.0, 0])
                acc[0] += float(share.sum())
                acc[1] += share.numel()

    with subscribe(on):
        yield sums
