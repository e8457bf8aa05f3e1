"""Every difference between the megatron-core versions this package supports (>=0.16.1,<0.20).

This is the only module that adapts to megatron-core's version, and it never reads the
version string: each function detects the feature (a signature, a type) and its comment
says which versions need what. Everything else calls these functions.

  legacy_grouped_gemm_kwargs(config)     the MoE spec keyword only 0.16.1 has
  stock_get_batch_on_this_cp_rank(b, g)  megatron-core's own zigzag CP sharding of a batch
  spec_module_and_submodules(value)      (module class, submodules) of one spec entry
  dist_checkpoint_common_state(ckpt_dir, metadata)  where a dist checkpoint keeps its common state
  silence_no_cuda_runtime_warning()      drop the CPU-machine line 0.17+'s import makes torch log
  dist_save_forks_writers()              whether a dist-checkpoint save forks writer processes
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
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


# ---- dist checkpoints: where the common (non-tensor) state lives ------------------------
# megatron-core 0.16.1 to 0.18.x: dist_checkpointing.save writes the common state to
#   `common.pt` beside the torch_dist files, and load reads it from there only.
# megatron-core 0.19.0 and later: save stores it as the ShardedObject "common_state" inside
#   the torch_dist files (no common.pt); load reads either (a legacy common.pt first). So a
#   checkpoint written by 0.19 does not load with 0.16.1-0.18.x; one written by those loads
#   with 0.19.
COMMON_PT = "common.pt"
COMMON_STATE_KEY = "common_state"


def reads_common_state_from_torch_dist() -> bool:
    """Whether this megatron-core loads a checkpoint's common state from inside its
    torch_dist files (0.19+; detected by its loader's legacy-format check)."""
    from megatron.core.dist_checkpointing import serialization
    return hasattr(serialization, "_legacy_common_state_exists")


def dist_checkpoint_common_state(ckpt_dir: str, metadata) -> Optional[str]:
    """Where the dist checkpoint in `ckpt_dir` keeps its common state: the path of its
    common.pt, or None when it is the "common_state" entry of the torch_dist files
    (`metadata`: torch.distributed.checkpoint's Metadata of the checkpoint, its `.metadata`).
    FileNotFoundError naming common.pt when it has neither; ValueError when it has only the
    torch_dist entry and this megatron-core cannot read that (0.16.1-0.18.x)."""
    path = os.path.join(ckpt_dir, COMMON_PT)
    if os.path.isfile(path):
        return path
    inside = any(key == COMMON_STATE_KEY or key.startswith(COMMON_STATE_KEY + "/")
                 for key in metadata.state_dict_metadata)
    if not inside:
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is not a complete megatron-core "
                                f"dist checkpoint (and its torch_dist files hold no common_state)")
    if not reads_common_state_from_torch_dist():
        import megatron.core
        raise ValueError(f"{ckpt_dir} keeps its common state inside its torch_dist files (written by "
                         f"megatron-core 0.19 or later); this megatron-core "
                         f"{getattr(megatron.core, '__version__', '?')} reads only {COMMON_PT}")
    return None


# ---- importing megatron-core on a machine without CUDA ---------------------------------
# megatron-core 0.17.0 and later (tensor_parallel/random.py) import torch.utils.cpp_extension
#   when megatron.core.transformer is imported; 0.16.1 does not. With PyPI's CUDA build of torch
#   (the only torch 2.13.0 build for Python 3.12) on a machine without a CUDA driver, that
#   import logs "No CUDA runtime is found, using CUDA_HOME=..." on stderr. Nothing here builds
#   C++/CUDA extensions, so the line is noise on every CPU run of every program (and breaks
#   their "one error line" output).
class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


_NO_CUDA_RUNTIME_FILTER = _NoCudaRuntimeFilter()


def silence_no_cuda_runtime_warning() -> None:
    """Drop exactly that record from torch.utils.cpp_extension's logger (idempotent; every
    other record passes). megatron_spava/__init__.py calls it, before megatron.core loads."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _NO_CUDA_RUNTIME_FILTER not in logger.filters:
        logger.addFilter(_NO_CUDA_RUNTIME_FILTER)


# ---- dist checkpoint writers: processes or threads --------------------------------------
# megatron-core 0.16.1: FileSystemWriterAsync writes each file bucket in a forked process
#   (write_preloaded_data_multiproc), so a save has child processes while it writes.
# megatron-core 0.17.0 and later: it writes them in threads of the saving process
#   (write_preloaded_data_multithread): no child process.
def dist_save_forks_writers() -> bool:
    """Whether this megatron-core's dist-checkpoint save writes in forked processes."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    return hasattr(FileSystemWriterAsync, "write_preloaded_data_multiproc")
