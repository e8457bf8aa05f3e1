"""A megatron-core GPTModel under any --context-parallel-algo: build it, run its prefill.

    model = build_gpt_model(config, vocab_size=V, algo="spava")      # our spec + layout RoPE
    logits = cp_prefill(model, tokens, layout)                       # this rank's rows

`algo=None` builds megatron-core's stock model (its own DotProductAttention and RoPE),
the independent reference the tests compare against.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..batch import get_batch_on_this_cp_rank
from ..context import cp_request
from ..modules import use_spava_rope
from ..specs import backend_for_impl, cast_parameters, get_gpt_layer_spec


def gpt_config(*, num_layers: int, hidden_size: int, num_attention_heads: int,
               num_query_groups: Optional[int] = None, ffn_hidden_size: Optional[int] = None,
               tensor_parallel: int = 1, context_parallel: int = 1,
               dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """A Llama/Qwen-style TransformerConfig for inference: RMSNorm, SwiGLU, no biases, no
    dropout, unfused kernels (so it also runs on CPU), weights initialised on the CPU
    (identical full weights for every TP size given the same seed)."""
    kwargs = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups or num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        tensor_model_parallel_size=tensor_parallel, context_parallel_size=context_parallel,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(config: TransformerConfig, *, vocab_size: int, max_sequence_length: int,
                    algo: Optional[str] = "spava", backend: str = "local", core_attention=None,
                    rotary_base: int = 10000, seed: int = 1234) -> GPTModel:
    """A GPTModel with RoPE whose core attention runs `algo` (None: megatron-core's stock
    layers and RoPE for `backend`). backend: "local" or "te" (Megatron-LM's
    `--transformer-impl` names work too). core_attention: the core-attention class
    (default SpavaCoreAttention; `algos.megatron.megatron_core_attention()` for TE's own CP).
    Every parameter is in `config.params_dtype`, norms included. Logits come back gathered
    over TP ([b, s, vocab]). Inference mode: the RNG tracker is megatron-core's inference
    tracker (no dropout)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True)
    if algo is None:
        if backend_for_impl(backend) == "te":
            spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        else:
            spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization)
    else:
        spec = get_gpt_layer_spec(backend, algo=algo, core_attention=core_attention,
                                  normalization=config.normalization)
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, position_embedding_type="rope",
                     rotary_base=rotary_base, parallel_output=False,
                     share_embeddings_and_output_weights=False)
    cast_parameters(model, config.params_dtype)
    if algo is not None:
        use_spava_rope(model)
    return model.eval()


@torch.no_grad()
def cp_prefill(model: GPTModel, tokens: torch.Tensor, layout, cp_rank: Optional[int] = None):
    """Prefill of a global batch `tokens` [b, S] on this CP rank: shard by the layout, run
    the model inside the request. Returns (logits [b, s_local, vocab], local indices)."""
    if cp_rank is None:
        from megatron.core import parallel_state
        cp_rank = parallel_state.get_context_parallel_rank()
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    local = get_batch_on_this_cp_rank({"tokens": tokens, "position_ids": positions}, layout, cp_rank)
    with cp_request(layout, positions=local["rope_positions"]):
        logits = model(local["tokens"], local["position_ids"], None)
    return logits, layout.local_indices(cp_rank)
