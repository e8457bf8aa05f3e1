"""Qwen2.5-VL on megatron-core: the vision encoder of `vision.py` and a GPTModel language
model (Qwen2: GQA, QKV bias, SwiGLU, RMSNorm, 3-D M-RoPE) whose core attention is
megatron_spava's context-parallel attention.

    model = Qwen25VLModel(Qwen25VLConfig.from_hf(path), tensor_parallel=tp, context_parallel=cp)
    embeds = encode_video_frame_parallel(model.visual, pixels, grid_thw, cp_group)   # every rank
    x = model.decoder_input(input_ids[:, idx], embeds, video_ordinals(input_ids, vid)[:, idx])  # local rows
    with cp_request(layout, cache=cache):
        logits = model(x, positions[:, :, idx])                                        # [b, s_local, V]
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ...distributed import all_gather, group_rank_world
from ...modules import use_spava_rope
from ...specs import backend_for_impl, cast_parameters, get_gpt_layer_spec
from ..gpt import gpt_config
from .config import Qwen25VLConfig
from .vision import VisionEncoder


def _vision_tp_config(cfg: Qwen25VLConfig, tp: int, dtype: torch.dtype, cpu_init: bool,
                      init: bool) -> TransformerConfig:
    v = cfg.vision
    return TransformerConfig(
        num_layers=v.depth, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        tensor_model_parallel_size=tp, use_cpu_initialization=cpu_init, params_dtype=dtype,
        perform_initialization=init,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, hidden_dropout=0.0,
        attention_dropout=0.0, gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False)


class Qwen25VLModel(MegatronModule):
    """Vision encoder + language model, tensor parallel over the current TP group.

    backend: the language model's layers, "local" or "te" (Transformer Engine; its fused
    norms are named ...linear_qkv.layer_norm_weight / ...linear_fc1.layer_norm_weight). The
    vision encoder always runs on its own GEMMs (megatron-core parameters, `vision.py`).
    core_attention: the language model's core-attention class (default SpavaCoreAttention).

    forward(decoder_input [s, b, hidden], position_ids [3, b, s]) -> logits [b, s, vocab]
    (gathered over TP). The context-parallel algorithm comes from the active request.
    """

    def __init__(self, cfg: Qwen25VLConfig, *, tensor_parallel: int = 1, context_parallel: int = 1,
                 dtype: torch.dtype = torch.float32, backend: str = "local", core_attention=None,
                 use_cpu_initialization: bool = True, perform_initialization: bool = True,
                 max_sequence_length: int = 1 << 20):
        cfg.validate(tensor_parallel)
        text = gpt_config(
            num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
            num_query_groups=cfg.num_kv_heads, ffn_hidden_size=cfg.intermediate_size,
            tensor_parallel=tensor_parallel, context_parallel=context_parallel, dtype=dtype,
            kv_channels=cfg.head_dim, layernorm_epsilon=cfg.rms_norm_eps, add_qkv_bias=True,
            activation_func=F.silu, mrope_section=list(cfg.mrope_section),
            use_cpu_initialization=use_cpu_initialization,
            perform_initialization=perform_initialization)
        super().__init__(config=text)
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision, _vision_tp_config(
            cfg, tensor_parallel, dtype, use_cpu_initialization, perform_initialization))
        self.language_model = GPTModel(
            config=text, transformer_layer_spec=get_gpt_layer_spec(
                backend, core_attention=core_attention, normalization=text.normalization),
            vocab_size=cfg.vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type="mrope", rotary_base=cfg.rope_theta,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=False)
        use_spava_rope(self.language_model)
        self.backend = backend_for_impl(backend)
        cast_parameters(self, dtype)  # megatron-core builds its local norms in float32

    def shard_weights(self, cp_group: Optional[dist.ProcessGroup]):
        """Keep 1/CP of every language-model layer's weights on each rank of `cp_group`,
        gathered layer by layer during forward (`megatron_spava.weight_sharding`). The
        embedding, output layer and vision encoder stay whole. Call after loading weights.
        Returns the ShardedParameters (its `unshard()` undoes this)."""
        from ...weight_sharding import shard_parameters
        return shard_parameters(list(self.language_model.decoder.layers), cp_group)

    def decoder_input(self, input_ids: Tensor, video_embeds: Optional[Tensor] = None,
                      video_ordinal: Optional[Tensor] = None) -> Tensor:
        """Embeddings [s, b, hidden] of this rank's tokens input_ids [b, s]; positions where
        video_ordinal [b, s] >= 0 take row video_ordinal of video_embeds [n, hidden]."""
        x = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if video_embeds is not None and video_ordinal is not None:
            # megatron-core's embedding output is a fresh tensor (never a view of the table): fill in place
            rows = (video_ordinal.t() >= 0).nonzero(as_tuple=True)
            x[rows] = video_embeds[video_ordinal.t()[rows]].to(x.dtype)
        return x

    def forward(self, decoder_input: Tensor, position_ids: Tensor,
                logits_rows: Optional[Tensor] = None) -> Tensor:
        """decoder_input [s, b, hidden], position_ids [3, b, s] -> logits [b, s', vocab] for the
        local rows `logits_rows` (default: all). A prefill needs only the last token's logits:
        computing all of them costs s x vocab memory (39 GB at 128K tokens for 7B)."""
        lm = self.language_model
        rotary = lm.rotary_pos_emb(position_ids, lm.mrope_section)
        hidden = lm.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)
        if logits_rows is not None:
            hidden = hidden.index_select(0, logits_rows.to(hidden.device))
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
        logits, _ = lm.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.transpose(0, 1).contiguous()


def frame_groups(grid_thw: Tensor) -> List[Tuple[int, int, int, int]]:
    """Every temporal group of every video as (video, t, h, w), in token order."""
    return [(i, t, h, w) for i, (T, h, w) in enumerate(grid_thw.tolist()) for t in range(T)]


def split_frame_groups(grid_thw: Tensor, world: int) -> List[Tuple[int, int]]:
    """Contiguous [lo, hi) ranges of frame groups per rank, near-equal in count. Raises
    ValueError when there are fewer groups than ranks (SPAVA.md section 1 limit)."""
    n = len(frame_groups(grid_thw))
    if n < world:
        raise ValueError(f"frame-parallel vision needs at least one temporal group (2 frames) per "
                         f"context-parallel rank: the video has {n} groups for {world} ranks; "
                         f"sample more frames or use fewer ranks")
    bounds = [round(r * n / world) for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def encode_video_frame_parallel(visual: VisionEncoder, pixels: Tensor, grid_thw: Tensor,
                                cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Video embeddings [n_tokens, out_hidden] on every rank of `cp_group`, each rank encoding
    a disjoint slice of the temporal groups (exact: groups never attend to each other).

    pixels: [N, patch_dim] patches of all videos (the processor's pixel_values_videos), on
    any device: only this rank's slice is moved to the encoder's device;
    grid_thw: [n_videos, 3]. Every rank passes the same inputs.
    """
    rank, world = group_rank_world(cp_group)
    groups = frame_groups(grid_thw)
    ranges = split_frame_groups(grid_thw, world)
    patches = [h * w for _, _, h, w in groups]
    starts = [0, *itertools.accumulate(patches)]
    lo, hi = ranges[rank]
    local_pixels = pixels[starts[lo]:starts[hi]].to(visual.inv_freq.device)
    local_grid = []  # consecutive groups of one video form one (t, h, w) row
    for video, _, h, w in groups[lo:hi]:
        if local_grid and local_grid[-1][0] == video:
            local_grid[-1][1] += 1
        else:
            local_grid.append([video, 1, h, w])
    grid = torch.tensor([[t, h, w] for _, t, h, w in local_grid], dtype=torch.long)
    local = visual(local_pixels, grid)  # [n_local_tokens, D]
    if world == 1:
        return local
    unit = visual.cfg.spatial_merge_size ** 2
    counts = [(starts[b] - starts[a]) // unit for a, b in ranges]
    padded = local.new_zeros(max(counts), local.shape[1])
    padded[: local.shape[0]] = local
    gathered = local.new_empty(world * max(counts), local.shape[1])
    all_gather(gathered, padded, cp_group, world, async_op=False)
    gathered = gathered.view(world, max(counts), -1)
    return torch.cat([gathered[r, :c] for r, c in enumerate(counts)])


def video_ordinals(input_ids: Tensor, video_token_id: int) -> Tensor:
    """For every token [b, S], the row of the video embeddings it takes (row-major over the
    batch, as HF's masked_scatter), or -1 for non-video tokens."""
    mask = input_ids == video_token_id
    ordinal = mask.flatten().long().cumsum(0).view_as(mask) - 1
    return torch.where(mask, ordinal, torch.full_like(ordinal, -1))
