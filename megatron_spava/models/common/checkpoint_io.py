"""Checkpoint I/O shared by every model family: HF safetensors <-> megatron-core distributed
checkpoints, streamed tensor by tensor with a progress bar.

  hf_to_dist(family, hf_dir, out_dir)        HF -> megatron-core dist checkpoint (loads at any TP)
  dist_to_hf(family, ckpt_dir, out_dir)      dist checkpoint -> HF safetensors (the source's keys)
  load_hf_into_model(family, model, source)  HF weights -> an already-built TP-sharded model
  load_dist_into_model(model, ckpt_dir)      dist checkpoint -> a model built at any TP, either backend
  iter_hf_tensors / count_hf_tensors         safetensors shards, one tensor at a time
  single_process_parallel_state()            a 1-rank gloo world with megatron-core's parallel state

A family (`CheckpointFamily`) says what differs: its config, an empty model, and the pure
name mapping (an HF -> megatron streaming converter, megatron -> HF, the TP slice of a
global tensor). A dist checkpoint is TP-agnostic: megatron-core reshards it to the loading
model's TP size from the model's own sharded_state_dict. Every conversion is a reshuffle,
so HF -> megatron -> HF is bit-exact. Megatron names come from the mapping in the local
layer layout; `to_model_layout` renames them for a Transformer Engine model (norms fused
into linear_qkv / linear_fc1), so a checkpoint loads into either backend.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

META_FILE = "megatron_spava_meta.json"
#: Files copied from the HF directory so that a converted checkpoint carries its
#: tokenizer, processor configs and chat template.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.json",
              "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json")


@dataclass(frozen=True)
class CheckpointFamily:
    """What checkpoint conversion needs from one model family.

    name: the family (written into the checkpoint's metadata);
    config_from_hf(dir) -> cfg (with .validate(tp));
    build_model(cfg, dtype, backend) -> a TP=1 model whose weights will all be overwritten;
    hf_to_megatron(cfg) -> a streaming converter: feed(hf_name, tensor) -> [(megatron_name,
      global tensor)], finish() raising for leftover parts;
    megatron_to_hf(name, tensor, cfg) -> [(hf_name, tensor)] (local or TE key layout);
    shard_for_tp(name, tensor, rank, size, cfg) -> this TP rank's slice.

    Its methods are this module's conversions bound to the family: each family's
    `convert` module exports them as its API (`load_hf_into_model(model, source, ...)`,
    `hf_to_dist(hf_dir, out_dir, ...)`, `dist_to_hf(ckpt_dir, out_dir, ...)`).
    """

    name: str
    config_from_hf: Callable
    build_model: Callable
    hf_to_megatron: Callable
    megatron_to_hf: Callable
    shard_for_tp: Callable

    def load_hf_into_model(self, model, source, *, tp_rank: int, tp_size: int, progress: bool = True) -> None:
        """`load_hf_into_model` for this family."""
        load_hf_into_model(self, model, source, tp_rank=tp_rank, tp_size=tp_size, progress=progress)

    def hf_to_dist(self, hf_dir: str, out_dir: str, *, tensor_parallel: int = 1, backend: str = "local",
                   progress: bool = True) -> str:
        """`hf_to_dist` for this family."""
        return hf_to_dist(self, hf_dir, out_dir, tensor_parallel=tensor_parallel, backend=backend,
                          progress=progress)

    def dist_to_hf(self, ckpt_dir: str, out_dir: str, *, max_shard_bytes: int = 5 << 30,
                   progress: bool = True) -> str:
        """`dist_to_hf` for this family."""
        return dist_to_hf(self, ckpt_dir, out_dir, max_shard_bytes=max_shard_bytes, progress=progress)


def read_hf_config(source) -> dict:
    """An HF config as a dict, from a checkpoint directory, a config.json path, or the dict
    itself (copied). FileNotFoundError, naming the source, when there is no config.json."""
    if isinstance(source, str):
        path = os.path.join(source, "config.json") if os.path.isdir(source) else source
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: no config.json at {source}")
        with open(path) as f:
            return json.load(f)
    return dict(source)


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="tensor", disable=not enabled)


def hf_safetensors_files(hf_dir: str) -> List[str]:
    """The safetensors shards of an HF checkpoint directory (index order), or ValueError."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF checkpoint directory not found: {hf_dir}")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not names:
        raise ValueError(f"no *.safetensors weights in {hf_dir}")
    return [os.path.join(hf_dir, n) for n in names]


def iter_hf_tensors(hf_dir: str) -> Iterator[Tuple[str, Tensor]]:
    """(name, tensor) of every tensor in the checkpoint, read one at a time."""
    from safetensors import safe_open
    for path in hf_safetensors_files(hf_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64}


def count_hf_tensors(hf_dir: str) -> Tuple[int, Dict[str, torch.dtype]]:
    """Number of tensors, and their dtypes by name, without reading the data."""
    from safetensors import safe_open
    dtypes = {}
    for path in hf_safetensors_files(hf_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{key}: unsupported weight dtype {kind}")
                dtypes[key] = _SAFETENSORS_DTYPES[kind]
    return len(dtypes), dtypes


def megatron_parameters(model) -> Dict[str, Tensor]:
    """The model's weights by name, in its backend's key layout (megatron-core's
    `_extra_state` entries left out)."""
    return dict(model.named_parameters())


def to_model_layout(name: str, model_names) -> str:
    """A megatron name from a family's HF -> megatron mapping (local layout) in the layout of
    a model whose parameter names are `model_names` (a set): renamed for a TE model, else
    unchanged."""
    from ...specs import local_to_te_key
    if name in model_names:
        return name
    return local_to_te_key(name)


def load_hf_into_model(family: CheckpointFamily, model, source, *, tp_rank: int, tp_size: int,
                       progress: bool = True) -> None:
    """Stream HF weights into a (TP-sharded) model of `family`, on either layer backend.
    source: an HF checkpoint directory, or an iterable of (name, tensor) in either HF key
    layout (e.g. an HF model's state_dict().items()). Checks every weight arrives once with
    the right shape."""
    if isinstance(source, str):
        total, _ = count_hf_tensors(source)
        source = iter_hf_tensors(source)
    else:
        source = list(source)
        total = len(source)
    params = megatron_parameters(model)
    seen = set()
    conv = family.hf_to_megatron(model.cfg)
    with torch.no_grad():
        for name, tensor in _progress(source, total, "loading HF weights", progress):
            for mname, global_t in conv.feed(name, tensor):
                mname = to_model_layout(mname, params)
                if mname not in params:
                    raise KeyError(f"{name} maps to {mname}, which the model does not have")
                local = family.shard_for_tp(mname, global_t, tp_rank, tp_size, model.cfg)
                if local.shape != params[mname].shape:
                    raise ValueError(f"{name}: shape {tuple(global_t.shape)} does not fit {mname} "
                                     f"{tuple(params[mname].shape)} at TP {tp_size}")
                params[mname].copy_(local)
                seen.add(mname)
    conv.finish()
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"the HF checkpoint lacks weights for {missing[:5]} (+{max(0, len(missing) - 5)})")


@contextlib.contextmanager
def single_process_parallel_state():
    """A 1-rank gloo world with megatron-core's parallel state (TP = CP = 1), for the
    conversion tools. Reuses an existing world if one is initialised."""
    from megatron.core import parallel_state as ps

    created = False
    if not dist.is_initialized():
        tmp = tempfile.mkdtemp()
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rdzv')}",
                                rank=0, world_size=1, timeout=datetime.timedelta(minutes=30))
        created = True
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    try:
        yield
    finally:
        if created:
            ps.destroy_model_parallel()
            dist.destroy_process_group()


def empty_model(family: CheckpointFamily, cfg, dtype: torch.dtype, backend: str = "local"):
    """A TP=1 model with uninitialised weights in CPU memory (every one is overwritten),
    on megatron-core's local layers or Transformer Engine's ("te": needs TE and CUDA)."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from ... import cpu_compat

    cpu_compat.apply()
    initialize_rng_tracker(inference_rng_tracker=True)
    return family.build_model(cfg, dtype, backend)


def copy_side_files(src: str, dst: str) -> None:
    """Copy the tokenizer, processor configs and chat template (`SIDE_FILES`)."""
    for name in SIDE_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(dst, name))


def hf_to_dist(family: CheckpointFamily, hf_dir: str, out_dir: str, *, tensor_parallel: int = 1,
               backend: str = "local", progress: bool = True) -> str:
    """Convert an HF checkpoint directory of `family` into a megatron-core dist checkpoint
    in out_dir. tensor_parallel: a TP size to validate head/group divisibility for (the
    checkpoint itself loads at any valid TP). backend: the layers the writer builds ("local"
    or "te"); the checkpoint is the same either way (megatron-core stores the local norms
    under TE's names) and loads into either backend."""
    from megatron.core import dist_checkpointing

    cfg = family.config_from_hf(hf_dir)
    cfg.validate(tensor_parallel)
    _, dtypes = count_hf_tensors(hf_dir)
    kinds = set(dtypes.values())
    if len(kinds) != 1:
        raise ValueError(f"mixed dtypes in the HF checkpoint: {sorted(map(str, kinds))}")
    dtype = kinds.pop()
    os.makedirs(out_dir, exist_ok=True)
    with single_process_parallel_state():
        model = empty_model(family, cfg, dtype, backend)
        load_hf_into_model(family, model, hf_dir, tp_rank=0, tp_size=1, progress=progress)
        dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    copy_side_files(hf_dir, out_dir)
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"format": f"megatron_spava {family.name} dist checkpoint", "dtype": str(dtype),
                   "hf_keys": sorted(dtypes)}, f, indent=1)
    return out_dir


def load_dist_into_model(model, ckpt_dir: str) -> None:
    """Load a dist checkpoint into a model built at any TP size (megatron-core reshards) on
    either backend, whichever backend wrote it. Both backends store the norms under the
    same keys (megatron-core maps the local names to TE's); `_extra_state` entries (TE's
    FP8 metadata, None for local layers) differ between backends and carry no weights, so
    they are neither read nor required. Every weight must be in the checkpoint."""
    from megatron.core import dist_checkpointing
    from ...specs import is_extra_state

    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"megatron checkpoint directory not found: {ckpt_dir}")
    request = {k: v for k, v in model.sharded_state_dict().items() if not is_extra_state(k)}
    state = dist_checkpointing.load(request, ckpt_dir)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{ckpt_dir} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")


def dist_to_hf(family: CheckpointFamily, ckpt_dir: str, out_dir: str, *,
               max_shard_bytes: int = 5 << 30, progress: bool = True) -> str:
    """Convert a dist checkpoint of `family` back to HF safetensors (on-disk key layout,
    the source's keys)."""
    from safetensors.torch import save_file

    cfg = family.config_from_hf(ckpt_dir)
    meta_path = os.path.join(ckpt_dir, META_FILE)
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    keep = set(meta.get("hf_keys", []))
    dtype = getattr(torch, meta.get("dtype", "torch.bfloat16").replace("torch.", ""))
    os.makedirs(out_dir, exist_ok=True)
    with single_process_parallel_state():
        model = empty_model(family, cfg, dtype)
        load_dist_into_model(model, ckpt_dir)
        params = megatron_parameters(model)
        shards: List[Dict[str, Tensor]] = [{}]
        size = 0
        for mname, tensor in _progress(params.items(), len(params), "writing HF weights", progress):
            for hname, t in family.megatron_to_hf(mname, tensor.detach(), cfg):
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
    copy_side_files(ckpt_dir, out_dir)
    return out_dir
