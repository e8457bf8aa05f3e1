"""InternVL3 weights: HF names and layouts <-> this project's megatron-core model.

Pure reshuffles, no arithmetic, so a round trip is bit-exact:
  vision attention.{q,k,v}_proj -> attention.qkv, rows grouped per head [q_h | k_h | v_h]
  LLM q/k/v_proj -> language_model ... linear_qkv, grouped per KV group [q of group g | k_g | v_g]
  LLM gate/up_proj -> linear_fc1 = [gate; up]
  embed_tokens, lm_head [vocab, H] -> [padded vocab, H] with zero rows (cfg.padded_vocab_size)
Everything else keeps HF's name (vision_tower.*, multi_modal_projector.*) or maps one to
one (norms, o_proj, down_proj). The language model's part is `common.hf_lm` (shared with
Qwen2.5-VL). Megatron names come out in the local layer layout; for a Transformer Engine
model `common.checkpoint_io.to_model_layout` renames the norms (fused into linear_qkv /
linear_fc1), and `megatron_to_hf` accepts either layout.

HF names are accepted in both layouts of transformers 5.x InternVLForConditionalGeneration:
on disk (what save_pretrained and the OpenGVLab/InternVL3-*-hf checkpoints hold)
  vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.weight
and in memory (the model's state_dict)
  model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
and written in the on-disk layout. With tied embeddings (the top-level
tie_word_embeddings, transformers' rule) the checkpoint's lm_head, if any, is not used.
"""

from __future__ import annotations

import re
from typing import List, Tuple

import torch
from torch import Tensor

from ..common import hf_lm
from ..common.hf_lm import StreamingConverter, layer_to_hf, tp_patterns
from .config import InternVL3Config

LM = "language_model."
_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_MLAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")
_VQKV = re.compile(r"^(vision_tower\.encoder\.layer\.\d+\.attention\.)([qkv])_proj\.(weight|bias)$")
_SIMPLE_TOP = {
    "language_model.model.embed_tokens.weight": LM + "embedding.word_embeddings.weight",
    "language_model.model.norm.weight": LM + "decoder.final_layernorm.weight",
    "language_model.lm_head.weight": LM + "output_layer.weight",
}


def normalize_hf_name(name: str) -> str:
    """In-memory HF names (transformers 5.x) to the on-disk layout."""
    for prefix in ("model.vision_tower.", "model.multi_modal_projector."):
        if name.startswith(prefix):
            return name[len("model."):]
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return name


def _vision_qkv_to_heads(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Three [D, ...] -> [3D, ...] grouped per head: [q_h | k_h | v_h] for each head h."""
    t = torch.stack([q, k, v])  # [3, D, ...]
    rest = q.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest).contiguous()


def _vision_qkv_from_heads(t: Tensor, heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    rest = t.shape[1:]
    parts = t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(3, -1, *rest)
    return tuple(p.contiguous() for p in parts)


def _pad_vocab(t: Tensor, cfg: InternVL3Config) -> Tensor:
    if t.shape[0] != cfg.vocab_size:
        raise ValueError(f"vocabulary tensor with {t.shape[0]} rows for vocab_size {cfg.vocab_size}")
    return torch.cat([t, t.new_zeros(cfg.padded_vocab_size - t.shape[0], *t.shape[1:])])


class HFToMegatron(StreamingConverter):
    """Streaming HF -> megatron name/layout conversion. feed() returns the megatron
    (name, tensor) pairs completed by this tensor; finish() checks nothing is left over."""

    def feed(self, name: str, tensor: Tensor) -> List[Tuple[str, Tensor]]:
        cfg = self.cfg
        name = normalize_hf_name(name)
        m = _VQKV.match(name)
        if m:
            prefix, part, kind = m.groups()
            got = self._join(prefix + kind, part, tensor, ("q", "k", "v"))
            if not got:
                return []
            joined = _vision_qkv_to_heads(got["q"], got["k"], got["v"], cfg.vision.num_heads)
            return [(f"{prefix}qkv.{kind}", joined)]
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return [(name, tensor)]
        if name in _SIMPLE_TOP:
            if name == "language_model.lm_head.weight" and cfg.tie_word_embeddings:
                return []  # tied: the output layer is the embedding
            if name != "language_model.model.norm.weight":
                tensor = _pad_vocab(tensor, cfg)
            return [(_SIMPLE_TOP[name], tensor)]
        m = _LAYER.match(name)
        if not m:
            raise KeyError(f"unexpected tensor in an InternVL checkpoint: {name}")
        layer, suffix = m.groups()
        out = self.layer_from_hf(layer, suffix, tensor, f"{LM}decoder.layers.{layer}.")
        if out is None:
            raise KeyError(f"unexpected tensor in an InternVL checkpoint: {name}")
        return out


def megatron_to_hf(name: str, tensor: Tensor, cfg: InternVL3Config) -> List[Tuple[str, Tensor]]:
    """One global megatron tensor (local or TE key layout) -> its HF tensors (on-disk names)."""
    from ...specs import te_to_local_key
    name = te_to_local_key(name)
    m = re.match(r"^(vision_tower\.encoder\.layer\.\d+\.attention\.)qkv\.(weight|bias)$", name)
    if m:
        q, k, v = _vision_qkv_from_heads(tensor, cfg.vision.num_heads)
        return [(f"{m.group(1)}{p}_proj.{m.group(2)}", t) for p, t in zip("qkv", (q, k, v))]
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return [(name, tensor)]
    for hf, meg in _SIMPLE_TOP.items():
        if name == meg:
            if not meg.endswith("final_layernorm.weight"):
                tensor = tensor[: cfg.vocab_size]  # drop the padding rows
            out = [(hf, tensor)]
            if meg.endswith("word_embeddings.weight") and cfg.tie_word_embeddings:
                # a tied source may or may not store lm_head: the converter keeps what it had
                out.append(("language_model.lm_head.weight", tensor))
            return out
    m = _MLAYER.match(name)
    if not m:
        raise KeyError(f"unexpected megatron tensor: {name}")
    layer, suffix = m.groups()
    out = layer_to_hf(suffix, tensor, cfg, f"language_model.model.layers.{layer}.")
    if out is None:
        raise KeyError(f"unexpected megatron tensor: {name}")
    return out


_COLUMN, _ROW = tp_patterns(
    column=r"attention\.qkv\.(weight|bias)|encoder\.layer\.\d+\.mlp\.fc1\.(weight|bias)|"
           r"multi_modal_projector\.linear_1\.(weight|bias)",
    row=r"attention\.projection_layer\.weight|encoder\.layer\.\d+\.mlp\.fc2\.weight|"
        r"multi_modal_projector\.linear_2\.weight")


def shard_for_tp(name: str, tensor: Tensor, rank: int, size: int, cfg: InternVL3Config) -> Tensor:
    """The slice of a global megatron tensor that tensor-parallel `rank` of `size` holds
    (`hf_lm.shard_for_tp`: norms, layer scales, the ViT's embeddings and row-parallel biases
    are replicated)."""
    return hf_lm.shard_for_tp(name, tensor, rank, size, _COLUMN, _ROW)
