"""InternVL3 on megatron-core: the InternViT encoder and projector of `vision.py` and a
GPTModel language model (Qwen2.5: GQA, QKV bias, SwiGLU, RMSNorm, 1-D RoPE) whose core
attention is megatron_spava's context-parallel attention.

    model = InternVL3Model(InternVL3Config.from_hf(path), tensor_parallel=tp, context_parallel=cp)
    embeds = encode_frames_frame_parallel(model, pixels, cp_group)          # every rank
    x = model.decoder_input(input_ids[:, idx], embeds, image_ordinals(input_ids, img)[:, idx])
    with cp_request(layout, positions=idx, cache=cache):
        logits = model(x)                                                  # [b, s_local, V]

Video frames are tiles: InternVL3 has no temporal patches, so every frame is its own
group of 256 tokens and frame parallelism splits the frames themselves.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule

from ...distributed import all_gather, group_rank_world
from ...modules import use_spava_rope
from ...specs import get_gpt_layer_spec
from ..gpt import gpt_config
from ..qwen2_5_vl.model import Qwen25VLModel, _vision_tp_config, video_ordinals
from .config import InternVL3Config
from .vision import InternVLProjector, InternViT, pixel_shuffle

#: For every token, the row of the image embeddings it takes, or -1 (HF's masked_scatter
#: order). The same rule as Qwen2.5-VL's video tokens, with InternVL's <IMG_CONTEXT> id.
image_ordinals = video_ordinals


class InternVL3Model(MegatronModule):
    """InternViT + projector + language model, tensor parallel over the current TP group.

    forward(decoder_input [s, b, hidden]) -> logits [b, s, vocab] (gathered over TP; the
    embedding and output layer are padded to cfg.padded_vocab_size, the logits are not). RoPE
    positions and the context-parallel algorithm come from the active request
    (`cp_request(layout, positions=...)`); without one, positions are 0..s-1 (CP = 1).
    backend: the language model's layer spec ("local" or "te", `megatron_spava.specs`).
    """

    def __init__(self, cfg: InternVL3Config, *, tensor_parallel: int = 1, context_parallel: int = 1,
                 dtype: torch.dtype = torch.float32, backend: str = "local",
                 use_cpu_initialization: bool = True, perform_initialization: bool = True,
                 max_sequence_length: int = 1 << 20):
        cfg.validate(tensor_parallel)
        text = gpt_config(
            num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
            num_query_groups=cfg.num_kv_heads, ffn_hidden_size=cfg.intermediate_size,
            tensor_parallel=tensor_parallel, context_parallel=context_parallel, dtype=dtype,
            kv_channels=cfg.head_dim, layernorm_epsilon=cfg.rms_norm_eps, add_qkv_bias=True,
            activation_func=F.silu, use_cpu_initialization=use_cpu_initialization,
            perform_initialization=perform_initialization)
        super().__init__(config=text)
        self.cfg = cfg
        vision_tp = _vision_tp_config(cfg, tensor_parallel, dtype, use_cpu_initialization,
                                      perform_initialization)
        self.vision_tower = InternViT(cfg.vision, vision_tp, backend)
        self.multi_modal_projector = InternVLProjector(cfg, vision_tp, backend)
        self.language_model = GPTModel(
            config=text, transformer_layer_spec=get_gpt_layer_spec(backend, normalization="RMSNorm"),
            vocab_size=cfg.padded_vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type="rope", rotary_base=cfg.rope_theta,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=False)
        use_spava_rope(self.language_model)
        for p in self.parameters():  # megatron-core builds its norms in float32 whatever the dtype
            p.data = p.data.to(dtype)

    # Model-independent pieces shared with Qwen2.5-VL (to move into a common VLM module).
    shard_weights = Qwen25VLModel.shard_weights
    decoder_input = Qwen25VLModel.decoder_input

    def encode_frames(self, pixels: Tensor, frames_per_pass: int = 64) -> Tensor:
        """Frames [F, C, S, S] -> LLM-width embeddings [F, tokens_per_tile, hidden]:
        InternViT, pixel shuffle, projector (HF's get_image_features), `frames_per_pass`
        frames at a time (frames are independent, so this bounds memory, not results)."""
        out = []
        for chunk in pixels.split(frames_per_pass):
            features = pixel_shuffle(self.vision_tower(chunk), self.cfg.scale)
            out.append(self.multi_modal_projector(features))
        return torch.cat(out)

    def forward(self, decoder_input: Tensor, logits_rows: Optional[Tensor] = None) -> Tensor:
        """decoder_input [s, b, hidden] -> logits [b, s', vocab] for the local rows
        `logits_rows` (default: all); a prefill needs only the last token's."""
        lm = self.language_model
        rotary = lm.rotary_pos_emb(decoder_input.shape[0])
        hidden = lm.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)
        if logits_rows is not None:
            hidden = hidden.index_select(0, logits_rows.to(hidden.device))
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
        logits, _ = lm.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[..., : self.cfg.vocab_size].transpose(0, 1).contiguous()


def split_frames(n_frames: int, world: int) -> List[Tuple[int, int]]:
    """Contiguous [lo, hi) frame ranges per rank, near-equal in count. Raises ValueError
    when there are fewer frames than ranks (SPAVA.md section 1 limit)."""
    if n_frames < world:
        raise ValueError(f"frame-parallel vision needs at least one frame per context-parallel "
                         f"rank: the video has {n_frames} frames for {world} ranks; sample more "
                         f"frames or use fewer ranks")
    bounds = [round(r * n_frames / world) for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def encode_frames_frame_parallel(model: InternVL3Model, pixels: Tensor,
                                 cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Embeddings [F * tokens_per_tile, hidden] of all frames on every rank of `cp_group`,
    each rank encoding a disjoint slice of the frames and all-gathering the rest (exact:
    frames never attend to each other).

    pixels: [F, C, S, S], the same on every rank, on any device: only this rank's slice
    is moved to the model's device.
    """
    rank, world = group_rank_world(cp_group)
    ranges = split_frames(pixels.shape[0], world)
    lo, hi = ranges[rank]
    local = model.encode_frames(pixels[lo:hi].to(model.vision_tower.device))  # [f, T, hidden]
    if world == 1:
        return local.flatten(0, 1)
    most = max(b - a for a, b in ranges)
    padded = local.new_zeros(most, *local.shape[1:])
    padded[: local.shape[0]] = local
    gathered = local.new_empty(world * most, *local.shape[1:])
    all_gather(gathered, padded, cp_group, world, async_op=False)
    gathered = gathered.view(world, most, *local.shape[1:])
    return torch.cat([gathered[r, : b - a] for r, (a, b) in enumerate(ranges)]).flatten(0, 1)
