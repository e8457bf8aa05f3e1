"""Hooks the Megatron-LM patches (patches/megatron_lm_core_v0.16.1.patch and
patches/megatron_lm_core_v0.19.0.patch) call, the same way on every supported tag.

The patches keep Megatron-LM's changes to a few lines; everything they need is here:
  layer_spec(args, use_te, config)         gpt_builders._get_transformer_layer_spec
  prepare_model(model, args)               gpt_builders.gpt_builder, after GPTModel(...)
  configure_model_config(model_cfg, args)  core_v0.19's pretrain_gpt __main__, after
                                           gpt_config_from_args (it builds the model from that
                                           GPTModelConfig, not through gpt_builders)
  get_batch_on_this_cp_rank_from_args(b)   pretrain_gpt.get_batch, for the CP slicing
Each is used only when `--context-parallel-algo` is set, and each says so once on rank 0
(`megatron_spava: ...` lines; examples/megatron_lm/compare_eval_loss.py requires them, so a
launch the hooks did not reach cannot pass as a match).

They follow the contracts of Megatron-LM core_v0.19.0, which core_v0.16.1 also meets:
the layer spec is built from the TransformerConfig (`config.num_moe_experts`,
`config.normalization`, ...), as core_v0.17+'s `_get_transformer_layer_spec(use_te, config)`
does, and the batch is a dict holding every key of pretrain_gpt's `BATCH_KEYS` (the
packing keys `cu_seqlens`, `max_seqlen`, ... may be None), returned with the same keys.

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
from .batch import SEQUENCE_KEYS, get_batch_on_this_cp_rank
from .compat import legacy_grouped_gemm_kwargs
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


def layer_spec(args, use_te: bool, config):
    """The GPT layer spec for Megatron-LM's `--transformer-impl local` or
    `transformer_engine`, with the algorithm's core attention (SpavaCoreAttention, or the
    module the registry entry names). `args` gives the algorithm and its `--spava-*`
    options; `config` (the run's TransformerConfig) gives the keywords megatron-core's spec
    builders take, as Megatron-LM's own `_get_transformer_layer_spec(use_te, config)`
    reads them. TE's fused norms read `config.normalization`, which `get_gpt_layer_spec`
    checks at build time."""
    run_config(args)
    if config.multi_latent_attention:
        raise ValueError("--context-parallel-algo does not support --multi-latent-attention")
    if getattr(config, "experimental_attention_variant", None) is not None:
        raise ValueError("--context-parallel-algo does not support --experimental-attention-variant")
    kwargs = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
                  qk_layernorm=config.qk_layernorm, qk_l2_norm=config.qk_l2_norm,
                  normalization=config.normalization, **legacy_grouped_gemm_kwargs(config))
    spec = get_gpt_layer_spec("te" if use_te else "local", algo=args.context_parallel_algo, **kwargs)
    core = spec.submodules.self_attention.submodules.core_attention
    _say_once(f"--context-parallel-algo {args.context_parallel_algo}: layer spec "
              f"({'te' if use_te else 'local'}) with core attention "
              f"{getattr(core, 'module', core).__name__}")
    return spec


def _say_once(message: str) -> None:
    """Print `message` once per process, on global rank 0 (or without torch.distributed)."""
    if message in _SAID:
        return
    _SAID.add(message)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"megatron_spava: {message}", flush=True)


_SAID: set = set()


def prepare_model(model, args):
    """Make the model's RoPE read global positions from the active request."""
    model = use_spava_rope(model)
    _say_once(f"--context-parallel-algo {args.context_parallel_algo}: layout-aware RoPE "
              f"({type(getattr(model, 'rotary_pos_emb', None)).__name__})")
    return model


#: core_v0.19's GPTModelConfig resolves its builder from this import path (`builder`).
MODEL_BUILDER = __name__ + ".SpavaGPTModelBuilder"


def configure_model_config(model_cfg, args):
    """core_v0.19's model path: pretrain_gpt builds the model from a GPTModelConfig
    (megatron.training.models.gpt) with the builder its `builder` names. Give it
    megatron_spava's layer spec (a callable of the config, as the builder calls its own
    `default_layer_spec`) and a builder that is Megatron-LM's GPTModelBuilder plus
    `prepare_model` on every model it builds. Returns model_cfg (changed in place)."""
    run_config(args)
    if model_cfg.transformer_layer_spec is not None:
        raise ValueError("--context-parallel-algo sets the layer spec itself: drop --spec")

    def spec(model_config, vp_stage=None):
        transformer = model_config.transformer
        return layer_spec(args, transformer.transformer_impl == "transformer_engine", transformer)

    model_cfg.transformer_layer_spec = spec
    model_cfg.builder = MODEL_BUILDER
    model_cfg._megatron_spava_args = args
    return model_cfg


@functools.lru_cache(maxsize=1)
def _spava_gpt_model_builder():
    from megatron.training.models.gpt import GPTModelBuilder  # Megatron-LM core_v0.19

    class SpavaGPTModelBuilder(GPTModelBuilder):
        """Megatron-LM's GPTModelBuilder, then megatron_spava's `prepare_model`."""

        def build_model(self, *args, **kwargs):
            model = super().build_model(*args, **kwargs)
            return prepare_model(model, self._model_config._megatron_spava_args)

    SpavaGPTModelBuilder.__module__ = __name__
    return SpavaGPTModelBuilder


def __getattr__(name: str):
    # SpavaGPTModelBuilder subclasses Megatron-LM's own builder, importable only inside a
    # Megatron-LM checkout: made when the GPTModelConfig asks for it.
    if name == "SpavaGPTModelBuilder":
        return _spava_gpt_model_builder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    previous batch's). Returns the batch with Megatron's keys, in Megatron's order.

    batch: pretrain_gpt's batch dict, [b, S] tensors under tokens/labels/loss_mask/
      position_ids; keys it does not shard (the packing keys of core_v0.19's BATCH_KEYS)
      pass through. Packed sequences (a `cu_seqlens` that is not None) raise ValueError."""
    if batch.get("cu_seqlens") is not None:
        raise ValueError("--context-parallel-algo does not support packed sequences (the batch "
                         "has cu_seqlens, as with --sft or --dataloader-inter-document-masking)")
    seq_length = next((batch[k].shape[-1] for k in SEQUENCE_KEYS if batch.get(k) is not None), None)
    if seq_length is None:
        raise ValueError(f"the batch has none of {SEQUENCE_KEYS}: nothing to shard")
    layout = _layout(args.context_parallel_algo, seq_length, args.spava_query_len,
                     args.context_parallel_size, run_config(args))
    local = get_batch_on_this_cp_rank(batch, layout)
    activate(layout, positions=local.pop("rope_positions"))
    return local
