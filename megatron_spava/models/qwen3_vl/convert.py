"""Checkpoint conversion for Qwen3-VL: HF safetensors <-> megatron-core distributed
checkpoints, streamed tensor by tensor (`models.common.checkpoint_io`'s loops bound to
this family's config, model and name mapping).

  hf_to_dist(hf_dir, out_dir)        HF -> megatron-core dist checkpoint (loads at any TP)
  dist_to_hf(ckpt_dir, out_dir)      dist checkpoint -> HF safetensors (the source's keys)
  load_hf_into_model(model, source)  HF -> an already-built TP-sharded model, on the fly
  load_dist_into_model(model, dir)   dist checkpoint -> an already-built model at any TP
"""

from __future__ import annotations

import torch

from ..common import checkpoint_io
from ..common.checkpoint_io import load_dist_into_model  # noqa: F401  (this family's API too)
from .checkpoint import HFToMegatron, megatron_to_hf, shard_for_tp
from .config import Qwen3VLConfig


def _build(cfg: Qwen3VLConfig, dtype: torch.dtype, backend: str):
    from .model import Qwen3VLModel
    return Qwen3VLModel(cfg, dtype=dtype, backend=backend, use_cpu_initialization=True,
                        perform_initialization=False)


CONVERSION = checkpoint_io.CheckpointFamily(
    name="qwen3_vl", config_from_hf=Qwen3VLConfig.from_hf, build_model=_build,
    hf_to_megatron=HFToMegatron, megatron_to_hf=megatron_to_hf, shard_for_tp=shard_for_tp)

load_hf_into_model = CONVERSION.load_hf_into_model
hf_to_dist = CONVERSION.hf_to_dist
dist_to_hf = CONVERSION.dist_to_hf
