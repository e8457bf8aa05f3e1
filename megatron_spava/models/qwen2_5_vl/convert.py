"""Checkpoint conversion for Qwen2.5-VL: HF safetensors <-> megatron-core distributed
checkpoints, streamed tensor by tensor with a progress bar.

  hf_to_dist(hf_dir, out_dir)        HF -> megatron-core dist checkpoint (loads at any TP)
  dist_to_hf(ckpt_dir, out_dir)      dist checkpoint -> HF safetensors (same names/keys as the source)
  load_hf_into_model(model, hf_dir)  HF -> an already-built TP-sharded model, on the fly
  load_dist_into_model(model, dir)   dist checkpoint -> an already-built model at any TP

The file handling, the 1-rank gloo world and the loops are `models.common.checkpoint_io`'s;
what is Qwen2.5-VL's is the config, the model and the name mapping (`checkpoint.py`),
gathered in `CONVERSION`.
"""

from __future__ import annotations

import torch

from ..common import checkpoint_io
from ..common.checkpoint_io import load_dist_into_model  # noqa: F401  (this family's API too)
from .checkpoint import HFToMegatron, megatron_to_hf, normalize_hf_name, shard_for_tp
from .config import Qwen25VLConfig


def _build(cfg: Qwen25VLConfig, dtype: torch.dtype, backend: str):
    from .model import Qwen25VLModel
    return Qwen25VLModel(cfg, dtype=dtype, backend=backend, use_cpu_initialization=True,
                         perform_initialization=False)


CONVERSION = checkpoint_io.CheckpointFamily(
    name="qwen2_5_vl", config_from_hf=Qwen25VLConfig.from_hf, build_model=_build,
    hf_to_megatron=HFToMegatron, megatron_to_hf=megatron_to_hf, shard_for_tp=shard_for_tp,
    normalize_hf_name=normalize_hf_name)


# This family's conversions (models.common.checkpoint_io's, bound to CONVERSION): see their docs there.
load_hf_into_model = CONVERSION.load_hf_into_model
hf_to_dist = CONVERSION.hf_to_dist
dist_to_hf = CONVERSION.dist_to_hf
