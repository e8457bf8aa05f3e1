"""Every difference between the megatron-core versions this package supports (>=0.16.1,<0.20).

This is the only module that adapts to megatron-core's version, and it never reads the
version string: each function detects the feature (a signature, a type) and its comment
says which versions need what. Everything else calls these functions.

  legacy_grouped_gemm_kwargs(config)     the MoE spec keyword only 0.16.1 has
  stock_get_batch_on_this_cp_rank(b, g)  megatron-core's own zigzag CP sharding of a batch
  spec_module_and_submodules(value)      (module class, submodules) of one spec entry
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Tuple


# ---- layer-spec builders: moe_use_legacy_grouped_gemm ----------------------------------
# megatron-core 0.16.1: get_gpt_layer_local_spec and get_gpt_layer_with_transformer_engine_spec
#   take `moe_use_legacy_grouped_gemm` (force the legacy GroupedMLP for MoE), and
#   TransformerConfig has the field of that name (Megatron-LM core_v0.16.1 passes it on).
# megatron-core 0.17.0 and later: the keyword and the field are gone (legacy GroupedMLP
#   removed); passing the keyword raises TypeError.
def legacy_grouped_gemm_kwargs(config) -> Dict[str, Any]:
    """The layer-spec keywords for megatron-core's legacy grouped GEMM, read from
    `config` (a TransformerConfig): {"moe_use_legacy_grouped_gemm": ...} where the spec
    builders take it (0.16.1), {} where they do not (0.17+)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    if "moe_use_legacy_grouped_gemm" not in inspect.signature(get_gpt_layer_local_spec).parameters:
        return {}
    return {"moe_use_legacy_grouped_gemm": bool(getattr(config, "moe_use_legacy_grouped_gemm", False))}


# ---- megatron-core's own CP batch sharding ----------------------------------------------
# megatron-core 0.16.1 and 0.17.x: get_batch_on_this_cp_rank(batch, cp_group=None); without
#   cp_group it reads the CP size and rank from megatron.core.parallel_state.
# megatron-core 0.18.0 and later: get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=None,
#   ...) reads the CP size and rank from `cp_group` (torch.distributed.get_world_size/get_rank)
#   and dispatches on batch["cu_seqlens"] (None: the per-sequence zigzag of before).
def stock_get_batch_on_this_cp_rank(batch: Dict[str, Any], cp_group=None) -> Dict[str, Any]:
    """megatron-core's `get_batch_on_this_cp_rank` (the zigzag of 2W chunks) on `batch`
    ([b, S, ...] tensors; attention_mask [b, 1, S, S]), for the CP group `cp_group`
    (default: megatron-core's parallel_state CP group)."""
    from megatron.core import parallel_state, utils
    fn = utils.get_batch_on_this_cp_rank
    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in inspect.signature(fn).parameters:
        return fn(batch, is_hybrid_cp=False, cp_group=cp_group)
    return fn(batch, cp_group=cp_group)


# ---- layer-spec entries: ModuleSpec or a builder partial --------------------------------
# megatron-core 0.16.1 and 0.17.x: a GPT layer spec's `mlp` is ModuleSpec(module=MLP,
#   submodules=MLPSubmodules(linear_fc1=..., linear_fc2=...)).
# megatron-core 0.18.0 and later: it is functools.partial(MLP.as_mlp_submodule,
#   submodules=MLPSubmodules(...)) (likewise MoE's experts); the class is the bound method's
#   __self__, the submodules a keyword of the partial.
def spec_module_and_submodules(value: Any) -> Tuple[Optional[type], Any]:
    """(module class, submodules dataclass or None) of one entry of a layer spec: a class,
    a ModuleSpec, or a functools.partial of a class or of its `as_*_submodule` classmethod.
    (None, None) for anything else (functions, IdentityOp instances, None)."""
    if isinstance(value, functools.partial):
        func = value.func
        module = func if isinstance(func, type) else getattr(func, "__self__", None)
        return (module if isinstance(module, type) else None), value.keywords.get("submodules")
    if isinstance(value, type):
        return value, None
    if hasattr(value, "module") and hasattr(value, "submodules"):  # ModuleSpec
        module = value.module
        return (module if isinstance(module, type) else None), value.submodules
    return None, None
