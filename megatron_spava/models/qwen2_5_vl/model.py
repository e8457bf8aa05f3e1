"""Qwen2.5-VL on megatron-core: the vision encoder of `vision.py` and a GPTModel language
model (Qwen2: GQA, QKV bias, SwiGLU, RMSNorm, 3-D M-RoPE) whose core attention is
megatron_spava's context-parallel attention.

    model = Qwen25VLModel(Qwen25VLConfig.from_hf(path), tensor_parallel=tp, context_parallel=cp)
    embeds = model.encode_video(inputs, cp_group)                       # every rank, frame-parallel
    x = model.decoder_input(input_ids[:, idx], embeds, model.vision_ordinals(input_ids)[:, idx])
    with cp_request(layout, cache=cache):
        logits = model(x, positions[:, :, idx])                         # [b, s_local, V]

`inference.generate` runs this loop (prefill, decode, several questions) for any family;
what is Qwen's here is the vision encoder, its temporal groups and the M-RoPE positions.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core.models.gpt.gpt_model import GPTModel

from ...modules import use_spava_rope
from ...specs import backend_for_impl, cast_parameters, get_gpt_layer_spec, lm_fusion_settings
from ...video.inputs import to_device
from ..common.frame_parallel import encode_frame_parallel, split_groups
from ..common.vision import vision_tp_config
from ..common.vlm import VideoLanguageModel, qwen2_text_config
from .config import Qwen25VLConfig
from .rope import MRopePositions, rope_index
from .vision import VisionEncoder


class Qwen25VLModel(VideoLanguageModel):
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
                 max_sequence_length: int = 1 << 20, lm_fusions: Optional[str] = None):
        cfg.validate(tensor_parallel)
        fused_config, fused_spec = lm_fusion_settings(lm_fusions, backend)
        text = qwen2_text_config(cfg, tensor_parallel=tensor_parallel, context_parallel=context_parallel,
                                 dtype=dtype, use_cpu_initialization=use_cpu_initialization,
                                 perform_initialization=perform_initialization,
                                 mrope_section=list(cfg.mrope_section), **fused_config)
        super().__init__(config=text)
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision, vision_tp_config(
            cfg.vision, tensor_parallel, dtype, use_cpu_initialization, perform_initialization))
        self.language_model = GPTModel(
            config=text, transformer_layer_spec=get_gpt_layer_spec(
                backend, core_attention=core_attention, normalization=text.normalization, **fused_spec),
            vocab_size=cfg.vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type="mrope", rotary_base=cfg.rope_theta,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=False)
        use_spava_rope(self.language_model)
        self.backend = backend_for_impl(backend)
        cast_parameters(self, dtype)  # megatron-core builds its local norms in float32

    def encode_video(self, inputs, cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
        """Video embeddings [n_video_tokens, hidden] of a VideoQAInputs on every rank of
        `cp_group`, frame-parallel over its temporal groups (None: this rank encodes all)."""
        return encode_video_frame_parallel(self.visual, inputs.pixel_values_videos,
                                           inputs.video_grid_thw, cp_group)

    def prompt_positions(self, input_ids: Tensor, inputs, *, max_new_tokens: int = 0,
                         rope_convention: Optional[str] = None) -> MRopePositions:
        """M-RoPE positions of the prompt input_ids [1, S] around the video of `inputs` and
        of the tokens decoded after it. rope_convention: "qwen" (default, as trained) or
        "hf" (`rope.py`). Raises ValueError when the video tokens do not match the grid."""
        cfg = self.cfg
        positions, deltas = rope_index(
            input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            tokens_per_second=cfg.vision.tokens_per_second, video_grid_thw=inputs.video_grid_thw,
            second_per_grid_ts=inputs.second_per_grid_ts, convention=rope_convention or "qwen")
        return MRopePositions(positions, deltas)

    def forward(self, decoder_input: Tensor, position_ids: Tensor,
                logits_rows: Optional[Tensor] = None) -> Tensor:
        """decoder_input [s, b, hidden], position_ids [3, b, s] (on any device) -> logits
        [b, s', vocab] for the local rows `logits_rows` (default: all). A prefill needs only
        the last token's logits: computing all of them costs s x vocab memory (39 GB at 128K
        tokens for 7B)."""
        lm = self.language_model
        rotary = lm.rotary_pos_emb(position_ids.to(decoder_input.device), lm.mrope_section)
        return self.lm_forward(decoder_input, rotary, logits_rows)


def frame_groups(grid_thw: Tensor) -> List[Tuple[int, int, int, int]]:
    """Every temporal group of every video as (video, t, h, w), in token order."""
    return [(i, t, h, w) for i, (T, h, w) in enumerate(grid_thw.tolist()) for t in range(T)]


def split_frame_groups(grid_thw: Tensor, world: int) -> List[Tuple[int, int]]:
    """Contiguous [lo, hi) ranges of frame groups per rank, near-equal in count. Raises
    ValueError when there are fewer groups than ranks (SPAVA.md section 1 limit)."""
    return split_groups(len(frame_groups(grid_thw)), world, unit="temporal group (2 frames)",
                        units="temporal groups")


def encode_video_frame_parallel(visual: VisionEncoder, pixels: Tensor, grid_thw: Tensor,
                                cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Video embeddings [n_tokens, out_hidden] on every rank of `cp_group`, each rank encoding
    a disjoint slice of the temporal groups (exact: groups never attend to each other).

    pixels: [N, patch_dim] patches of all videos (the processor's pixel_values_videos), on
    any device: only this rank's slice is moved to the encoder's device;
    grid_thw: [n_videos, 3]. Every rank passes the same inputs.
    """
    groups = frame_groups(grid_thw)
    patches = [h * w for _, _, h, w in groups]
    starts = [0, *itertools.accumulate(patches)]

    def encode(lo: int, hi: int) -> Tensor:
        local_grid = []  # consecutive groups of one video form one (t, h, w) row
        for video, _, h, w in groups[lo:hi]:
            if local_grid and local_grid[-1][0] == video:
                local_grid[-1][1] += 1
            else:
                local_grid.append([video, 1, h, w])
        grid = torch.tensor([[t, h, w] for _, t, h, w in local_grid], dtype=torch.long)
        return visual(to_device(pixels[starts[lo]:starts[hi]], visual.inv_freq.device), grid)

    unit = visual.cfg.spatial_merge_size ** 2
    return encode_frame_parallel(encode, [p // unit for p in patches], cp_group,
                                 unit="temporal group (2 frames)", units="groups")
