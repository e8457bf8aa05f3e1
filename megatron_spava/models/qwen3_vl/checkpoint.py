"""Qwen3-VL weights: HF names and layouts <-> this project's megatron-core model.

Pure reshuffles, no arithmetic, so a round trip is bit-exact:
  q/k/v_proj   -> language_model ... linear_qkv, grouped per KV group (`common.hf_lm`)
  gate/up_proj -> linear_fc1 = [gate; up]
  self_attn.q_norm / k_norm -> self_attention.q_layernorm / k_layernorm (QK-norm)
  vision attn.qkv [all q | all k | all v] -> per head [q_h | k_h | v_h]
  everything else of the vision encoder keeps HF's name (model.visual.X <-> visual.X)
  MoE: mlp.gate -> mlp.router; mlp.experts.gate_up_proj [E, 2F, D] (transformers 5.x) ->
  mlp.experts.local_experts.e.linear_fc1 = its [gate; up] rows; mlp.experts.down_proj
  [E, D, F] -> local_experts.e.linear_fc2 (megatron -> HF stacks the E experts back: the
  converter keeps the experts of a tensor until all have come)
HF names are accepted in the layout transformers 5.x saves (model.visual.*,
model.language_model.*, lm_head.weight) and in the older one (visual.*, model.*), and are
written in the 5.x layout (the released Qwen/Qwen3-VL-* checkpoints use it too).
Megatron names are produced in the local layer layout; `common.checkpoint_io.to_model_layout`
renames them for a Transformer Engine model. `megatron_to_hf` accepts either layout.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from ..common import hf_lm
from ..common.hf_lm import StreamingConverter, layer_to_hf
from .config import Qwen3VLConfig

LM = "language_model."
_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
_MLAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")
_QK_NORM = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
            "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}
_MOE = {"mlp.experts.gate_up_proj": "linear_fc1.weight", "mlp.experts.down_proj": "linear_fc2.weight"}
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_SIMPLE_TOP = {
    "model.language_model.embed_tokens.weight": LM + "embedding.word_embeddings.weight",
    "model.language_model.norm.weight": LM + "decoder.final_layernorm.weight",
    "lm_head.weight": LM + "output_layer.weight",
}


def normalize_hf_name(name: str) -> str:
    """Older on-disk names (visual.*, model.layers.*) to the transformers 5.x layout."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


def _vision_qkv(t: Tensor, heads: int, to_heads: bool) -> Tensor:
    """[3*D, ...] as [3, H, hd, ...] <-> [H, 3, hd, ...] (flattened either way)."""
    rest = t.shape[1:]
    shape = (3, heads, -1, *rest) if to_heads else (heads, 3, -1, *rest)
    return t.reshape(shape).transpose(0, 1).reshape(t.shape).contiguous()


class HFToMegatron(StreamingConverter):
    """Streaming HF -> megatron name/layout conversion. feed() returns the megatron
    (name, tensor) pairs completed by this tensor; finish() checks nothing is left over."""

    def feed(self, name: str, tensor: Tensor) -> List[Tuple[str, Tensor]]:
        cfg = self.cfg
        name = normalize_hf_name(name)
        if name.startswith("model.visual."):
            if re.search(r"attn\.qkv\.(weight|bias)$", name):
                tensor = _vision_qkv(tensor, cfg.vision.num_heads, to_heads=True)
            return [(name[len("model."):], tensor)]
        if name in _SIMPLE_TOP:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                return []  # tied: the output layer is the embedding
            return [(_SIMPLE_TOP[name], tensor)]
        m = _LAYER.match(name)
        if not m:
            raise KeyError(f"unexpected tensor in a Qwen3-VL checkpoint: {name}")
        layer, suffix = m.groups()
        prefix = f"{LM}decoder.layers.{layer}."
        if suffix in _QK_NORM:
            return [(prefix + _QK_NORM[suffix], tensor)]
        if suffix == "mlp.gate.weight":
            return [(prefix + "mlp.router.weight", tensor)]
        if suffix in _MOE:
            if tensor.shape[0] != cfg.num_experts:
                raise ValueError(f"{name}: {tensor.shape[0]} experts, the config says {cfg.num_experts}")
            return [(prefix + f"mlp.experts.local_experts.{e}.{_MOE[suffix]}", tensor[e].clone())
                    for e in range(cfg.num_experts)]
        out = self.layer_from_hf(layer, suffix, tensor, prefix)
        if out is None:
            raise KeyError(f"unexpected tensor in a Qwen3-VL checkpoint: {name}")
        return out


_PENDING_EXPERTS: Dict[str, Dict[int, Tensor]] = {}


def megatron_to_hf(name: str, tensor: Tensor, cfg: Qwen3VLConfig) -> List[Tuple[str, Tensor]]:
    """One global megatron tensor (local or TE key layout) -> its HF tensors (5.x names).
    An MoE expert's weight returns [] until the layer's last expert of that kind has come,
    then the stacked HF tensor [E, ...]."""
    from ...specs import te_to_local_key
    name = te_to_local_key(name)
    if name.startswith("visual."):
        if re.search(r"attn\.qkv\.(weight|bias)$", name):
            tensor = _vision_qkv(tensor, cfg.vision.num_heads, to_heads=False)
        return [("model." + name, tensor)]
    for hf, meg in _SIMPLE_TOP.items():
        if name == meg:
            out = [(hf, tensor)]
            if hf == "model.language_model.embed_tokens.weight" and cfg.tie_word_embeddings:
                out.append(("lm_head.weight", tensor))  # kept only if the source had it
            return out
    m = _MLAYER.match(name)
    if not m:
        raise KeyError(f"unexpected megatron tensor: {name}")
    layer, suffix = m.groups()
    prefix = f"model.language_model.layers.{layer}."
    for hf, meg in _QK_NORM.items():
        if suffix == meg:
            return [(prefix + hf, tensor)]
    if suffix == "mlp.router.weight":
        return [(prefix + "mlp.gate.weight", tensor)]
    expert = _EXPERT.match(suffix)
    if expert:
        hf = {v: k for k, v in _MOE.items()}[expert.group(2)]
        parts = _PENDING_EXPERTS.setdefault(prefix + hf, {})
        parts[int(expert.group(1))] = tensor
        if len(parts) < cfg.num_experts:
            return []
        del _PENDING_EXPERTS[prefix + hf]
        return [(prefix + hf, torch.stack([parts[e] for e in range(cfg.num_experts)]))]
    out = layer_to_hf(suffix, tensor, cfg, prefix)
    if out is None:
        raise KeyError(f"unexpected megatron tensor: {name}")
    return out


#: The vision encoder's column- and row-parallel weights (its names are HF's, so its MLPs'
#: linear_fc1 / linear_fc2 must not be read as the LLM's [gate; up] / down projections)
_V_COLUMN = re.compile(r"(attn\.qkv|linear_fc1)\.(weight|bias)$")
_V_ROW = re.compile(r"(attn\.proj|linear_fc2)\.weight$")
_COLUMN, _ROW = hf_lm.tp_patterns(column=r"$^", row=r"$^")  # the LLM's alone


def shard_for_tp(name: str, tensor: Tensor, rank: int, size: int, cfg: Qwen3VLConfig) -> Tensor:
    """The slice of a global megatron tensor that tensor-parallel `rank` of `size` holds.
    Vision: qkv and fc1 (weights and biases) split along dim 0, proj and fc2 weights along
    dim 1; norms, row biases, the patch and position embeddings replicated. The LLM:
    `hf_lm.shard_for_tp` (QK-norm weights, over head_dim, are replicated)."""
    if size == 1:
        return tensor
    if name.startswith("visual."):
        if _V_COLUMN.search(name):
            return tensor.chunk(size)[rank]
        if _V_ROW.search(name):
            return tensor.chunk(size, dim=1)[rank]
        return tensor
    return hf_lm.shard_for_tp(name, tensor, rank, size, _COLUMN, _ROW)
