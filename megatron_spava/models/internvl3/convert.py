"""Checkpoint conversion for InternVL3: HF safetensors <-> megatron-core distributed
checkpoints, streamed tensor by tensor with a progress bar.

  hf_to_dist(hf_dir, out_dir)        HF -> megatron-core dist checkpoint (loads at any TP)
  dist_to_hf(ckpt_dir, out_dir)      dist checkpoint -> HF safetensors (the source's keys)
  load_hf_into_model(model, source)  HF directory or (name, tensor) pairs -> a TP-sharded model
  load_dist_into_model(model, dir)   dist checkpoint -> a model built at any TP

The file handling (safetensors shards, the 1-rank gloo world, side files, dist-checkpoint
loading) is Qwen2.5-VL's (`qwen2_5_vl.convert`), imported; what differs per family is the
config, the model and the name mapping (`checkpoint.py`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from torch import Tensor

from ..qwen2_5_vl.checkpoint import megatron_parameters
from ..qwen2_5_vl.convert import (  # noqa: F401  (load_dist_into_model is re-exported)
    META_FILE, _copy_side_files, _progress, count_hf_tensors, iter_hf_tensors, load_dist_into_model,
    single_process_parallel_state)
from .checkpoint import HFToMegatron, megatron_to_hf, shard_for_tp
from .config import InternVL3Config

FORMAT = "megatron_spava internvl3 dist checkpoint"


def load_hf_into_model(model, source, *, tp_rank: int, tp_size: int, progress: bool = True) -> None:
    """Stream HF weights into a (TP-sharded) InternVL3Model. source: an HF checkpoint
    directory, or an iterable of (name, tensor) in either HF key layout (e.g. an HF
    model's state_dict().items()). Checks every weight arrives once with the right shape."""
    if isinstance(source, str):
        total, _ = count_hf_tensors(source)
        source = iter_hf_tensors(source)
    else:
        source = list(source)
        total = len(source)
    params = megatron_parameters(model)
    seen = set()
    conv = HFToMegatron(model.cfg)
    with torch.no_grad():
        for name, tensor in _progress(source, total, "loading HF weights", progress):
            for mname, global_t in conv.feed(name, tensor):
                if mname not in params:
                    raise KeyError(f"{name} maps to {mname}, which the model does not have")
                local = shard_for_tp(mname, global_t, tp_rank, tp_size, model.cfg)
                if local.shape != params[mname].shape:
                    raise ValueError(f"{name}: shape {tuple(global_t.shape)} does not fit {mname} "
                                     f"{tuple(params[mname].shape)} at TP {tp_size}")
                params[mname].copy_(local)
                seen.add(mname)
    conv.finish()
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"the HF checkpoint lacks weights for {missing[:5]} (+{max(0, len(missing) - 5)})")


def _empty_model(cfg: InternVL3Config, dtype: torch.dtype):
    """A TP=1 CPU model with uninitialised weights (every one is overwritten)."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from ... import cpu_compat
    from .model import InternVL3Model

    cpu_compat.apply()
    initialize_rng_tracker(inference_rng_tracker=True)
    return InternVL3Model(cfg, dtype=dtype, use_cpu_initialization=True, perform_initialization=False)


def hf_to_dist(hf_dir: str, out_dir: str, *, tensor_parallel: int = 1, progress: bool = True) -> str:
    """Convert an HF InternVL directory into a megatron-core dist checkpoint in out_dir.
    tensor_parallel: a TP size to validate head/width divisibility for (the checkpoint
    itself loads at any valid TP)."""
    from megatron.core import dist_checkpointing

    cfg = InternVL3Config.from_hf(hf_dir)
    cfg.validate(tensor_parallel)
    _, dtypes = count_hf_tensors(hf_dir)
    kinds = set(dtypes.values())
    if len(kinds) != 1:
        raise ValueError(f"mixed dtypes in the HF checkpoint: {sorted(map(str, kinds))}")
    dtype = kinds.pop()
    os.makedirs(out_dir, exist_ok=True)
    with single_process_parallel_state():
        model = _empty_model(cfg, dtype)
        load_hf_into_model(model, hf_dir, tp_rank=0, tp_size=1, progress=progress)
        dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    _copy_side_files(hf_dir, out_dir)
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"format": FORMAT, "dtype": str(dtype), "hf_keys": sorted(dtypes)}, f, indent=1)
    return out_dir


def dist_to_hf(ckpt_dir: str, out_dir: str, *, max_shard_bytes: int = 5 << 30,
               progress: bool = True) -> str:
    """Convert a dist checkpoint back to HF safetensors (on-disk key layout)."""
    from safetensors.torch import save_file

    cfg = InternVL3Config.from_hf(ckpt_dir)
    meta_path = os.path.join(ckpt_dir, META_FILE)
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    keep = set(meta.get("hf_keys", []))
    dtype = getattr(torch, meta.get("dtype", "torch.bfloat16").replace("torch.", ""))
    os.makedirs(out_dir, exist_ok=True)
    with single_process_parallel_state():
        model = _empty_model(cfg, dtype)
        load_dist_into_model(model, ckpt_dir)
        params = megatron_parameters(model)
        shards: List[Dict[str, Tensor]] = [{}]
        size = 0
        for mname, tensor in _progress(params.items(), len(params), "writing HF weights", progress):
            for hname, t in megatron_to_hf(mname, tensor.detach(), cfg):
                if keep and hname not in keep:
                    continue  # e.g. lm_head of a tied model whose source did not store it
                nbytes = t.numel() * t.element_size()
                if size + nbytes > max_shard_bytes and shards[-1]:
                    shards.append({})
                    size = 0
                shards[-1][hname] = t.contiguous().clone()
                size += nbytes
    weight_map = {}
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    _copy_side_files(ckpt_dir, out_dir)
    return out_dir
