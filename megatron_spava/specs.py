"""Layer specs: megatron-core's GPT layer with `SpavaCoreAttention` as core_attention.

Both backends megatron-core offers are supported, and only the core attention changes:
  local  megatron-core's own ColumnParallel/RowParallel linears (no TE needed)
  te     Transformer Engine linears and norms (TE must be importable)
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from .algos import get as get_algorithm
from .modules import SpavaCoreAttention

BACKENDS = ("local", "te")


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch extension imports."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken or CPU-only install
        return False
    return True


def get_gpt_layer_spec(backend: str = "local", algo: Optional[str] = None, **kwargs) -> ModuleSpec:
    """megatron-core's GPT layer spec for `backend`, with SpavaCoreAttention swapped in
    (or, when the registry entry of `algo` names its own core-attention module, that one).

    kwargs go to `get_gpt_layer_local_spec` / `get_gpt_layer_with_transformer_engine_spec`
    (e.g. normalization="RMSNorm", qk_layernorm=True). Raises ImportError naming
    transformer_engine when backend="te" and it is not importable.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "local":
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**kwargs)
    elif backend == "te":
        if not te_available():
            raise ImportError(
                "the 'te' layer spec needs NVIDIA Transformer Engine (the transformer_engine "
                "package, e.g. `pip install megatron_spava[te]` on a CUDA machine); it is not "
                "importable here. Use backend='local' for megatron-core's own layers")
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    else:
        raise ValueError(f"unknown layer-spec backend {backend!r}; choose from {BACKENDS}")
    attention = spec.submodules.self_attention
    if not hasattr(attention.submodules, "core_attention"):
        raise ValueError("this layer spec has no core_attention to replace (MLA is not supported)")
    own = get_algorithm(algo).core_attention if algo is not None else None
    attention.submodules.core_attention = own or SpavaCoreAttention
    return spec
