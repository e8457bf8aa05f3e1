"""Building blocks both vision encoders use (Qwen2.5-VL's and InternVL3's InternViT).

  column(layer, x) / row(layer, x)   megatron-core Column/RowParallelLinear parameters run as
                                     one GEMM each, bias in the epilogue
  Container                          a named group of submodules that checkpoints as TP-sharded
  vision_tp_config(vision, tp, ...)  the TransformerConfig the vision linears are built with
  rms_norm                           HF's RMSNorm (float32 math, cast back, then scaled)
  segment_groups / segment_attention bidirectional attention within segments (windows, frames),
                                     batched by segment length

The encoders call the linears' weights directly instead of megatron-core's linear forward,
which adds the bias in a second elementwise pass (BENCHMARKS.md section 7).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ...ops.attention import attend


def vision_tp_config(vision, tp: int, dtype: torch.dtype, cpu_init: bool,
                     init: bool) -> TransformerConfig:
    """The TransformerConfig of a vision encoder's TP linears. vision: its config (depth,
    hidden_size, num_heads)."""
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, num_attention_heads=vision.num_heads,
        tensor_model_parallel_size=tp, use_cpu_initialization=cpu_init, params_dtype=dtype,
        perform_initialization=init,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, hidden_dropout=0.0,
        attention_dropout=0.0, gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False)


def column(layer, x: Tensor) -> Tensor:
    """A ColumnParallelLinear (gather_output=False) as one GEMM, bias in its epilogue:
    x [N, in] -> [N, out / tp]."""
    return F.linear(x, layer.weight, layer.bias)


def row(layer, x: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """A RowParallelLinear (input_is_parallel) x [N, in / tp] -> [N, out]: one GEMM with the
    bias in its epilogue without TP; under TP, partial products summed over the TP group,
    then the bias. `weight` replaces layer.weight (a padded copy)."""
    weight = layer.weight if weight is None else weight
    if layer.tp_group is None or layer.tp_group.size() == 1:
        return F.linear(x, weight, layer.bias)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(
        F.linear(x, weight), group=layer.tp_group) + layer.bias


class Container(MegatronModule):
    """A named group of submodules. Being a MegatronModule, its sharded_state_dict recurses
    into the tensor-parallel linears (a plain nn.Module would be checkpointed as replicated)."""

    def __init__(self, config: TransformerConfig, **children: nn.Module):
        super().__init__(config=config)
        for name, child in children.items():
            self.add_module(name, child)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Qwen2's RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass(frozen=True)
class SegmentGroup:
    """Segments of one length L: either `count` back-to-back segments from row `start`
    (a slab, attended through a view) or arbitrary ones, `rows` [n_segments, L]
    (attended through a gather and a scatter)."""

    length: int
    start: int = 0
    count: int = 0
    rows: Optional[Tensor] = None


def segment_groups(lengths: Sequence[int], device) -> List[SegmentGroup]:
    """The consecutive segments of `lengths`, grouped by length. Built once per forward and
    shared by every block. Equal-length segments that tile a contiguous row range (uniform
    windows; whole frames) become slabs."""
    starts = [0, *itertools.accumulate(lengths[:-1])]
    by_len = {}
    for start, length in zip(starts, lengths):
        by_len.setdefault(length, []).append(start)
    groups = []
    for length, group in by_len.items():
        if group == list(range(group[0], group[0] + len(group) * length, length)):
            groups.append(SegmentGroup(length, start=group[0], count=len(group)))
        else:
            rows = torch.tensor(group)[:, None] + torch.arange(length)[None, :]
            groups.append(SegmentGroup(length, rows=rows.to(device)))
    return groups


def segment_attention(q: Tensor, k: Tensor, v: Tensor, groups: Sequence[SegmentGroup],
                      scale: float) -> Tensor:
    """Bidirectional attention within segments.

    q, k, v: [N, heads, d] (strided views allowed); groups: from `segment_groups`.
    Segments of equal length are batched into one kernel call ([L, n_segments, heads, d]).
    Returns [N, heads, d].
    """
    g0 = groups[0]
    whole = len(groups) == 1 and g0.rows is None and g0.count * g0.length == q.shape[0]
    out = None if whole else torch.empty_like(q)  # one slab over every row: no copies at all
    for g in groups:
        if g.rows is None:  # a slab: views in, a view out
            rows = slice(g.start, g.start + g.count * g.length)
            take = lambda t: t[rows].view(g.count, g.length, *t.shape[1:])  # noqa: E731
        else:
            take = lambda t: t[g.rows]  # noqa: E731
        o = attend(*(take(t).transpose(0, 1) for t in (q, k, v)), causal=False,
                   scale=scale)[0].transpose(0, 1)  # [n_segments, L, heads, d]
        if whole:
            return o.reshape(q.shape)
        if g.rows is None:
            take(out).copy_(o)
        else:
            out[g.rows] = o
    return out
