"""InternVL3's vision side on megatron-core tensor-parallel linears: the InternViT encoder,
pixel shuffle and the MLP projector.

Same computation and parameter names as HF transformers' `InternVLVisionModel` and
`InternVLMultiModalProjector` (patch embedding, CLS token and absolute positions;
pre-norm blocks with layer-scale `lambda_1`/`lambda_2` and a GELU MLP; then the CLS token
is dropped, 2x2 neighbours are folded into channels, and LayerNorm -> linear -> GELU ->
linear maps them to the LLM's width), with one layout difference that makes tensor
parallelism a contiguous split: HF's separate `attention.{q,k,v}_proj` are one
`attention.qkv` whose rows are grouped per head ([q_h, k_h, v_h] for h = 0..H-1);
`checkpoint.py` converts.

A frame is one 448x448 tile and attends only to itself, so encoding any subset of a
video's frames is exact (`model.encode_frames_frame_parallel`). The linears run as plain
GEMMs on the megatron-core parameters (`common.vision.column/row`: bias in the epilogue,
one all-reduce per row-parallel linear under TP), as Qwen2.5-VL's encoder does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ...ops.attention import attend
from ..common.vision import Container, column, rms_norm, row
from .config import InternViTConfig, InternVL3Config

BACKENDS = ("local", "te")


def activation(name: str):
    """transformers' ACT2FN entry `name` as a function (the names InternVL configs use)."""
    table = {
        "gelu": F.gelu,  # exact (erf), transformers' GELUActivation
        "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
        "gelu_new": functools.partial(F.gelu, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(table)}")
    return table[name]


class Norm(nn.Module):
    """nn.LayerNorm (weight and bias) or HF's RMSNorm (weight; float32 math, cast back,
    then scaled), with HF's parameter names."""

    def __init__(self, dim: int, kind: str, eps: float, dtype: torch.dtype):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        if kind == "layer_norm":
            self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))
        elif kind != "rms_norm":
            raise ValueError(f"unknown norm {kind!r}: layer_norm or rms_norm")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layer_norm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return rms_norm(x, self.weight, self.eps)


def _linears(tp_config: TransformerConfig, backend: str):
    """Column/row-parallel linear classes for `backend`. The vision side always runs its
    own GEMMs on the linears' parameters (see the module docstring), so both backends use
    megatron-core's local linears: their weights have the layout TE's would."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    col = functools.partial(tensor_parallel.ColumnParallelLinear, config=tp_config,
                            init_method=tp_config.init_method, gather_output=False)
    row = functools.partial(tensor_parallel.RowParallelLinear, config=tp_config,
                            init_method=tp_config.init_method, input_is_parallel=True,
                            skip_bias_add=False)
    return col, row


class InternViTLayer(MegatronModule):
    """x + lambda_1 * attn(norm_before(x)); x + lambda_2 * mlp(norm_after(x))."""

    def __init__(self, cfg: InternViTConfig, tp_config: TransformerConfig, backend: str = "local"):
        super().__init__(config=tp_config)
        col, row = _linears(tp_config, backend)
        d, dtype = cfg.hidden_size, tp_config.params_dtype
        self.attention = Container(tp_config,
                                   qkv=col(d, 3 * d, bias=cfg.attention_bias),
                                   projection_layer=row(d, d, bias=True))
        self.mlp = Container(tp_config, fc1=col(d, cfg.intermediate_size, bias=True),
                             fc2=row(cfg.intermediate_size, d, bias=True))
        self.layernorm_before = Norm(d, cfg.norm_type, cfg.layer_norm_eps, dtype)
        self.layernorm_after = Norm(d, cfg.norm_type, cfg.layer_norm_eps, dtype)
        self.lambda_1 = nn.Parameter(torch.ones(d, dtype=dtype))
        self.lambda_2 = nn.Parameter(torch.ones(d, dtype=dtype))
        self.head_dim = cfg.head_dim
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        """x: [L, F, D] (L = 1 + patches of one tile, F frames) -> [L, F, D]."""
        L, F_, _ = x.shape
        qkv = column(self.attention.qkv, self.layernorm_before(x)).view(L, F_, -1, 3, self.head_dim)
        q, k, v = qkv.unbind(3)  # [L, F, heads / tp, d] views: attention within each frame
        o = attend(q, k, v, causal=False, scale=self.head_dim ** -0.5)[0]
        x = x + self.lambda_1 * row(self.attention.projection_layer, o.reshape(L, F_, -1))
        h = self.act(column(self.mlp.fc1, self.layernorm_after(x)))
        return x + self.lambda_2 * row(self.mlp.fc2, h)


class InternViT(MegatronModule):
    """Frames [F, C, S, S] (S = image_size, normalised pixels) -> patch features
    [F, grid^2, D] of the last layer, CLS token dropped (HF: last_hidden_state[:, 1:])."""

    def __init__(self, cfg: InternViTConfig, tp_config: TransformerConfig, backend: str = "local"):
        super().__init__(config=tp_config)
        self.cfg = cfg
        dtype, d, p = tp_config.params_dtype, cfg.hidden_size, cfg.patch_size
        patch = nn.Module()  # Conv2d-shaped weight and bias: the HF parameters as they are
        patch.weight = nn.Parameter(torch.empty(d, cfg.num_channels, p, p, dtype=dtype))
        patch.bias = nn.Parameter(torch.zeros(d, dtype=dtype))
        nn.init.normal_(patch.weight, std=0.02)
        embeddings = Container(tp_config, patch_embeddings=Container(tp_config, projection=patch))
        embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, d, dtype=dtype))
        if cfg.use_absolute_position_embeddings:
            embeddings.position_embeddings = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, d, dtype=dtype))
        self.embeddings = embeddings
        self.encoder = Container(tp_config, layer=Container(
            tp_config, **{str(i): InternViTLayer(cfg, tp_config, backend) for i in range(cfg.depth)}))
        if not cfg.use_mean_pooling:  # HF: a final LayerNorm unless mean pooling (InternVL3: pooling)
            self.layernorm = Norm(d, "layer_norm", cfg.layer_norm_eps, dtype)

    @property
    def device(self) -> torch.device:
        return self.embeddings.cls_token.device

    def forward(self, pixels: Tensor) -> Tensor:
        cfg = self.cfg
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"InternViT takes frames [F, {cfg.num_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}] (one tile each), got {tuple(pixels.shape)}")
        proj = self.embeddings.patch_embeddings.projection
        x = F.conv2d(pixels.to(proj.weight.dtype), proj.weight, proj.bias, stride=cfg.patch_size)
        x = x.flatten(2).permute(2, 0, 1)  # [grid^2, F, D]
        cls = self.embeddings.cls_token.view(1, 1, -1).expand(1, x.shape[1], -1)
        x = torch.cat([cls, x])  # [L, F, D]
        if cfg.use_absolute_position_embeddings:
            x = x + self.embeddings.position_embeddings.view(-1, 1, x.shape[-1])
        for layer in self.encoder.layer.children():
            x = layer(x)
        if not cfg.use_mean_pooling:
            x = self.layernorm(x)
        return x[1:].transpose(0, 1)  # [F, grid^2, D]


def vision_flops(cfg: InternVL3Config, tiles: int) -> float:
    """Matrix-product and attention FLOPs (2 per multiply-add) of InternViT and the projector
    over `tiles` tiles (one per video frame): patch embedding, per layer QKV / output / MLP
    over grid^2 + 1 tokens (CLS included) and full attention within the tile, then the
    projector's two linears on tokens_per_tile tokens. Norms and activations not counted."""
    v = cfg.vision
    d, tokens = v.hidden_size, v.grid ** 2 + 1
    layer = 2 * tokens * (4 * d * d + 2 * d * v.intermediate_size) + 4 * tokens * tokens * d
    embed = 2 * v.grid ** 2 * v.num_channels * v.patch_size ** 2 * d
    width = d * cfg.scale ** 2
    projector = 2 * cfg.tokens_per_tile * (width * cfg.hidden_size + cfg.hidden_size * cfg.hidden_size)
    return tiles * (v.depth * layer + embed + projector)


def pixel_shuffle(features: Tensor, scale: int) -> Tensor:
    """HF InternVL's pixel shuffle with scale_factor = 1 / scale: features [F, g*g, C] (row
    major over the g x g patch grid) -> [F, (g/scale)^2, C * scale^2], each output token the
    scale x scale neighbourhood folded into channels, in HF's channel order."""
    n, tokens, c = features.shape
    g = int(round(tokens ** 0.5))
    if g * g != tokens or g % scale:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {scale}, got {tokens} tokens")
    x = features.contiguous().view(n, g, g, c)
    x = x.view(n, g, g // scale, c * scale).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, g // scale, g // scale, c * scale * scale).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, c * scale * scale)


class InternVLProjector(MegatronModule):
    """HF's InternVLMultiModalProjector: LayerNorm (eps 1e-5, nn.LayerNorm's default) ->
    linear_1 (column parallel) -> activation -> linear_2 (row parallel).
    [..., C * scale^2] -> [..., hidden_size]."""

    def __init__(self, cfg: InternVL3Config, tp_config: TransformerConfig, backend: str = "local"):
        super().__init__(config=tp_config)
        col, row = _linears(tp_config, backend)
        width = cfg.vision.hidden_size * cfg.scale ** 2
        self.layer_norm = Norm(width, "layer_norm", 1e-5, tp_config.params_dtype)
        self.linear_1 = col(width, cfg.hidden_size, bias=True)
        self.linear_2 = row(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.act = activation(cfg.projector_hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return row(self.linear_2, self.act(column(self.linear_1, self.layer_norm(x))))
