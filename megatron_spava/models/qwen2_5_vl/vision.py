"""Qwen2.5-VL's vision encoder on megatron-core tensor-parallel linears.

Same computation and parameter names as HF transformers'
`Qwen2_5_VisionTransformerPretrainedModel` (patch embed, 2-D rotary, window and
full attention blocks with RMSNorm and a gated SiLU MLP, then the 2x2 patch merger),
with two layout differences that make tensor parallelism a contiguous split:
`attn.qkv` rows are grouped per head ([q_h, k_h, v_h] for h = 0..H-1) instead of
[all q | all k | all v], and the merger's Sequential indices are kept (mlp.0, mlp.2).
`checkpoint.py` converts between the two layouts.

Every temporal group (2 frames) is an independent attention segment in every layer
(windows and "full" layers alike), so encoding a subset of a video's groups is exact:
`model.encode_video_frame_parallel` gives each context-parallel rank a disjoint slice.
The TP linear helpers and segment attention are shared with InternVL3 (`models.common.vision`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..common.vision import (Container, SegmentGroup, column, rms_norm, row, segment_attention,
                             segment_groups)


@dataclass(frozen=True)
class VisionConfig:
    """The vision_config fields of an HF Qwen2.5-VL config.json."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: Tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, cfg: dict) -> "VisionConfig":
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in cfg.items() if k in names}
        values.setdefault("depth", cfg.get("num_hidden_layers", cls.depth))
        values.setdefault("num_heads", cfg.get("num_attention_heads", cls.num_heads))
        if "fullatt_block_indexes" in values:
            values["fullatt_block_indexes"] = tuple(values["fullatt_block_indexes"])
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values["rope_theta"] = float(rope["rope_theta"])
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def vision_flops(cfg: VisionConfig, patches: int, grid_hw: int) -> float:
    """Matrix-product and attention FLOPs (2 per multiply-add) of one forward of the encoder
    over `patches` patches whose frames hold `grid_hw` patches each: patch embedding, per
    block QKV / output / SwiGLU MLP and attention (windowed blocks over a window, full blocks
    over the frame), and the patch merger. Norms, rotary and activations are not counted."""
    d, inter, unit = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size ** 2
    per_patch_block = 2 * (d * 3 * d + d * d + 3 * d * inter)
    window = (cfg.window_size // cfg.patch_size) ** 2
    full = len(cfg.fullatt_block_indexes)
    attn = 4 * d * ((cfg.depth - full) * min(window, grid_hw) + full * grid_hw)  # QK^T and PV per patch
    merger = 2 * (d * unit) * (d * unit + cfg.out_hidden_size) / unit
    embed = 2 * cfg.patch_dim * d
    return patches * (cfg.depth * per_patch_block + attn + merger + embed)


def _rotary(qk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's vision rotary (x * cos + rotate_half(x) * sin) in float32, cast back.
    qk [N, heads, 2, d] (q and k together); cos, sin [N, d/2] float32: HF's cos/sin are
    cat(freqs, freqs).cos(), so both halves of a head use the same d/2 values."""
    half = qk.shape[-1] // 2
    x = qk.float().unflatten(-1, (2, half))  # [N, heads, 2, 2, d/2]
    x1, x2 = x[..., 0, :], x[..., 1, :]
    c, s = cos[:, None, None], sin[:, None, None]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-2).flatten(-2).to(qk.dtype)


def _gated(gate: Tensor, up: Tensor, act_name: str) -> Tensor:
    return getattr(F, act_name)(gate) * up


def _add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """A residual add and the RMSNorm that reads it: (s, rms_norm(s)) with s = x + y in x's
    dtype, rounded before the norm reads it, exactly as `x = x + y; norm(x)`. x, y: [N, D]."""
    s = x + y
    return s, rms_norm(s, weight, eps)


_EAGER = {"rms_norm": rms_norm, "rotary": _rotary, "gated": _gated, "add_rms_norm": _add_rms_norm}
# Inductor options per stage. Fused into one kernel, Inductor would skip the bf16 rounding of
# the residual sum before the norm reads it; emulate_precision_casts keeps every rounding that
# eager does (the stored sum is the eager sum bit for bit, and the norm reads it).
_OPTIONS = {"add_rms_norm": {"emulate_precision_casts": True}}


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    # Default dynamism: the first call specialises, a new row count recompiles once with only
    # that dimension symbolic (the head and channel sizes stay constants in the kernel).
    return torch.compile(_EAGER[name], options=_OPTIONS.get(name))


def fused(name: str, *args, compile: bool = False):
    """Run elementwise stage `name` ("rms_norm", "add_rms_norm", "rotary", "gated"): eagerly
    (a chain of PyTorch kernels), or torch.compile'd into one Triton kernel when `compile` is
    set and the inputs are on CUDA. Both compute the same float32 math."""
    fn = _compiled(name) if compile and args[0].is_cuda else _EAGER[name]
    return fn(*args)


class RMSNorm(nn.Module):
    """HF Qwen2's RMSNorm (`common.vision.rms_norm`), holding the scale parameter."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor, compile: bool = False) -> Tensor:
        return fused("rms_norm", x, self.weight, self.eps, compile=compile)

    def add(self, x: Tensor, y: Optional[Tensor], compile: bool = False) -> Tuple[Tensor, Tensor]:
        """(x + y, norm(x + y)) in one pass over x and y (`fused("add_rms_norm")`);
        (x, norm(x)) when y is None. x, y: [N, D]."""
        if y is None:
            return x, self(x, compile)
        return fused("add_rms_norm", x, y, self.weight, self.eps, compile=compile)


def vision_position_ids(grid_thw: Tensor, merge: int) -> Tensor:
    """(h, w) patch coordinates [N, 2] in the processor's merge-block-major order,
    repeated for every temporal group. grid_thw: [n_items, 3] (t, h, w) in patches."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_index(grid_thw: Tensor, cfg: VisionConfig) -> Tuple[Tensor, List[int]]:
    """HF's window permutation. Returns (index over merge units [N / m^2], segment
    lengths in patches of the windows in permuted order). Windows are
    `window_size // m // patch` merge units square, anchored top-left, inside one frame."""
    merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
    ws = cfg.window_size // merge // cfg.patch_size
    indices, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = -gh % ws, -gw % ws
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        padded = padded.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
        counts = (padded >= 0).sum(-1).flatten()
        flat = padded.flatten()
        indices.append(flat[flat >= 0] + offset)
        lengths += (counts[counts > 0] * unit).tolist()
        offset += t * gh * gw
    return torch.cat(indices), lengths


class VisionBlock(MegatronModule):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)). Each residual add
    is fused with the norm that reads it, so the MLP's add is left to the next block (or the
    merger): a block takes the residual stream and the previous block's pending MLP output and
    returns its own (`forward`)."""

    def __init__(self, cfg: VisionConfig, tp_config: TransformerConfig):
        super().__init__(config=tp_config)
        init = tp_config.init_method
        d, inter = cfg.hidden_size, cfg.intermediate_size
        col = dict(config=tp_config, init_method=init, bias=True, gather_output=False)
        row = dict(config=tp_config, init_method=init, bias=True, input_is_parallel=True,
                   skip_bias_add=False)
        self.norm1 = RMSNorm(d, dtype=tp_config.params_dtype)
        self.norm2 = RMSNorm(d, dtype=tp_config.params_dtype)
        self.attn = Container(tp_config, qkv=tensor_parallel.ColumnParallelLinear(d, 3 * d, **col),
                              proj=tensor_parallel.RowParallelLinear(d, d, **row))
        self.mlp = Container(tp_config,
                             gate_proj=tensor_parallel.ColumnParallelLinear(d, inter, **col),
                             up_proj=tensor_parallel.ColumnParallelLinear(d, inter, **col),
                             down_proj=tensor_parallel.RowParallelLinear(inter, d, **row))
        self.head_dim = cfg.head_dim
        self.act_name = cfg.hidden_act
        self._mlp_cache = None  # (key, fused padded weights): see `_fused_mlp_weights`

    def _fused_mlp_weights(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The MLP as two aligned GEMMs: gate and up stacked into one weight [2 * I', D] (+ bias)
        and down [D, I'], where I' is this rank's intermediate size rounded up to 64 with zero
        rows/columns (silu(0) * 0 = 0: exact). Qwen2.5-VL's 3420 leaves rows 6840 bytes long,
        not a multiple of 16, which sends cuBLAS to slow non-Hopper kernels (BENCHMARKS.md,
        vision encoder). Rebuilt when a weight changes (loading a checkpoint); costs one
        extra copy of the MLP weights."""
        mlp = self.mlp
        params = (mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight, mlp.up_proj.bias,
                  mlp.down_proj.weight)
        key = tuple((p.data_ptr(), p._version, p.device) for p in params)
        if self._mlp_cache is None or self._mlp_cache[0] != key:
            gw, gb, uw, ub, dw = (p.detach() for p in params)
            pad = -gw.shape[0] % 64
            gate_up = torch.cat([F.pad(gw, (0, 0, 0, pad)), F.pad(uw, (0, 0, 0, pad))])
            gate_up_bias = torch.cat([F.pad(gb, (0, pad)), F.pad(ub, (0, pad))])
            self._mlp_cache = (key, (gate_up, gate_up_bias, F.pad(dw, (0, pad)).contiguous()))
        return self._mlp_cache[1]

    def forward(self, x: Tensor, y: Optional[Tensor], cos: Tensor, sin: Tensor,
                groups: Sequence[SegmentGroup], compile: bool = False) -> Tuple[Tensor, Tensor]:
        """x: the residual stream [N, D]; y: the previous block's MLP output [N, D], not yet
        added (None for the first block); cos/sin: [N, head_dim / 2] float32; groups: attention
        segments (`segment_groups`); compile: fuse the elementwise stages (`fused`).
        Returns (x + y + attn, mlp): this block's output is their sum, left for the next
        add-and-norm. Under TP, row() returns the all-reduced branch outputs (plus bias)."""
        n = x.shape[0]
        x, h = self.norm1.add(x, y, compile)
        qkv = column(self.attn.qkv, h).view(n, -1, 3, self.head_dim)  # [N, heads/tp, 3, d]
        q, k = fused("rotary", qkv[:, :, :2], cos, sin, compile=compile).unbind(2)
        o = segment_attention(q, k, qkv[:, :, 2], groups, self.head_dim ** -0.5)
        x, h = self.norm2.add(x, row(self.attn.proj, o.reshape(n, -1)), compile)
        gate_up, gate_up_bias, down = self._fused_mlp_weights()
        gu = F.linear(h, gate_up, gate_up_bias)  # [N, 2 I'] (local I')
        up = fused("gated", *gu.chunk(2, dim=-1), self.act_name, compile=compile)
        return x, row(self.mlp.down_proj, up, weight=down)


class VisionEncoder(MegatronModule):
    """pixel patches [N, C*T*P*P] + grid_thw [n, 3] -> merged tokens [N / m^2, out_hidden].

    Output rows follow the LLM's placeholder order (item, t, h/m, w/m).
    `compile_elementwise` (default on): on CUDA, each block's residual adds with the norms
    that read them, rotary and gated activation run as torch.compile'd (Triton) kernels instead of chains of PyTorch kernels
    (BENCHMARKS.md, "vision encoder"); the first forward pays the compilation."""

    def __init__(self, cfg: VisionConfig, tp_config: TransformerConfig,
                 compile_elementwise: bool = True):
        super().__init__(config=tp_config)
        self.cfg = cfg
        self.compile_elementwise = compile_elementwise
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        proj = nn.Module()  # Conv3d-shaped weight, no bias: the HF parameter as is
        proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, tp, p, p,
                                               dtype=tp_config.params_dtype))
        nn.init.normal_(proj.weight, std=0.02)
        self.patch_embed = Container(tp_config, proj=proj)
        self.blocks = Container(tp_config, **{str(i): VisionBlock(cfg, tp_config)
                                              for i in range(cfg.depth)})
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        mlp = Container(tp_config)
        mlp.add_module("0", tensor_parallel.ColumnParallelLinear(
            merged, merged, config=tp_config, init_method=tp_config.init_method, bias=True,
            gather_output=False))
        mlp.add_module("2", tensor_parallel.RowParallelLinear(
            merged, cfg.out_hidden_size, config=tp_config, init_method=tp_config.init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False))
        self.merger = Container(tp_config, ln_q=RMSNorm(cfg.hidden_size, dtype=tp_config.params_dtype),
                                mlp=mlp)
        half = cfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32) / half), persistent=False)

    def forward(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        weight = self.patch_embed.proj.weight
        x = pixels.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()  # Conv3d, stride = kernel
        n = x.shape[0]
        pos = vision_position_ids(grid_thw, cfg.spatial_merge_size).to(x.device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, d/2]: h freqs | w freqs
        windows, window_lengths = window_index(grid_thw, cfg)
        windows = windows.to(x.device)
        permute = lambda t: t.reshape(n // unit, unit, -1)[windows].reshape(n, -1)  # noqa: E731
        x, freqs = permute(x), permute(freqs)
        cos, sin = freqs.cos(), freqs.sin()
        frames = segment_groups([h * w for t, h, w in grid_thw.tolist() for _ in range(t)], x.device)
        windows_ = segment_groups(window_lengths, x.device)
        compile = self.compile_elementwise and x.is_cuda
        y = None  # the pending MLP output of the block before, added by the next add-and-norm
        for i, block in enumerate(self.blocks.children()):
            x, y = block(x, y, cos, sin, frames if i in cfg.fullatt_block_indexes else windows_, compile)
        merged = self.merger.ln_q.add(x, y, compile)[1].reshape(n // unit, -1)
        mlp = self.merger.mlp
        merged = row(getattr(mlp, "2"), F.gelu(column(getattr(mlp, "0"), merged)))
        return merged[torch.argsort(windows)]
