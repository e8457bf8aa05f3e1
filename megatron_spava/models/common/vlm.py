"""What a vision-language model on megatron-core needs regardless of its family: the model
interface `inference.generate` runs (one loop for every family), and the pieces both
families share (placing vision embeddings into the local rows, the logits head, weight
sharding over CP, 1-D RoPE positions).

A family subclasses `VideoLanguageModel` and provides:
  cfg                      with eos_token_ids, vision_token_id and query_length(input_ids)
  language_model           a megatron-core GPTModel (its embedding and output layer are used here)
  encode_video(inputs, cp_group) -> [n_vision_tokens, hidden] on every rank (frame-parallel
                           over cp_group; None: this rank encodes every frame)
  prompt_positions(input_ids, inputs, *, max_new_tokens, rope_convention) -> positions with
                           take(idx) and decode(step) (`TokenPositions` for 1-D RoPE)
  forward(decoder_input [s, b, hidden], position_ids, logits_rows=None) -> logits [b, s', vocab]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core.transformer.module import MegatronModule


def placeholder_ordinals(input_ids: Tensor, token_id: int) -> Tensor:
    """For every token [b, S], the row of the vision embeddings it takes (row-major over the
    batch, as HF's masked_scatter), or -1 for other tokens."""
    mask = input_ids == token_id
    ordinal = mask.flatten().long().cumsum(0).view_as(mask) - 1
    return torch.where(mask, ordinal, torch.full_like(ordinal, -1))


def qwen2_text_config(cfg, *, tensor_parallel: int, context_parallel: int, dtype: torch.dtype,
                      use_cpu_initialization: bool, perform_initialization: bool, **extra):
    """megatron-core's TransformerConfig of a family's Qwen2 language model (QKV bias, SwiGLU,
    RMSNorm) from its config (num_layers, hidden_size, num_heads, num_kv_heads,
    intermediate_size, head_dim, rms_norm_eps); `extra` adds family fields (mrope_section)."""
    import torch.nn.functional as F

    from ..gpt import gpt_config
    return gpt_config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, ffn_hidden_size=cfg.intermediate_size,
        tensor_parallel=tensor_parallel, context_parallel=context_parallel, dtype=dtype,
        kv_channels=cfg.head_dim, layernorm_epsilon=cfg.rms_norm_eps, add_qkv_bias=True,
        activation_func=F.silu, use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization, **extra)


class TokenPositions:
    """1-D RoPE positions of a prompt of `length` tokens: prompt token i sits at i, decoded
    token k (0-based) at length + k. take/decode give host LongTensors [s]."""

    def __init__(self, length: int):
        self.length = length

    def take(self, idx: Tensor) -> Tensor:
        return torch.as_tensor(idx, dtype=torch.long).cpu()

    def decode(self, step: int) -> Tensor:
        return torch.tensor([self.length + step])


class VideoLanguageModel(MegatronModule):
    """Base of the vision-language models: see the module docstring for what a family adds."""

    def query_length(self, input_ids: Tensor) -> int:
        """Tokens of the default query of a prompt [1, S] (the question and assistant prefix
        after the video), by the family's rule (`cfg.query_length`)."""
        return self.cfg.query_length(input_ids)

    def vision_ordinals(self, input_ids: Tensor) -> Tensor:
        """[b, S]: the row of the vision embeddings each token takes, -1 for text."""
        return placeholder_ordinals(input_ids, self.cfg.vision_token_id)

    def shard_weights(self, cp_group: Optional[dist.ProcessGroup]):
        """Keep 1/CP of every language-model layer's weights on each rank of `cp_group`,
        gathered layer by layer during forward (`megatron_spava.weight_sharding`). The
        embedding, output layer and vision encoder stay whole. Call after loading weights.
        Returns the ShardedParameters (its `unshard()` undoes this)."""
        from ...weight_sharding import shard_parameters
        return shard_parameters(list(self.language_model.decoder.layers), cp_group)

    def decoder_input(self, input_ids: Tensor, vision_embeds: Optional[Tensor] = None,
                      ordinals: Optional[Tensor] = None) -> Tensor:
        """Embeddings [s, b, hidden] of this rank's tokens input_ids [b, s]; positions where
        ordinals [b, s] >= 0 take row `ordinal` of vision_embeds [n, hidden]."""
        x = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if vision_embeds is not None and ordinals is not None:
            # megatron-core's embedding output is a fresh tensor (never a view of the table): fill in place
            rows = (ordinals.t() >= 0).nonzero(as_tuple=True)
            x[rows] = vision_embeds[ordinals.t()[rows]].to(x.dtype)
        return x

    def lm_forward(self, decoder_input: Tensor, rotary: Tensor, logits_rows: Optional[Tensor] = None,
                   vocab: Optional[int] = None) -> Tensor:
        """The decoder and the output layer: decoder_input [s, b, hidden] with the rotary
        embedding `rotary` -> logits [b, s', vocab] (gathered over TP) of the local rows
        `logits_rows` (default: all; a prefill needs only the last token's: all of them
        cost s x vocab memory, 39 GB at 128K tokens for 7B), the first `vocab` columns
        (default: all)."""
        lm = self.language_model
        hidden = lm.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)
        if logits_rows is not None:
            hidden = hidden.index_select(0, logits_rows.to(hidden.device))
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
        logits, _ = lm.output_layer(hidden, weight=weight, runtime_gather_output=True)
        if vocab is not None:
            logits = logits[..., :vocab]
        return logits.transpose(0, 1).contiguous()
