"""Hooks the Megatron-LM patch (patches/megatron_lm_core_v0.16.1.patch) calls.

The patch keeps Megatron-LM's changes to a few lines; everything they need is here:
  layer_spec(args, use_te)                 gpt_builders._get_transformer_layer_spec
  prepare_model(model, args)               gpt_builders.gpt_builder, after GPTModel(...)
  get_batch_on_this_cp_rank_from_args(b)   pretrain_gpt.get_batch, for the CP slicing
Each is used only when `--context-parallel-algo` is set.

The options are validated once per run (`run_config`, cached on `args`); each batch only
looks up the layout planned for its sequence length (planned and checked once per length).
Each batch's get_batch replaces the previous batch's request (`context.activate`);
`context.deactivate()` clears the last one.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import torch

from .algos import plan_layout
from .arguments import validate_spava_args
from .batch import get_batch_on_this_cp_rank
from .config import SpavaConfig
from .context import activate
from .modules import use_spava_rope
from .specs import get_gpt_layer_spec

_CONFIG_ATTR = "_megatron_spava_config"


def run_config(args) -> SpavaConfig:
    """The validated SpavaConfig of this run: validated on the first call, then read back
    from `args` (Megatron-LM's arguments do not change during a run)."""
    config = getattr(args, _CONFIG_ATTR, None)
    if config is None:
        config = validate_spava_args(args)
        setattr(args, _CONFIG_ATTR, config)
    return config


def layer_spec(args, use_te: bool):
    """The GPT layer spec for Megatron-LM's arguments (`--transformer-impl local` or
    `transformer_engine`), with the algorithm's core attention (SpavaCoreAttention, or the
    module the registry entry names). The same keywords Megatron-LM's
    `_get_transformer_layer_spec` gives megatron-core for either backend; TE's fused norms
    read `--normalization` from the config, which `get_gpt_layer_spec` checks."""
    run_config(args)
    if getattr(args, "multi_latent_attention", False):
        raise ValueError("--context-parallel-algo does not support --multi-latent-attention")
    kwargs = dict(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                  qk_layernorm=args.qk_layernorm, qk_l2_norm=args.qk_l2_norm,
                  moe_use_legacy_grouped_gemm=getattr(args, "moe_use_legacy_grouped_gemm", False),
                  normalization=args.normalization)
    return get_gpt_layer_spec("te" if use_te else "local", algo=args.context_parallel_algo,
                              **kwargs)


def prepare_model(model, args):
    """Make the model's RoPE read global positions from the active request."""
    return use_spava_rope(model)


@functools.lru_cache(maxsize=16)
def _layout(algo: str, seq_length: int, query_len: int, cp_size: int, config: SpavaConfig):
    """The layout of one sequence length, planned (and its sizes checked) once."""
    if not 1 <= query_len < seq_length:
        raise ValueError(f"--spava-query-len {query_len} must be in [1, seq_length={seq_length})")
    try:
        return plan_layout(algo, context_len=seq_length - query_len, query_len=query_len,
                           cp_size=cp_size, config=config)
    except ValueError as err:
        raise ValueError(f"--context-parallel-algo {algo} with --context-parallel-size {cp_size} "
                         f"and sequence length {seq_length}: {err}") from None


def get_batch_on_this_cp_rank_from_args(batch: Dict[str, Optional[torch.Tensor]], args):
    """Megatron-LM's get_batch step for the selected algorithm: look up the layout for
    this batch's sequence length (the last `--spava-query-len` tokens are the query),
    shard the batch, and activate the request for the forward that follows (replacing the
    previous batch's). Returns the batch with Megatron's keys, in Megatron's order."""
    seq_length = next(t.shape[-1] for t in batch.values() if t is not None)
    layout = _layout(args.context_parallel_algo, seq_length, args.spava_query_len,
                     args.context_parallel_size, run_config(args))
    local = get_batch_on_this_cp_rank(batch, layout)
    activate(layout, positions=local.pop("rope_positions"))
    return local
