"""The toy family's conversions: `models.common.checkpoint_io`'s loops bound to its config
and Qwen2.5-VL's model and name mapping."""

import torch

from megatron_spava.models.common import checkpoint_io
from megatron_spava.models.common.checkpoint_io import load_dist_into_model  # noqa: F401
from megatron_spava.models.qwen2_5_vl.checkpoint import HFToMegatron, megatron_to_hf, normalize_hf_name, shard_for_tp

from .config import ToyConfig


def _build(cfg: ToyConfig, dtype: torch.dtype, backend: str):
    from megatron_spava.models.qwen2_5_vl.model import Qwen25VLModel
    return Qwen25VLModel(cfg, dtype=dtype, backend=backend, use_cpu_initialization=True,
                         perform_initialization=False)


CONVERSION = checkpoint_io.CheckpointFamily(
    name="toy_vl", config_from_hf=ToyConfig.from_hf, build_model=_build, hf_to_megatron=HFToMegatron,
    megatron_to_hf=megatron_to_hf, shard_for_tp=shard_for_tp, normalize_hf_name=normalize_hf_name)
load_hf_into_model = CONVERSION.load_hf_into_model
hf_to_dist = CONVERSION.hf_to_dist
dist_to_hf = CONVERSION.dist_to_hf
