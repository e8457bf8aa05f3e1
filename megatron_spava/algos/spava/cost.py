"""What one Spava layer costs each rank (the roofline and the scaling model read it through
the registry entry's `cost`): the calls `spava_attn_func` makes, in its order, and the
collectives it issues, from the planned layout."""

from __future__ import annotations

from typing import List, Optional

from ...perf.work import Call, Comm, LayerRequest, LayerWork, Op, Shape, dense_split
from .layout import SpavaLayout


def spava_ops(layout: SpavaLayout, r: int, shape: Shape, tp: int, group: List[int],
              weights: Optional[Comm]) -> List[Op]:
    """The ops `spava_attn_func` runs on CP rank r (its order, its calls), plus the dense
    work around it and the next layer's weight gather."""
    W, cfg = layout.cp_size, layout.config
    seg = layout.segments(r)
    la, lq, lp = layout.anchor_len, layout.query_len, layout.passing_len
    hk, d, hf = shape.kv_heads / tp, shape.head_dim, 1.0 / tp
    hq = shape.heads / tp
    me = group[r]
    local = layout.local_len(r)
    pre = dense_split(shape)
    ops = [Op(comm=weights)] if weights is not None else []
    ops.append(Op(dense=pre * local, gemm_rows=local))
    gathers = []
    if lp:
        for j, _ in enumerate(seg.blocks):
            c = Comm("all_gather", group, int(lp * hk * 2 * d * shape.act_bytes), me, name=f"passing{j + 1}")
            ops.append(Op(comm=c))
            gathers.append(len([o for o in ops if o.comm is not None]) - 1)
            if not cfg.overlap:
                ops.append(Op(wait=gathers[-1]))
    s_lo, s_hi = seg.anchor_shard
    blocks_len = seg.blocks[-1][2] - seg.blocks[0][1]
    qcalls = [Call(lq, s_hi - s_lo, False, hf, "query"), Call(lq, blocks_len, False, hf, "query")]
    if r == 0:
        qcalls.append(Call(lq, lq, True, hf, "query"))
    ops.append(Op(calls=[c for c in qcalls if c.keys], merged=lq * hq * d * len(qcalls)))
    ops.append(Op(comm=Comm("all_gather", group, int(lq * hq * (d + 1) * 4), me, name="query")))
    qwork = len([o for o in ops if o.comm is not None]) - 1
    if not cfg.overlap:
        ops.append(Op(wait=qwork))
    if la:
        ops.append(Op(calls=[Call(la, la, True, hf, "anchor")]))
    ops.append(Op(calls=[Call(hi - lo, hi - lo, True, hf, "block") for _, lo, hi in seg.blocks]))
    nblk = len(seg.blocks)
    for j, (v, lo, hi) in enumerate(seg.blocks):
        if j < len(gathers) and cfg.overlap:
            ops.append(Op(wait=gathers[j]))
        keys = la + (r if j == 0 else (2 * W - 1 - r if nblk == 2 else r)) * lp
        if keys:
            ops.append(Op(calls=[Call(hi - lo, keys, False, hf, "passing")], merged=(hi - lo) * hq * d * 2))
    if cfg.overlap:
        ops.append(Op(wait=qwork))
    ops.append(Op(merged=lq * hq * d * W))
    ops.append(Op(dense=(1 - pre) * local, gemm_rows=local))
    return ops


def spava_cost(req: LayerRequest) -> LayerWork:
    """`Algorithm.cost` of spava, star and apb (req.config is already through the preset)."""
    layout = SpavaLayout.plan(context_len=req.context, query_len=req.query, cp_size=req.cp, config=req.config)
    ops = [spava_ops(layout, r, req.shape, req.tp, list(req.group), req.weights_of(r)) for r in range(req.cp)]
    return LayerWork(layout, tuple(layout.local_len(r) for r in range(req.cp)), ops)
