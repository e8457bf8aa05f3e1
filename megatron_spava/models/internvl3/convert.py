"""Checkpoint conversion for InternVL3: HF safetensors <-> megatron-core distributed
checkpoints, streamed tensor by tensor with a progress bar.

  hf_to_dist(hf_dir, out_dir)        HF -> megatron-core dist checkpoint (loads at any TP)
  dist_to_hf(ckpt_dir, out_dir)      dist checkpoint -> HF safetensors (the source's keys)
  load_hf_into_model(model, source)  HF directory or (name, tensor) pairs -> a TP-sharded model
  load_dist_into_model(model, dir)   dist checkpoint -> a model built at any TP

The file handling, the 1-rank gloo world and the loops are `models.common.checkpoint_io`'s
(as for Qwen2.5-VL); what differs per family is the config, the model and the name mapping
(`checkpoint.py`), gathered in `FAMILY`. The language model loads into either layer backend
(`--transformer-impl local|transformer_engine`): the mapping's local names are renamed for
a TE model's fused norms, and a checkpoint written by either backend loads into the other.
"""

from __future__ import annotations

import torch

from ..common import checkpoint_io
from ..common.checkpoint_io import load_dist_into_model  # noqa: F401  (this family's API too)
from .checkpoint import HFToMegatron, megatron_to_hf, shard_for_tp
from .config import InternVL3Config


def _build(cfg: InternVL3Config, dtype: torch.dtype, backend: str):
    from .model import InternVL3Model
    return InternVL3Model(cfg, dtype=dtype, backend=backend, use_cpu_initialization=True,
                          perform_initialization=False)


FAMILY = checkpoint_io.CheckpointFamily(
    name="internvl3", config_from_hf=InternVL3Config.from_hf, build_model=_build,
    hf_to_megatron=HFToMegatron, megatron_to_hf=megatron_to_hf, shard_for_tp=shard_for_tp)


def load_hf_into_model(model, source, *, tp_rank: int, tp_size: int, progress: bool = True) -> None:
    """Stream HF weights into a (TP-sharded) InternVL3Model on either layer backend. source:
    an HF checkpoint directory, or an iterable of (name, tensor) in either HF key layout
    (e.g. an HF model's state_dict().items()). Checks every weight arrives once with the
    right shape."""
    checkpoint_io.load_hf_into_model(FAMILY, model, source, tp_rank=tp_rank, tp_size=tp_size,
                                     progress=progress)


def hf_to_dist(hf_dir: str, out_dir: str, *, tensor_parallel: int = 1, backend: str = "local",
               progress: bool = True) -> str:
    """Convert an HF InternVL directory into a megatron-core dist checkpoint in out_dir.
    tensor_parallel: a TP size to validate head/width divisibility for (the checkpoint
    itself loads at any valid TP). backend: the language model's layers the writer builds
    ("local" or "te"); the checkpoint is the same either way."""
    return checkpoint_io.hf_to_dist(FAMILY, hf_dir, out_dir, tensor_parallel=tensor_parallel,
                                    backend=backend, progress=progress)


def dist_to_hf(ckpt_dir: str, out_dir: str, *, max_shard_bytes: int = 5 << 30,
               progress: bool = True) -> str:
    """Convert a dist checkpoint back to HF safetensors (on-disk key layout)."""
    return checkpoint_io.dist_to_hf(FAMILY, ckpt_dir, out_dir, max_shard_bytes=max_shard_bytes,
                                    progress=progress)
