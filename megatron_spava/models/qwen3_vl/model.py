"""Qwen3-VL on megatron-core: the vision encoder of `vision.py` and a GPTModel language
model (Qwen3: GQA, QK-norm, no QKV bias, SwiGLU, RMSNorm, interleaved M-RoPE) whose core
attention is megatron_spava's context-parallel attention, plus DeepStack.

    model = Qwen3VLModel(Qwen3VLConfig.from_hf(path), tensor_parallel=tp, context_parallel=cp)
    embeds = model.encode_video(inputs, cp_group)                 # every rank, frame-parallel
    x = model.decoder_input(input_ids[:, idx], embeds, model.vision_ordinals(input_ids)[:, idx])
    with cp_request(layout, cache=cache):
        logits = model(x, positions.take(idx))                    # [b, s_local, V]

DeepStack: the vision encoder's k tapped features are added to the outputs of the first k
LLM layers at the visual positions. Each rank places them with the layout's indices, as it
places the embeddings: `decoder_input` returns [s, b, hidden * (1 + k)] when vision
embeddings are given (the embeddings, then each layer's DeepStack feature, zero at text
rows), and `forward` adds slice j to layer j's output (a forward hook, so local and TE
layers alike). Without vision embeddings (decode steps, queries over the cache) it is
[s, b, hidden] and nothing is added, as in HF.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core.models.gpt.gpt_model import GPTModel

from ...specs import backend_for_impl, cast_parameters, get_gpt_layer_spec, lm_fusion_settings
from ..common.vision import vision_tp_config
from ..common.vlm import VideoLanguageModel
from ..qwen2_5_vl.model import encode_video_frame_parallel, split_frame_groups  # noqa: F401
from .config import Qwen3VLConfig
from .rope import MRopePositions, interleaved_mrope, rope_index
from .vision import Qwen3VLVisionEncoder


def qwen3_text_config(cfg: Qwen3VLConfig, *, tensor_parallel: int, context_parallel: int,
                      dtype: torch.dtype, use_cpu_initialization: bool, perform_initialization: bool,
                      **extra):
    """megatron-core's TransformerConfig of the Qwen3 language model: no QKV bias, QK-norm
    (RMSNorm over head_dim, megatron-core's qk_layernorm), explicit head_dim; for MoE,
    megatron-core's MoE layer with Qwen's router (top-k of the logits, softmax over those k =
    HF's softmax, top-k, re-normalise), no load balancing (inference), experts one after
    another (SequentialMLP) behind the all-gather dispatcher, expert TP = TP. `extra`: more
    TransformerConfig fields (the fusions of `specs.lm_fusion_settings`)."""
    import torch.nn.functional as F

    from ..gpt import gpt_config
    moe = {}
    if cfg.is_moe:
        moe = dict(num_moe_experts=cfg.num_experts, moe_router_topk=cfg.experts_per_token,
                   moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_router_pre_softmax=False,
                   moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                   moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)
    return gpt_config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, ffn_hidden_size=cfg.intermediate_size,
        tensor_parallel=tensor_parallel, context_parallel=context_parallel, dtype=dtype,
        kv_channels=cfg.head_dim, layernorm_epsilon=cfg.rms_norm_eps, add_qkv_bias=False,
        qk_layernorm=True, activation_func=F.silu, use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization, **moe, **extra)


def _moe_router_without_te() -> None:
    """megatron-core 0.16.1's router GEMM reads `te_general_gemm`, a name its moe_utils only
    defines when Transformer Engine imports (NameError otherwise, CPU included). Define it
    as None there, so the router takes its torch path; nothing changes where TE imports."""
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class Qwen3VLModel(VideoLanguageModel):
    """Vision encoder + language model, tensor parallel over the current TP group.

    backend: the language model's layers, "local" or "te" (Transformer Engine: norms fused
    into linear_qkv / linear_fc1; QK-norm stays q_layernorm / k_layernorm). The vision
    encoder runs its own GEMMs on either. core_attention: the language model's
    core-attention class (default SpavaCoreAttention).

    forward(decoder_input [s, b, hidden] or [s, b, hidden * (1 + k)], position_ids [3, b, s])
    -> logits [b, s, vocab] (gathered over TP). The context-parallel algorithm comes from
    the active request.
    """

    def __init__(self, cfg: Qwen3VLConfig, *, tensor_parallel: int = 1, context_parallel: int = 1,
                 dtype: torch.dtype = torch.float32, backend: str = "local", core_attention=None,
                 use_cpu_initialization: bool = True, perform_initialization: bool = True,
                 max_sequence_length: int = 1 << 20, lm_fusions: Optional[str] = None):
        cfg.validate(tensor_parallel)
        fused_config, fused_spec = lm_fusion_settings(lm_fusions, backend)
        text = qwen3_text_config(cfg, tensor_parallel=tensor_parallel, context_parallel=context_parallel,
                                 dtype=dtype, use_cpu_initialization=use_cpu_initialization,
                                 perform_initialization=perform_initialization, **fused_config)
        super().__init__(config=text)
        self.cfg = cfg
        self.backend = backend_for_impl(backend)
        if cfg.is_moe:
            _moe_router_without_te()
        self.visual = Qwen3VLVisionEncoder(cfg.vision, vision_tp_config(
            cfg.vision, tensor_parallel, dtype, use_cpu_initialization, perform_initialization))
        self.language_model = GPTModel(
            config=text, transformer_layer_spec=get_gpt_layer_spec(
                self.backend, core_attention=core_attention, normalization=text.normalization,
                qk_layernorm=True, num_experts=cfg.num_experts or None, **fused_spec),
            vocab_size=cfg.vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type="none",  # the interleaved M-RoPE is computed in forward
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=False)
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim), persistent=False)
        cast_parameters(self, dtype)  # megatron-core builds its local norms in float32
        self._deepstack: Optional[List[Tensor]] = None
        for j, layer in enumerate(list(self.language_model.decoder.layers)[:cfg.deepstack_layers]):
            layer.register_forward_hook(self._deepstack_hook(j))

    def _deepstack_hook(self, j: int):
        def hook(module, args, output):
            if self._deepstack is None:
                return output
            hidden, context = output
            return hidden + self._deepstack[j].to(hidden.dtype), context
        return hook

    def encode_video(self, inputs, cp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
        """Video embeddings and DeepStack features [n_video_tokens, hidden * (1 + k)] of a
        VideoQAInputs on every rank of `cp_group`, frame-parallel over its temporal groups
        (None: this rank encodes all)."""
        return encode_video_frame_parallel(self.visual, inputs.pixel_values_videos,
                                           inputs.video_grid_thw, cp_group)

    def decoder_input(self, input_ids: Tensor, vision_embeds: Optional[Tensor] = None,
                      ordinals: Optional[Tensor] = None) -> Tensor:
        """This rank's tokens input_ids [b, s] -> [s, b, hidden]; with vision_embeds
        [n, hidden * (1 + k)] and ordinals [b, s] (row of vision_embeds per token, -1 for
        text), [s, b, hidden * (1 + k)]: the embeddings with the vision rows placed, then
        the k DeepStack features at those rows (zero elsewhere)."""
        h, k = self.cfg.hidden_size, self.cfg.deepstack_layers
        x = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if vision_embeds is None or ordinals is None:
            return x
        if vision_embeds.shape[-1] != h * (1 + k):
            raise ValueError(f"vision embeddings of width {vision_embeds.shape[-1]}; Qwen3-VL's encoder "
                             f"gives hidden x (1 + {k} DeepStack) = {h * (1 + k)}")
        rows = (ordinals.t() >= 0).nonzero(as_tuple=True)
        picked = vision_embeds[ordinals.t()[rows]].to(x.dtype)
        x[rows] = picked[:, :h]
        if k == 0:
            return x
        deep = x.new_zeros(*x.shape[:2], k * h)
        deep[rows] = picked[:, h:]
        return torch.cat([x, deep], dim=-1)

    def prompt_positions(self, input_ids: Tensor, inputs, *, max_new_tokens: int = 0,
                         rope_convention: Optional[str] = None) -> MRopePositions:
        """M-RoPE positions of the prompt input_ids [1, S] around the video of `inputs` and of
        the tokens decoded after it (HF's get_rope_index). Raises ValueError when the video
        runs do not match the grid, or for a rope_convention (Qwen2.5-VL's choice)."""
        if rope_convention is not None:
            raise ValueError(f"rope_convention {rope_convention!r}: Qwen3-VL has one rope index "
                             f"(timestamps between frame groups); the convention is Qwen2.5-VL's")
        cfg = self.cfg
        positions, deltas = rope_index(input_ids, image_token_id=cfg.image_token_id,
                                       video_token_id=cfg.video_token_id,
                                       spatial_merge_size=cfg.vision.spatial_merge_size,
                                       video_grid_thw=inputs.video_grid_thw)
        return MRopePositions(positions, deltas)

    def forward(self, decoder_input: Tensor, position_ids: Tensor,
                logits_rows: Optional[Tensor] = None) -> Tensor:
        """decoder_input [s, b, hidden] (or with DeepStack features, `decoder_input`),
        position_ids [3, b, s] (any device) -> logits [b, s', vocab] for the local rows
        `logits_rows` (default: all)."""
        h, k = self.cfg.hidden_size, self.cfg.deepstack_layers
        x, deep = decoder_input, None
        if decoder_input.shape[-1] == h * (1 + k) and k:
            x = decoder_input[..., :h].contiguous()
            deep = list(decoder_input[..., h:].unflatten(-1, (k, h)).unbind(-2))
        elif decoder_input.shape[-1] != h:
            raise ValueError(f"decoder_input width {decoder_input.shape[-1]}: expected {h} or {h * (1 + k)}")
        rotary = interleaved_mrope(position_ids, self.inv_freq.float(), self.cfg.mrope_section)
        self._deepstack = deep
        try:
            return self.lm_forward(x, rotary, logits_rows)
        finally:
            self._deepstack = None
