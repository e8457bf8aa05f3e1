"""Megatron-Core modules: the context-parallel core attention and layout-aware RoPE.

`SpavaCoreAttention` is a drop-in `core_attention` for megatron-core's SelfAttention
(see `megatron_spava.specs`). It runs whichever registered algorithm the active
request's layout was planned for (`layout.algo`: full, ring, star, apb, spava, ...) over
the CP group of its `pg_collection`, and it composes with tensor parallelism because each TP rank attends
over its own heads: selection is per KV head, so the result does not depend on TP.

RoPE must see global positions. Megatron's rotary embeddings slice themselves for its
own ZigZag CP layout; `use_spava_rope(model)` swaps a GPTModel's rotary module for one
that reads each local token's global position from the active request (1-D RoPE) or
takes already-sharded 3-D M-RoPE position ids as they are, never slicing again.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
    RotaryEmbedding,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from . import profiling
from .algos import FullLayout, cp_attn_func
from .context import require_request
from .inference.decode import decode_attn_func
from .algos.spava import selection


def check_normalization(config, expected: Optional[str]) -> None:
    """The check `get_gpt_layer_spec("te", normalization=...)` defers to build time."""
    if expected is not None and config.normalization != expected:
        raise ValueError(
            f"the TE layer spec was asked for normalization={expected!r}, but "
            f"TransformerConfig.normalization is {config.normalization!r}: TE's fused norms read "
            f"the config, so set TransformerConfig(normalization={expected!r})")


class SpavaCoreAttention(MegatronModule):
    """Context-parallel core attention (Megatron's `core_attention` contract).

    Built by SelfAttention with Megatron's keywords; takes its CP group from
    `pg_collection.cp`. forward: query [sq, b, np/tp, hn], key/value [sk, b, ng/tp, hn]
    (post-RoPE, sq == sk == this rank's local length) -> [sq, b, np/tp * hn].
    `expected_normalization` is set by `get_gpt_layer_spec("te", normalization=...)`
    (TE's fused norms read the config; ValueError if it differs).
    The layout comes from `megatron_spava.context.current_request()`; without an active
    request it runs plain causal attention, which is only valid at CP size 1. A request
    with a KV cache makes the prefill store this rank's cache rows; a decode request
    attends its new tokens (one decoded token, or a whole query over a cached context)
    over the distributed cache (`inference.decode_attn_func`).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 expected_normalization: Optional[str] = None):
        super().__init__(config=config)
        check_normalization(config, expected_normalization)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SpavaCoreAttention is causal self-attention; got {attn_mask_type}")
        if attention_type != "self":
            raise ValueError(f"SpavaCoreAttention supports self-attention only, got {attention_type!r}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("SpavaCoreAttention is for prefill/inference: attention_dropout must be 0")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.layer_number = max(1, layer_number)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported with SpavaCoreAttention")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn]. The causal
        structure comes from the layout; `attention_mask` is not used."""
        if torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError("SpavaCoreAttention is forward-only (prefill and evaluation): its "
                               "collectives carry no gradients. Run the model under torch.no_grad()")
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SpavaCoreAttention supports neither attention_bias nor packed "
                             "sequences (THD); pass one request per forward")
        request = require_request(self.cp_group, "SpavaCoreAttention")
        if request is None:  # no context parallelism: plain causal attention
            layout, group = FullLayout.plan(context_len=query.shape[0], query_len=0), None
        else:
            layout, group = request.layout, self.cp_group
        with profiling.region("attention", query):
            if request is not None and request.decode:
                out = decode_attn_func(query, key, value, cache=request.cache,
                                       layer=self.layer_number, cp_group=group,
                                       softmax_scale=self.softmax_scale, kernel=layout.config.kernel)
            else:
                with selection.at_layer(self.layer_number - 1):  # tags selection reports
                    out = cp_attn_func(query, key, value, layout=layout, cp_group=group,
                                       softmax_scale=self.softmax_scale)
                if request is not None and request.cache is not None:
                    request.cache.store_prefill(self.layer_number, key, value)
        return out.reshape(out.shape[0], out.shape[1], -1)


class _NoCP:
    """Stand-in process group of size 1: tells Megatron's rotary code not to CP-slice."""

    @staticmethod
    def size() -> int:
        return 1


class SpavaRotaryEmbedding(RotaryEmbedding):
    """1-D RoPE at each local token's global position (from the active request).

    Called by GPTModel as rotary(max_seq_len, ...); returns [s_local, 1, 1, dim].
    Outside a request it is Megatron's RotaryEmbedding.
    """

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> Tensor:
        request = require_request(cp_group or self.cp_group, "SpavaRotaryEmbedding")
        if request is None:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        layout = request.layout
        positions = request.positions
        if positions is None:
            raise RuntimeError("the active request has no positions: pass positions= to "
                               "cp_request (get_batch_on_this_cp_rank returns them)")
        total = layout.total_len
        if request.decode:  # tokens after the prefill sit past the prompt (positions: a host tensor there)
            total = max(total, int(positions.max()) + 1)
        emb = self.get_emb(total, offset)  # [S, 1, 1, dim]
        return emb[positions.to(emb.device)]

    def at(self, positions: Tensor) -> Tensor:
        """RoPE [s, 1, 1, dim] at the global `positions` [s] (any order, any device; a host
        tensor avoids a device sync), without a request: for models that pass positions to
        their forward (InternVL3Model)."""
        emb = self.get_emb(int(positions.max()) + 1)
        return emb[positions.to(emb.device)]


class SpavaMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
    """3-D M-RoPE from position ids that are already this rank's ([3, b, s_local],
    gathered by the layout's indices): computed as given, never CP-sliced again."""

    def forward(self, position_ids: Tensor, mrope_section, cp_group=None) -> Tensor:
        return super().forward(position_ids, mrope_section, cp_group=_NoCP())


def use_spava_rope(model):
    """Make a megatron-core GPTModel's rotary embedding layout-aware, in place. Returns the
    model. Models without RoPE are returned unchanged."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if isinstance(rotary, MultimodalRotaryEmbedding):
        rotary.__class__ = SpavaMultimodalRotaryEmbedding
    elif type(rotary) is RotaryEmbedding:
        rotary.__class__ = SpavaRotaryEmbedding
    elif rotary is not None and not isinstance(rotary, (SpavaRotaryEmbedding,)):
        raise ValueError(f"use_spava_rope: unsupported rotary embedding {type(rotary).__name__}")
    return model
