"""Qwen3-VL's vision encoder on megatron-core tensor-parallel linears.

Same computation and parameter names as HF transformers' `Qwen3VLVisionModel`: a patch
embedding (Conv3d with bias, patch 16), plus learned position embeddings bilinearly
interpolated (align_corners) from a square grid to each frame's patch grid, 2-D rotary,
pre-LayerNorm blocks (full bidirectional attention within one temporal group, a GELU-tanh
MLP), the 2x2 patch merger, and DeepStack: after each block in `deepstack_visual_indexes`
the hidden states go through their own merger (LayerNorm after the 2x2 shuffle).
One layout difference makes tensor parallelism a contiguous split: `attn.qkv` rows are
grouped per head ([q_h, k_h, v_h]) instead of [all q | all k | all v] (`checkpoint.py`).

There are no windows: every temporal group (2 frames) attends only to itself in every
block, and its position embeddings depend only on its own (h, w), so encoding any subset
of a video's groups is exact (frame-parallel encoding, `model.encode_video`).

Output [N / m^2, out_hidden * (1 + n_deepstack)]: the merger's tokens, then each
DeepStack merger's, side by side, so frame parallelism gathers all of them in one
all-gather and the LLM's decoder input places them together.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..common.vision import Container, SegmentGroup, column, row, segment_attention, segment_groups
from ..qwen2_5_vl.vision import _rotary, vision_position_ids
from .config import Qwen3VLVisionConfig

_ACT = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
        "silu": F.silu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def vision_flops(cfg: Qwen3VLVisionConfig, patches: int, grid_hw: int) -> float:
    """Matrix-product and attention FLOPs (2 per multiply-add) of one forward of the encoder
    over `patches` patches whose frames hold `grid_hw` patches each: patch embedding, per
    block QKV / output / MLP and attention over the frame, the merger and the DeepStack
    mergers. Norms, rotary, position interpolation and activations are not counted."""
    d, inter, unit = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size ** 2
    per_patch_block = 2 * (d * 3 * d + d * d + 2 * d * inter) + 4 * d * grid_hw
    mergers = 1 + len(cfg.deepstack_visual_indexes)
    merger = 2 * (d * unit) * (d * unit + cfg.out_hidden_size) / unit
    return patches * (cfg.depth * per_patch_block + mergers * merger + 2 * cfg.patch_dim * d)


def interpolated_positions(table: Tensor, grid_thw: Tensor, side: int, merge: int) -> Tensor:
    """HF's learned position embeddings resampled to each frame: the [side * side, D] table as
    a side x side image, bilinearly interpolated (align_corners=True) to (h, w), in the
    processor's merge-block-major patch order, repeated for each of the t groups.
    grid_thw [n, 3] -> [sum t*h*w, D]."""
    image = table.view(side, side, -1).permute(2, 0, 1)[None].float()  # [1, D, side, side]
    out = []
    for t, h, w in grid_thw.tolist():
        grid = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)[0]  # [D, h, w]
        grid = grid.reshape(-1, h // merge, merge, w // merge, merge).permute(1, 3, 2, 4, 0)
        out.append(grid.reshape(h * w, -1).repeat(t, 1))
    return torch.cat(out).to(table.dtype)


def _linear(cfg: TransformerConfig, kind: str, n_in: int, n_out: int):
    if kind == "column":
        return tensor_parallel.ColumnParallelLinear(n_in, n_out, config=cfg, init_method=cfg.init_method,
                                                    bias=True, gather_output=False)
    return tensor_parallel.RowParallelLinear(n_in, n_out, config=cfg, init_method=cfg.init_method,
                                             bias=True, input_is_parallel=True, skip_bias_add=False)


def _layer_norm(dim: int, dtype: torch.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, dtype=dtype)


class VisionBlock(MegatronModule):
    """x + proj(attn(norm1(x))); x + fc2(act(fc1(norm2(x))))."""

    def __init__(self, cfg: Qwen3VLVisionConfig, tp: TransformerConfig):
        super().__init__(config=tp)
        d = cfg.hidden_size
        self.norm1 = _layer_norm(d, tp.params_dtype)
        self.norm2 = _layer_norm(d, tp.params_dtype)
        self.attn = Container(tp, qkv=_linear(tp, "column", d, 3 * d), proj=_linear(tp, "row", d, d))
        self.mlp = Container(tp, linear_fc1=_linear(tp, "column", d, cfg.intermediate_size),
                             linear_fc2=_linear(tp, "row", cfg.intermediate_size, d))
        self.head_dim = cfg.head_dim
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, groups: Sequence[SegmentGroup]) -> Tensor:
        """x [N, D]; cos/sin [N, head_dim / 2] float32; groups: one segment per temporal group."""
        n = x.shape[0]
        qkv = column(self.attn.qkv, self.norm1(x)).view(n, -1, 3, self.head_dim)  # [N, heads/tp, 3, d]
        q, k = _rotary(qkv[:, :, :2], cos, sin).unbind(2)
        o = segment_attention(q, k, qkv[:, :, 2], groups, self.head_dim ** -0.5)
        x = x + row(self.attn.proj, o.reshape(n, -1))
        return x + row(self.mlp.linear_fc2, self.act(column(self.mlp.linear_fc1, self.norm2(x))))


class PatchMerger(MegatronModule):
    """2x2 merge: norm (before the shuffle, over D; or after it, over 4D: DeepStack's), then
    fc1 (column) -> GELU -> fc2 (row). [N, D] -> [N / 4, out_hidden]."""

    def __init__(self, cfg: Qwen3VLVisionConfig, tp: TransformerConfig, postshuffle: bool):
        super().__init__(config=tp)
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = _layer_norm(merged if postshuffle else cfg.hidden_size, tp.params_dtype)
        self.linear_fc1 = _linear(tp, "column", merged, merged)
        self.linear_fc2 = _linear(tp, "row", merged, cfg.out_hidden_size)
        self.merged = merged

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle else self.norm(x).reshape(-1, self.merged)
        return row(self.linear_fc2, F.gelu(column(self.linear_fc1, x)))


class Qwen3VLVisionEncoder(MegatronModule):
    """pixel patches [N, C*T*P*P] + grid_thw [n, 3] -> [N / m^2, out_hidden * (1 + k)]:
    the merged tokens and the k DeepStack features, in the LLM's placeholder order
    (item, t, h/m, w/m)."""

    def __init__(self, cfg: Qwen3VLVisionConfig, tp: TransformerConfig):
        super().__init__(config=tp)
        self.cfg = cfg
        p, tpatch, dtype = cfg.patch_size, cfg.temporal_patch_size, tp.params_dtype
        proj = nn.Module()  # Conv3d-shaped weight and its bias: the HF parameters as they are
        proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, tpatch, p, p, dtype=dtype))
        proj.bias = nn.Parameter(torch.zeros(cfg.hidden_size, dtype=dtype))
        nn.init.normal_(proj.weight, std=0.02)
        self.patch_embed = Container(tp, proj=proj)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size, dtype=dtype)
        self.blocks = Container(tp, **{str(i): VisionBlock(cfg, tp) for i in range(cfg.depth)})
        self.merger = PatchMerger(cfg, tp, postshuffle=False)
        self.deepstack_merger_list = Container(tp, **{str(i): PatchMerger(cfg, tp, postshuffle=True)
                                                      for i in range(len(cfg.deepstack_visual_indexes))})
        half = cfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32) / half), persistent=False)

    def forward(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        cfg = self.cfg
        proj = self.patch_embed.proj
        x = F.linear(pixels.to(proj.weight.dtype), proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)
        x = x + interpolated_positions(self.pos_embed.weight, grid_thw, cfg.grid_side,
                                       cfg.spatial_merge_size).to(x.device)
        pos = vision_position_ids(grid_thw, cfg.spatial_merge_size).to(x.device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, d/2]: h freqs | w freqs
        cos, sin = freqs.cos(), freqs.sin()
        frames = segment_groups([h * w for t, h, w in grid_thw.tolist() for _ in range(t)], x.device)
        taps = {layer: i for i, layer in enumerate(cfg.deepstack_visual_indexes)}
        deep = [None] * len(taps)
        mergers = list(self.deepstack_merger_list.children())
        for i, block in enumerate(self.blocks.children()):
            x = block(x, cos, sin, frames)
            if i in taps:
                deep[taps[i]] = mergers[taps[i]](x)
        return torch.cat([self.merger(x), *deep], dim=-1)
