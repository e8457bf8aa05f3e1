"""Qwen2.5-VL weights: HF names and layouts <-> this project's megatron-core model.

Pure reshuffles, no arithmetic, so a round trip is bit-exact:
  q/k/v_proj  -> language_model ... linear_qkv, grouped per KV group [q of group g | k_g | v_g]
  gate/up_proj -> linear_fc1 = [gate; up]
  vision attn.qkv [all q | all k | all v] -> per head [q_h | k_h | v_h]
HF names are accepted in both layouts (on disk: visual.*, model.*, lm_head; in memory:
model.visual.*, model.language_model.*, lm_head) and written in the on-disk layout.
Megatron names are produced in the local backend's layout (input_layernorm,
pre_mlp_layernorm); `specs.local_to_te_key` renames them for a Transformer Engine model,
whose norms live in linear_qkv / linear_fc1 (`layer_norm_weight`). `megatron_to_hf`
accepts either layout.

`HFToMegatron.feed` streams: it takes one HF tensor at a time and emits megatron tensors
as soon as all their parts have arrived (`convert.load_hf_into_model` drives it). `shard_for_tp` cuts a global megatron tensor
for one tensor-parallel rank; megatron-core's dist checkpointing does the same from
the model's own sharded_state_dict.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import Tensor

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


def _group_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: Qwen25VLConfig) -> Tensor:
    groups, per = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    rest = q.shape[1:]
    q = q.reshape(groups, per * cfg.head_dim, *rest)
    k = k.reshape(groups, cfg.head_dim, *rest)
    v = v.reshape(groups, cfg.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def _ungroup_qkv(t: Tensor, cfg: Qwen25VLConfig) -> Tuple[Tensor, Tensor, Tensor]:
    groups, per, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    rest = t.shape[1:]
    t = t.reshape(groups, (per + 2) * hd, *rest)
    q, k, v = t.split([per * hd, hd, hd], dim=1)
    return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))


_SIMPLE_LM = {  # HF suffix in a layer -> megatron suffix
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
_SIMPLE_TOP = {
    "model.embed_tokens.weight": LM + "embedding.word_embeddings.weight",
    "model.norm.weight": LM + "decoder.final_layernorm.weight",
    "lm_head.weight": LM + "output_layer.weight",
}


class HFToMegatron:
    """Streaming HF -> megatron name/layout conversion. feed() returns the megatron
    (name, tensor) pairs completed by this tensor; finish() checks nothing is left over."""

    def __init__(self, cfg: Qwen25VLConfig):
        self.cfg = cfg
        self.pending: Dict[str, Dict[str, Tensor]] = {}

    def _join(self, key: str, part: str, tensor: Tensor, parts: Tuple[str, ...]) -> Dict[str, Tensor]:
        got = self.pending.setdefault(key, {})
        got[part] = tensor
        if len(got) < len(parts):
            return {}
        del self.pending[key]
        return got

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
        prefix = f"{LM}decoder.layers.{layer}."
        if suffix in _SIMPLE_LM:
            return [(prefix + _SIMPLE_LM[suffix], tensor)]
        qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", suffix)
        if qkv:
            got = self._join(f"{layer}.qkv.{qkv.group(2)}", qkv.group(1), tensor, ("q", "k", "v"))
            if not got:
                return []
            joined = _group_qkv(got["q"], got["k"], got["v"], cfg)
            return [(prefix + f"self_attention.linear_qkv.{qkv.group(2)}", joined)]
        glu = re.match(r"mlp\.(gate|up)_proj\.weight$", suffix)
        if glu:
            got = self._join(f"{layer}.fc1", glu.group(1), tensor, ("gate", "up"))
            if not got:
                return []
            return [(prefix + "mlp.linear_fc1.weight", torch.cat([got["gate"], got["up"]]))]
        raise KeyError(f"unexpected tensor in a Qwen2.5-VL checkpoint: {name}")

    def finish(self) -> None:
        if self.pending:
            raise ValueError(f"incomplete checkpoint: missing parts of {sorted(self.pending)}")


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
    prefix = f"model.layers.{layer}."
    for hf, meg in _SIMPLE_LM.items():
        if suffix == meg:
            return [(prefix + hf, tensor)]
    qkv = re.match(r"self_attention\.linear_qkv\.(weight|bias)$", suffix)
    if qkv:
        q, k, v = _ungroup_qkv(tensor, cfg)
        kind = qkv.group(1)
        return [(prefix + f"self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2)
        return [(prefix + "mlp.gate_proj.weight", gate.contiguous()),
                (prefix + "mlp.up_proj.weight", up.contiguous())]
    raise KeyError(f"unexpected megatron tensor: {name}")


_COLUMN = re.compile(r"(linear_qkv\.(weight|bias)|word_embeddings\.weight|output_layer\.weight|"
                     r"attn\.qkv\.(weight|bias)|(gate|up)_proj\.(weight|bias)|merger\.mlp\.0\.(weight|bias))$")
_ROW = re.compile(r"(linear_proj\.weight|linear_fc2\.weight|attn\.proj\.weight|down_proj\.weight|"
                  r"merger\.mlp\.2\.weight)$")


def shard_for_tp(name: str, tensor: Tensor, rank: int, size: int, cfg: Qwen25VLConfig) -> Tensor:
    """The slice of a global megatron tensor that tensor-parallel `rank` of `size` holds.
    (linear_qkv is a contiguous split even when KV groups < TP: megatron-core gathers it
    back and picks the group.)"""
    if size == 1:
        return tensor
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank holds [gate_r; up_r]
        return torch.cat([part.chunk(size)[rank] for part in tensor.chunk(2)])
    if _COLUMN.search(name):
        return tensor.chunk(size)[rank]
    if _ROW.search(name):
        return tensor.chunk(size, dim=1)[rank]
    return tensor  # norms, row-parallel biases, patch embedding: replicated


def megatron_parameters(model) -> Dict[str, Tensor]:
    """The model's weights by name, in its backend's key layout (megatron-core's
    `_extra_state` entries left out)."""
    return dict(model.named_parameters())


def to_model_layout(name: str, model_names) -> str:
    """A megatron name from `HFToMegatron` (local layout) in the layout of a model whose
    parameter names are `model_names` (a set): renamed for a TE model, else unchanged."""
    from ...specs import local_to_te_key
    if name in model_names:
        return name
    return local_to_te_key(name)
