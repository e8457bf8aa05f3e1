"""The language model's weights, HF Qwen2 decoder layers <-> megatron-core GPT layers, for
every family whose LLM is a Qwen2 (Qwen2.5-VL, InternVL3). Pure reshuffles, no arithmetic:

  q/k/v_proj   -> linear_qkv, grouped per KV group [q of group g | k_g | v_g]
  gate/up_proj -> linear_fc1 = [gate; up]
  o_proj, down_proj, input_layernorm, post_attention_layernorm -> one to one

Megatron names are in the local backend's layout (input_layernorm, pre_mlp_layernorm);
`checkpoint_io.to_model_layout` renames them for a Transformer Engine model, and
`specs.te_to_local_key` brings TE names back before `layer_to_hf`. A family's streaming
converter derives from `StreamingConverter` and routes each decoder-layer tensor through
`layer_from_hf`; `shard_for_tp` cuts a global megatron tensor for one TP rank from the
family's column/row-parallel name patterns plus the LLM's.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

#: HF suffix in a decoder layer -> megatron suffix, for the weights that map one to one
SIMPLE_LM = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}

#: The LLM's column- and row-parallel megatron names (regex alternatives, matched at the end)
LM_COLUMN = r"linear_qkv\.(weight|bias)|word_embeddings\.weight|output_layer\.weight"
LM_ROW = r"linear_proj\.weight|linear_fc2\.weight"


def group_qkv(q: Tensor, k: Tensor, v: Tensor, cfg) -> Tensor:
    """HF's q [H*d, ...], k, v [Hk*d, ...] -> megatron's linear_qkv grouped per KV group.
    cfg: num_heads, num_kv_heads, head_dim."""
    groups, per = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    rest = q.shape[1:]
    q = q.reshape(groups, per * cfg.head_dim, *rest)
    k = k.reshape(groups, cfg.head_dim, *rest)
    v = v.reshape(groups, cfg.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def ungroup_qkv(t: Tensor, cfg) -> Tuple[Tensor, Tensor, Tensor]:
    """The inverse of `group_qkv`."""
    groups, per, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    rest = t.shape[1:]
    t = t.reshape(groups, (per + 2) * hd, *rest)
    q, k, v = t.split([per * hd, hd, hd], dim=1)
    return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))


class StreamingConverter:
    """Base of the streaming HF -> megatron converters: parts of one megatron tensor (q, k,
    v; gate, up) arrive one at a time and are joined once all are there."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pending: Dict[str, Dict[str, Tensor]] = {}

    def _join(self, key: str, part: str, tensor: Tensor, parts: Tuple[str, ...]) -> Dict[str, Tensor]:
        got = self.pending.setdefault(key, {})
        got[part] = tensor
        if len(got) < len(parts):
            return {}
        del self.pending[key]
        return got

    def layer_from_hf(self, layer: str, suffix: str, tensor: Tensor,
                      prefix: str) -> Optional[List[Tuple[str, Tensor]]]:
        """HF decoder layer `layer`'s tensor `suffix` -> the megatron (name, tensor) pairs it
        completes (names `prefix` + megatron suffix); None if `suffix` is not an LLM weight."""
        if suffix in SIMPLE_LM:
            return [(prefix + SIMPLE_LM[suffix], tensor)]
        qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", suffix)
        if qkv:
            got = self._join(f"{layer}.qkv.{qkv.group(2)}", qkv.group(1), tensor, ("q", "k", "v"))
            if not got:
                return []
            joined = group_qkv(got["q"], got["k"], got["v"], self.cfg)
            return [(prefix + f"self_attention.linear_qkv.{qkv.group(2)}", joined)]
        glu = re.match(r"mlp\.(gate|up)_proj\.weight$", suffix)
        if glu:
            got = self._join(f"{layer}.fc1", glu.group(1), tensor, ("gate", "up"))
            if not got:
                return []
            return [(prefix + "mlp.linear_fc1.weight", torch.cat([got["gate"], got["up"]]))]
        return None

    def finish(self) -> None:
        if self.pending:
            raise ValueError(f"incomplete checkpoint: missing parts of {sorted(self.pending)}")


def layer_to_hf(suffix: str, tensor: Tensor, cfg, prefix: str) -> Optional[List[Tuple[str, Tensor]]]:
    """A megatron decoder-layer tensor (local layout) `suffix` -> its HF tensors (names
    `prefix` + HF suffix); None if `suffix` is not an LLM weight."""
    for hf, meg in SIMPLE_LM.items():
        if suffix == meg:
            return [(prefix + hf, tensor)]
    qkv = re.match(r"self_attention\.linear_qkv\.(weight|bias)$", suffix)
    if qkv:
        q, k, v = ungroup_qkv(tensor, cfg)
        return [(prefix + f"self_attn.{p}_proj.{qkv.group(1)}", t) for p, t in zip("qkv", (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2)
        return [(prefix + "mlp.gate_proj.weight", gate.contiguous()),
                (prefix + "mlp.up_proj.weight", up.contiguous())]
    return None


def tp_patterns(column: str, row: str) -> Tuple["re.Pattern", "re.Pattern"]:
    """Compiled (column, row) name patterns: the LLM's plus a family's vision ones."""
    return re.compile(f"({LM_COLUMN}|{column})$"), re.compile(f"({LM_ROW}|{row})$")


def shard_for_tp(name: str, tensor: Tensor, rank: int, size: int, column, row) -> Tensor:
    """The slice of a global megatron tensor that tensor-parallel `rank` of `size` holds:
    names matching `column` split along dim 0, `row` along dim 1, linear_fc1 ([gate; up])
    per half; everything else (norms, row-parallel biases, layer scales, patch embeddings)
    is replicated. (linear_qkv is a contiguous split even when KV groups < TP: megatron-core
    gathers it back and picks the group.)"""
    if size == 1:
        return tensor
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank holds [gate_r; up_r]
        return torch.cat([part.chunk(size)[rank] for part in tensor.chunk(2)])
    if column.search(name):
        return tensor.chunk(size)[rank]
    if row.search(name):
        return tensor.chunk(size, dim=1)[rank]
    return tensor
