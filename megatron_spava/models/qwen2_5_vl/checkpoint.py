"""Qwen2.5-VL weights: HF names and layouts <-> this project's megatron-core model.

Pure reshuffles, no arithmetic, so a round trip is bit-exact:
  q/k/v_proj  -> language_model ... linear_qkv, grouped per KV group [q of group g | k_g | v_g]
  gate/up_proj -> linear_fc1 = [gate; up]
  vision attn.qkv [all q | all k | all v] -> per head [q_h | k_h | v_h]
HF names are accepted in both layouts (on disk: visual.*, model.*, lm_head; in memory:
model.visual.*, model.language_model.*, lm_head) and written in the on-disk layout.
Megatron names are produced in the local backend's layout (input_layernorm,
pre_mlp_layernorm); `common.checkpoint_io.to_model_layout` renames them for a Transformer
Engine model, whose norms live in linear_qkv / linear_fc1 (`layer_norm_weight`).
`megatron_to_hf` accepts either layout. The language model's part of the mapping is
`common.hf_lm` (shared with InternVL3).

`HFToMegatron.feed` streams: it takes one HF tensor at a time and emits megatron tensors
as soon as all their parts have arrived (`common.checkpoint_io.load_hf_into_model` drives it). `shard_for_tp` cuts a global megatron tensor
for one tensor-parallel rank; megatron-core's dist checkpointing does the same from
the model's own sharded_state_dict.
"""

from __future__ import annotations

import re
from typing import List, Tuple

from torch import Tensor

from ..common import hf_lm
from ..common.hf_lm import StreamingConverter, layer_to_hf, tp_patterns
from .config import Qwen25VLConfig

LM = "language_model."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MLAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


def normalize_hf_name(name: str) -> str:
    """In-memory HF names (transformers >= 4.52) to the on-disk layout."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def _vision_qkv_to_heads(t: Tensor, heads: int) -> Tensor:
    """[3*D, ...] as [3, H, hd, ...] -> [H, 3, hd, ...] flattened."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def _vision_qkv_from_heads(t: Tensor, heads: int) -> Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


_SIMPLE_TOP = {
    "model.embed_tokens.weight": LM + "embedding.word_embeddings.weight",
    "model.norm.weight": LM + "decoder.final_layernorm.weight",
    "lm_head.weight": LM + "output_layer.weight",
}


class HFToMegatron(StreamingConverter):
    """Streaming HF -> megatron name/layout conversion. feed() returns the megatron
    (name, tensor) pairs completed by this tensor; finish() checks nothing is left over."""

    def feed(self, name: str, tensor: Tensor) -> List[Tuple[str, Tensor]]:
        cfg = self.cfg
        name = normalize_hf_name(name)
        if name.startswith("visual."):
            if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
                tensor = _vision_qkv_to_heads(tensor, cfg.vision.num_heads)
            return [(name, tensor)]
        if name in _SIMPLE_TOP:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                return []  # tied: the output layer is the embedding
            return [(_SIMPLE_TOP[name], tensor)]
        m = _LAYER.match(name)
        if not m:
            raise KeyError(f"unexpected tensor in a Qwen2.5-VL checkpoint: {name}")
        layer, suffix = m.groups()
        out = self.layer_from_hf(layer, suffix, tensor, f"{LM}decoder.layers.{layer}.")
        if out is None:
            raise KeyError(f"unexpected tensor in a Qwen2.5-VL checkpoint: {name}")
        return out


def megatron_to_hf(name: str, tensor: Tensor, cfg: Qwen25VLConfig) -> List[Tuple[str, Tensor]]:
    """One global megatron tensor (local or TE key layout) -> its HF tensors (on-disk names)."""
    from ...specs import te_to_local_key
    name = te_to_local_key(name)
    if name.startswith("visual."):
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            tensor = _vision_qkv_from_heads(tensor, cfg.vision.num_heads)
        return [(name, tensor)]
    for hf, meg in _SIMPLE_TOP.items():
        if name == meg:
            out = [(hf, tensor)]
            if hf == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
                out.append(("lm_head.weight", tensor))  # HF checkpoints of tied models keep lm_head
            return out
    m = _MLAYER.match(name)
    if not m:
        raise KeyError(f"unexpected megatron tensor: {name}")
    layer, suffix = m.groups()
    out = layer_to_hf(suffix, tensor, cfg, f"model.layers.{layer}.")
    if out is None:
        raise KeyError(f"unexpected megatron tensor: {name}")
    return out


_COLUMN, _ROW = tp_patterns(
    column=r"attn\.qkv\.(weight|bias)|(gate|up)_proj\.(weight|bias)|merger\.mlp\.0\.(weight|bias)",
    row=r"attn\.proj\.weight|down_proj\.weight|merger\.mlp\.2\.weight")


def shard_for_tp(name: str, tensor: Tensor, rank: int, size: int, cfg: Qwen25VLConfig) -> Tensor:
    """The slice of a global megatron tensor that tensor-parallel `rank` of `size` holds
    (`hf_lm.shard_for_tp`: norms, row-parallel biases and the patch embedding are replicated)."""
    return hf_lm.shard_for_tp(name, tensor, rank, size, _COLUMN, _ROW)
