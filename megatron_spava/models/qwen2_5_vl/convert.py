"""Checkpoint conversion for Qwen2.5-VL: HF safetensors <-> megatron-core distributed
checkpoints, streamed tensor by tensor with a progress bar.

  hf_to_dist(hf_dir, out_dir)        HF -> megatron-core dist checkpoint (loads at any TP)
  dist_to_hf(ckpt_dir, out_dir)      dist checkpoint -> HF safetensors (same names/keys as the source)
  load_hf_into_model(model, hf_dir)  HF -> an already-built TP-sharded model, on the fly
  load_dist_into_model(model, dir)   dist checkpoint -> an already-built model at any TP

The file handling, the 1-rank gloo world and the loops are `models.common.checkpoint_io`'s;
what is Qwen2.5-VL's is the config, the model and the name mapping (`checkpoint.py`),
gathered in `FAMILY`.
"""

from __future__ import annotations

import torch

from ..common import checkpoint_io
from ..common.checkpoint_io import load_dist_into_model  # noqa: F401  (this family's API too)
from .checkpoint import HFToMegatron, megatron_to_hf, shard_for_tp
from .config import Qwen25VLConfig


def _build(cfg: Qwen25VLConfig, dtype: torch.dtype, backend: str):
    from .model import Qwen25VLModel
    return Qwen25VLModel(cfg, dtype=dtype, backend=backend, use_cpu_initialization=True,
                         perform_initialization=False)


FAMILY = checkpoint_io.CheckpointFamily(
    name="qwen2_5_vl", config_from_hf=Qwen25VLConfig.from_hf, build_model=_build,
    hf_to_megatron=HFToMegatron, megatron_to_hf=megatron_to_hf, shard_for_tp=shard_for_tp)


def load_hf_into_model(model, source, *, tp_rank: int, tp_size: int, progress: bool = True) -> None:
    """Stream HF weights into a (TP-sharded) Qwen25VLModel on either layer backend. source:
    an HF checkpoint directory, or an iterable of (name, tensor) in either HF key layout
    (e.g. an HF model's state_dict().items()). Checks every weight arrives once with the
    right shape."""
    checkpoint_io.load_hf_into_model(FAMILY, model, source, tp_rank=tp_rank, tp_size=tp_size,
                                     progress=progress)


def hf_to_dist(hf_dir: str, out_dir: str, *, tensor_parallel: int = 1, backend: str = "local",
               progress: bool = True) -> str:
    """Convert an HF Qwen2.5-VL directory into a megatron-core dist checkpoint in out_dir.
    tensor_parallel: a TP size to validate head/group divisibility for (the checkpoint
    itself loads at any valid TP). backend: the layers the writer builds ("local" or "te");
    the checkpoint is the same either way (megatron-core stores the local norms under TE's
    names) and loads into either backend."""
    return checkpoint_io.hf_to_dist(FAMILY, hf_dir, out_dir, tensor_parallel=tensor_parallel,
                                    backend=backend, progress=progress)


def dist_to_hf(ckpt_dir: str, out_dir: str, *, max_shard_bytes: int = 5 << 30,
               progress: bool = True) -> str:
    """Convert a dist checkpoint back to HF safetensors (on-disk key layout)."""
    return checkpoint_io.dist_to_hf(FAMILY, ckpt_dir, out_dir, max_shard_bytes=max_shard_bytes,
                                    progress=progress)
