"""InternVL3 on megatron-core: the InternViT encoder and projector of `vision.py` and a
GPTModel language model (Qwen2.5: GQA, QKV bias, SwiGLU, RMSNorm, 1-D RoPE) whose core
attention is megatron_spava's context-parallel attention.

    model = InternVL3Model(InternVL3Config.from_hf(path), tensor_parallel=tp, context_parallel=cp)
    embeds = model.encode_video(inputs, cp_group)                       # every rank, frame-parallel
    x = model.decoder_input(input_ids[:, idx], embeds, model.vision_ordinals(input_ids)[:, idx])
    with cp_request(layout, cache=cache):
        logits = model(x, idx)                                          # [b, s_local, V]

`inference.generate` runs this loop (prefill, decode, several questions), the same one as
Qwen2.5-VL's. Video frames are tiles: InternVL3 has no temporal patches, so every frame is
its own group of 256 tokens and frame parallelism splits the frames themselves.
"""

from __future__ import annotations

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
from ..common.vlm import TokenPositions, VideoLanguageModel, qwen2_text_config
from .config import InternVL3Config
from .vision import InternVLProjector, InternViT, pixel_shuffle


class InternVL3Model(VideoLanguageModel):
    """InternViT + projector + language model, tensor parallel over the current TP group.

    forward(decoder_input [s, b, hidden], position_ids [s] or None) -> logits [b, s, vocab]
    (gathered over TP; the embedding and output layer are padded to cfg.padded_vocab_size,
    the logits are not). position_ids: each token's global position (1-D RoPE); None takes
    them from the active request (`cp_request(layout, positions=...)`), or 0..s-1 without
    one (CP = 1). The context-parallel algorithm comes from the active request.
    backend: the language model's layers, "local" or "te" (Transformer Engine: norms fused
    into linear_qkv / linear_fc1); the vision side runs its own GEMMs on either.
    core_attention: the language model's core-attention class (default SpavaCoreAttention).
    """

    def __init__(self, cfg: InternVL3Config, *, tensor_parallel: int = 1, context_parallel: int = 1,
                 dtype: torch.dtype = torch.float32, backend: str = "local", core_attention=None,
                 use_cpu_initialization: bool = True, perform_initialization: bool = True,
                 max_sequence_length: int = 1 << 20, lm_fusions: Optional[str] = None):
        cfg.validate(tensor_parallel)
        fused_config, fused_spec = lm_fusion_settings(lm_fusions, backend)
        text = qwen2_text_config(cfg, tensor_parallel=tensor_parallel, context_parallel=context_parallel,
                                 dtype=dtype, use_cpu_initialization=use_cpu_initialization,
                                 perform_initialization=perform_initialization, **fused_config)
        super().__init__(config=text)
        self.cfg = cfg
        self.backend = backend_for_impl(backend)
        vision_tp = vision_tp_config(cfg.vision, tensor_parallel, dtype, use_cpu_initialization,
                                     perform_initialization)
        self.vision_tower = InternViT(cfg.vision, vision_tp, self.backend)
        self.multi_modal_projector = InternVLProjector(cfg, vision_tp, self.backend)
        self.language_model = GPTModel(
            config=text, transformer_layer_spec=get_gpt_layer_spec(
                self.backend, core_attention=core_attention, normalization=text.normalization,
                **fused_spec),
            vocab_size=cfg.padded_vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type="rope", rotary_base=cfg.rope_theta,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=False)
        use_spava_rope(self.language_model)
        cast_parameters(self, dtype)  # megatron-core builds its local norms in float32

    def encode_frames(self, pixels: Tensor, frames_per_pass: int = 64) -> Tensor:
        """Frames [F, C, S, S] -> LLM-width embeddings [F, tokens_per_tile, hidden]:
        InternViT, pixel shuffle, projector (HF's get_image_features), `frames_per_pass`
        frames at a time (frames are independent, so this bounds memory, not results)."""
        out = []
        for chunk in pixels.split(frames_per_pass):
            features = pixel_shuffle(self.vision_tower(chunk), self.cfg.scale)
            out.append(self.multi_modal_projector(features))
        return torch.cat(out)

    def encode_video(self, inputs, cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
        """Embeddings [F * tokens_per_tile, hidden] of an InternVLInputs' frames on every rank
        of `cp_group`, frame-parallel (None: this rank encodes all)."""
        return encode_frames_frame_parallel(self, inputs.pixel_values, cp_group)

    def prompt_positions(self, input_ids: Tensor, inputs, *, max_new_tokens: int = 0,
                         rope_convention: Optional[str] = None) -> TokenPositions:
        """1-D positions of the prompt input_ids [1, S] and the tokens decoded after it.
        Raises ValueError when the image tokens do not match the frames, past the dynamic
        RoPE's range, or for a rope_convention (Qwen2.5-VL's M-RoPE option)."""
        cfg = self.cfg
        if rope_convention is not None:
            raise ValueError(f"rope_convention {rope_convention!r}: InternVL3 has 1-D RoPE; the "
                             f"convention chooses Qwen2.5-VL's M-RoPE rule")
        S = input_ids.shape[1]
        cfg.check_prompt_length(S + max_new_tokens)
        frames, tokens = inputs.pixel_values.shape[0], int((input_ids == cfg.image_token_id).sum())
        if tokens != frames * cfg.tokens_per_tile:
            raise ValueError(f"the prompt has {tokens} image tokens for {frames} frames of "
                             f"{cfg.tokens_per_tile}")
        return TokenPositions(S)

    def forward(self, decoder_input: Tensor, position_ids: Optional[Tensor] = None,
                logits_rows: Optional[Tensor] = None) -> Tensor:
        """decoder_input [s, b, hidden], position_ids [s] (global positions, any device; None:
        the request's) -> logits [b, s', vocab] for the local rows `logits_rows` (default:
        all); a prefill needs only the last token's."""
        rope = self.language_model.rotary_pos_emb
        rotary = rope(decoder_input.shape[0]) if position_ids is None else rope.at(position_ids)
        return self.lm_forward(decoder_input, rotary, logits_rows, vocab=self.cfg.vocab_size)


def split_frames(n_frames: int, world: int) -> List[Tuple[int, int]]:
    """Contiguous [lo, hi) frame ranges per rank, near-equal in count. Raises ValueError
    when there are fewer frames than ranks (SPAVA.md section 1 limit)."""
    return split_groups(n_frames, world, unit="frame", units="frames")


def encode_frames_frame_parallel(model: InternVL3Model, pixels: Tensor,
                                 cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Embeddings [F * tokens_per_tile, hidden] of all frames on every rank of `cp_group`,
    each rank encoding a disjoint slice of the frames and all-gathering the rest (exact:
    frames never attend to each other).

    pixels: [F, C, S, S], the same on every rank, on any device: only this rank's slice
    is moved to the model's device.
    """
    device = model.vision_tower.device
    encode = lambda lo, hi: model.encode_frames(to_device(pixels[lo:hi], device)).flatten(0, 1)  # noqa: E731
    return encode_frame_parallel(encode, [model.cfg.tokens_per_tile] * pixels.shape[0], cp_group,
                                 unit="frame", units="frames")
