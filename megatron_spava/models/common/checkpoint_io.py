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

from ...compat import dist_checkpoint_common_state

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
    normalize_hf_name(name) -> the on-disk HF name of a name in either HF key layout
      (`dist_to_hf` writes the source's own names back through it);
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
    normalize_hf_name: Callable = None  # None: names are already on-disk names

    def load_hf_into_model(self, model, source, *, tp_rank: int, tp_size: int, progress: bool = True) -> None:
        """`load_hf_into_model` for this family."""
        load_hf_into_model(self, model, source, tp_rank=tp_rank, tp_size=tp_size, progress=progress)

    def hf_to_dist(self, hf_dir: str, out_dir: str, *, tensor_parallel: int = 1, backend: str = "local",
                   progress: bool = True, force: bool = False) -> str:
        """`hf_to_dist` for this family."""
        return hf_to_dist(self, hf_dir, out_dir, tensor_parallel=tensor_parallel, backend=backend,
                          progress=progress, force=force)

    def dist_to_hf(self, ckpt_dir: str, out_dir: str, *, max_shard_bytes: int = 5 << 30,
                   progress: bool = True, force: bool = False) -> str:
        """`dist_to_hf` for this family."""
        return dist_to_hf(self, ckpt_dir, out_dir, max_shard_bytes=max_shard_bytes, progress=progress,
                          force=force)


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
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{index} is damaged: {type(err).__name__}: {err}") from None
    else:
        names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not names:
        raise ValueError(f"no *.safetensors weights in {hf_dir}")
    return [os.path.join(hf_dir, n) for n in names]


@contextlib.contextmanager
def _open_safetensors(path: str):
    """safe_open, with a damaged or missing file reported as one ValueError naming it."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (named by the checkpoint's index)")
    try:
        f = safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path} is damaged: {' '.join(str(err).split())}") from None
    with f:
        yield f


def _get_tensor(f, path: str, key: str) -> Tensor:
    try:
        return f.get_tensor(key)
    except Exception as err:
        raise ValueError(f"{path} is damaged (tensor {key}): {' '.join(str(err).split())}") from None


def iter_hf_tensors(hf_dir: str) -> Iterator[Tuple[str, Tensor]]:
    """(name, tensor) of every tensor in the checkpoint, read one at a time."""
    for path in hf_safetensors_files(hf_dir):
        with _open_safetensors(path) as f:
            for key in f.keys():
                yield key, _get_tensor(f, path, key)


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F64": torch.float64}


def count_hf_tensors(hf_dir: str) -> Tuple[int, Dict[str, torch.dtype]]:
    """Number of tensors, and their dtypes by name, without reading the data."""
    dtypes = {}
    for path in hf_safetensors_files(hf_dir):
        with _open_safetensors(path) as f:
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


# ---------------------------------------------------------------------------------------------
# Output folders: written beside their destination under a temporary name, renamed into place.

_PARTIAL = ".partial-"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir: str, inputs=(), force: bool = False) -> None:
    """ValueError unless `out_dir` may receive a conversion: not an input, not inside one,
    not holding one, and empty or absent unless `force` (which replaces it whole)."""
    out = os.path.realpath(out_dir)
    for src in inputs:
        src_real = os.path.realpath(src)
        if _inside(out, src_real):
            raise ValueError(f"--out {out_dir} is the input {src} or inside it; choose a folder outside the input")
        if _inside(src_real, out):
            raise ValueError(f"the input {src} is inside --out {out_dir}; choose another --out")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ValueError(f"--out {out_dir} is not empty; pass --force to replace it whole, or choose an "
                         f"empty or new folder")


def _remove_stale_partials(parent: str, base: str) -> None:
    """Remove temporary folders of earlier conversions into the same --out whose process is gone
    (killed with SIGKILL, which no handler sees)."""
    prefix = f".{base}{_PARTIAL}"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:
            pass


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, inputs=(), force: bool = False):
    """Yield a temporary folder beside `out_dir` (`.NAME.partial-PID-XXXX`) to write into; when
    the block ends normally it is renamed to `out_dir` (an existing `out_dir` is replaced whole,
    which `check_output_dir` allows only when empty or with `force`). On any exception,
    KeyboardInterrupt included, the temporary folder is removed and `out_dir` is untouched."""
    check_output_dir(out_dir, inputs, force)
    out = os.path.abspath(out_dir)
    parent, base = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(parent, base)
    tmp = tempfile.mkdtemp(prefix=f".{base}{_PARTIAL}{os.getpid()}-", dir=parent)
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the output is an ordinary one
    try:
        yield tmp
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(out, os.path.join(old, base))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# megatron-core's dist checkpoint writer, without helper processes that outlive their parent.

_DIE_WITH_PARENT = [False]
_AT_FORK_REGISTERED = [False]


def _die_with_parent_in_child() -> None:
    if _DIE_WITH_PARENT[0]:
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            pass


def save_dist(sharded_state_dict, out_dir: str) -> None:
    """`megatron.core.dist_checkpointing.save`, synchronous, leaving no process behind:
    megatron-core's writer forks one process per file bucket and collects their results
    through a `multiprocessing.Manager` queue (a server process, plus multiprocessing's
    resource tracker). Here the results queue is an in-process queue (the synchronous save
    reads it in this process), and the forked writers are killed by the kernel if this
    process dies (PR_SET_PDEATHSIG), so SIGKILL leaves no orphan. Needs psutil
    (megatron-core's writer imports it; without it the writers die and the save hangs)."""
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    try:
        import psutil  # noqa: F401
    except ImportError:
        raise RuntimeError("megatron-core's dist checkpoint writer needs psutil: pip install psutil") from None
    if not _AT_FORK_REGISTERED[0] and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_die_with_parent_in_child)
        _AT_FORK_REGISTERED[0] = True
    previous = fsa._results_queue, fsa.FileSystemWriterAsync.write_preloaded_data
    fsa._results_queue = queue.Queue()
    if os.environ.get(STALL_ENV) == "dist-save":  # fault injection for tests: writers stall
        fsa.FileSystemWriterAsync.write_preloaded_data = staticmethod(_stalled_writer)
    _DIE_WITH_PARENT[0] = True
    try:
        dist_checkpointing.save(sharded_state_dict, out_dir)
    finally:
        _DIE_WITH_PARENT[0] = False
        fsa._results_queue = previous[0]
        fsa.FileSystemWriterAsync.write_preloaded_data = staticmethod(previous[1])


#: Fault injection for the tests: "dist-save" makes `save_dist`'s writer processes stall
#: (after saying so on stderr), so that a test can interrupt a conversion mid-write.
STALL_ENV = "MEGATRON_SPAVA_TEST_STALL"


def _stalled_writer(*args, **kwargs):
    import sys
    import time
    print(f"[{STALL_ENV}] dist checkpoint writer {os.getpid()} stalls", file=sys.stderr, flush=True)
    time.sleep(120)  # long enough for a test to interrupt it; short if the test itself dies


# ---------------------------------------------------------------------------------------------
# Checks of inputs and outputs.

def read_meta(ckpt_dir: str) -> dict:
    """The conversion metadata (`META_FILE`) of a dist checkpoint written by `hf_to_dist`:
    its dtype and the source's HF names. FileNotFoundError / ValueError naming the file."""
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: megatron-to-hf needs the metadata hf-to-megatron "
                                f"writes (the weights' dtype and HF names)")
    try:
        with open(path) as f:
            meta = json.load(f)
        getattr(torch, meta["dtype"].replace("torch.", ""))
        if not isinstance(meta["hf_keys"], list) or not meta["hf_keys"]:
            raise ValueError("no hf_keys")
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{path} is damaged: {type(err).__name__}: {err}") from None
    return meta


def check_dist_checkpoint(ckpt_dir: str) -> None:
    """FileNotFoundError / ValueError, naming the file, unless the dist checkpoint's files are
    all there and long enough: megatron-core's metadata.json, torch's .metadata index, the
    common state (common.pt, or inside the torch_dist files from megatron-core 0.19 on:
    compat.dist_checkpoint_common_state) and every .distcp file the index names at least as
    long as the data it indexes there."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"megatron checkpoint directory not found: {ckpt_dir}")
    for name in ("metadata.json", ".metadata"):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is not a complete megatron-core "
                                    f"dist checkpoint")

    def read(path, how):
        try:
            return how(path)
        except Exception as err:
            raise ValueError(f"{path} is damaged: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None

    read(os.path.join(ckpt_dir, "metadata.json"), lambda p: json.load(open(p)))
    metadata = read(os.path.join(ckpt_dir, ".metadata"), lambda p: FileSystemReader(ckpt_dir).read_metadata())
    common = dist_checkpoint_common_state(ckpt_dir, metadata)
    if common is not None:
        read(common, lambda p: torch.load(p, map_location="cpu", weights_only=False))
    needed: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (named by {os.path.join(ckpt_dir, '.metadata')})")
        size = os.path.getsize(path)
        if size < end:
            raise ValueError(f"{path} is truncated: {size} bytes, its index needs {end}")


def _source_names(family: CheckpointFamily, hf_keys) -> Dict[str, str]:
    """On-disk HF name -> the name the source stored it under."""
    norm = family.normalize_hf_name or (lambda n: n)
    return {norm(k): k for k in hf_keys}


def _model_as_hf(family: CheckpointFamily, model, cfg, names: Dict[str, str], progress: bool,
                 desc: str) -> Iterator[Tuple[str, Tensor]]:
    """The model's weights as HF tensors under the source's names (`names`: on-disk -> source);
    weights the source did not store (the lm_head of a tied model) are left out."""
    params = megatron_parameters(model)
    for mname, tensor in _progress(params.items(), len(params), desc, progress):
        for hname, t in family.megatron_to_hf(mname, tensor.detach(), cfg):
            if hname in names:
                yield names[hname], t


def _compare(name: str, got: Tensor, want: Tensor, where: str) -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        raise ValueError(f"read-back check failed: {name} in {where} differs from the input "
                         f"({got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)})")


def _check_all_seen(seen, expected, where: str) -> None:
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise ValueError(f"read-back check failed: {where} lacks {missing[:5]} (+{max(0, len(missing) - 5)})")


# ---------------------------------------------------------------------------------------------
# The conversions.

def hf_to_dist(family: CheckpointFamily, hf_dir: str, out_dir: str, *, tensor_parallel: int = 1,
               backend: str = "local", progress: bool = True, force: bool = False) -> str:
    """Convert an HF checkpoint directory of `family` into a megatron-core dist checkpoint
    in out_dir. tensor_parallel: a TP size to validate head/group divisibility for (the
    checkpoint itself loads at any valid TP). backend: the layers the writer builds ("local"
    or "te"); the checkpoint is the same either way (megatron-core stores the local norms
    under TE's names) and loads into either backend.

    out_dir must be new or empty (`force`: replaced whole), and neither the input nor inside
    it. The checkpoint is written into a temporary folder beside it, read back into a fresh
    model and compared, tensor for tensor, with the input's safetensors, then renamed into
    place: an error or an interrupt leaves out_dir untouched."""
    cfg = family.config_from_hf(hf_dir)
    cfg.validate(tensor_parallel)
    _, dtypes = count_hf_tensors(hf_dir)
    kinds = set(dtypes.values())
    if len(kinds) != 1:
        raise ValueError(f"mixed dtypes in the HF checkpoint: {sorted(map(str, kinds))}")
    dtype = kinds.pop()
    with atomic_output_dir(out_dir, [hf_dir], force) as tmp, single_process_parallel_state():
        model = empty_model(family, cfg, dtype, backend)
        load_hf_into_model(family, model, hf_dir, tp_rank=0, tp_size=1, progress=progress)
        save_dist(model.sharded_state_dict(), tmp)
        del model
        copy_side_files(hf_dir, tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"format": f"megatron_spava {family.name} dist checkpoint", "dtype": str(dtype),
                       "hf_keys": sorted(dtypes)}, f, indent=1)
        _verify_dist_against_hf(family, tmp, hf_dir, cfg, dtype, sorted(dtypes), progress)
    return out_dir


def _verify_dist_against_hf(family, ckpt_dir, hf_dir, cfg, dtype, hf_keys, progress) -> None:
    """Load the written dist checkpoint into a fresh model and compare every weight, as HF
    tensors, with the HF input's (read one at a time)."""
    files = {}
    for path in hf_safetensors_files(hf_dir):
        with _open_safetensors(path) as f:
            files.update({k: path for k in f.keys()})
    model = empty_model(family, cfg, dtype)
    load_dist_into_model(model, ckpt_dir)
    seen = set()
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(_open_safetensors(p)) for p in set(files.values())}
        for name, t in _model_as_hf(family, model, cfg, _source_names(family, hf_keys), progress,
                                    "checking the written checkpoint"):
            _compare(name, t, _get_tensor(handles[files[name]], files[name], name), "the written checkpoint")
            seen.add(name)
    _check_all_seen(seen, hf_keys, "the written checkpoint")


def load_dist_into_model(model, ckpt_dir: str) -> None:
    """Load a dist checkpoint into a model built at any TP size (megatron-core reshards) on
    either backend, whichever backend wrote it. Both backends store the norms under the
    same keys (megatron-core maps the local names to TE's); `_extra_state` entries (TE's
    FP8 metadata, None for local layers) differ between backends and carry no weights, so
    they are neither read nor required. Every weight must be in the checkpoint. A missing,
    truncated or unreadable file is a FileNotFoundError / ValueError naming it."""
    from megatron.core import dist_checkpointing
    from ...specs import is_extra_state

    check_dist_checkpoint(ckpt_dir)
    request = {k: v for k, v in model.sharded_state_dict().items() if not is_extra_state(k)}
    try:
        state = dist_checkpointing.load(request, ckpt_dir)
    except Exception as err:
        raise ValueError(f"{ckpt_dir} could not be loaded: {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}") from None
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{ckpt_dir} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")


def dist_to_hf(family: CheckpointFamily, ckpt_dir: str, out_dir: str, *,
               max_shard_bytes: int = 5 << 30, progress: bool = True, force: bool = False) -> str:
    """Convert a dist checkpoint of `family` (written by `hf_to_dist`) back to HF safetensors
    under the source's own names and dtype (from its `META_FILE`, which must be there).

    out_dir as for `hf_to_dist`: new or empty (`force`: replaced whole), outside the input,
    written beside it and renamed into place after the written safetensors, read back, equal
    the checkpoint's weights tensor for tensor and hold every name the source had."""
    from safetensors.torch import save_file

    cfg = family.config_from_hf(ckpt_dir)
    meta = read_meta(ckpt_dir)
    hf_keys = meta["hf_keys"]
    dtype = getattr(torch, meta["dtype"].replace("torch.", ""))
    check_dist_checkpoint(ckpt_dir)
    with atomic_output_dir(out_dir, [ckpt_dir], force) as tmp, single_process_parallel_state():
        model = empty_model(family, cfg, dtype)
        load_dist_into_model(model, ckpt_dir)
        shards: List[Dict[str, Tensor]] = [{}]
        size = 0
        for hname, t in _model_as_hf(family, model, cfg, _source_names(family, hf_keys), progress,
                                     "writing HF weights"):
            if any(hname in s for s in shards):
                raise ValueError(f"two megatron weights map to {hname}")
            nbytes = t.numel() * t.element_size()
            if size + nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][hname] = t.contiguous().clone()
            size += nbytes
        del model
        _check_all_seen({k for s in shards for k in s}, hf_keys, "the converted weights")
        weight_map = {}
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        copy_side_files(ckpt_dir, tmp)
        written = {}
        for name, t in iter_hf_tensors(tmp):  # read back
            _compare(name, t, shards[names.index(weight_map[name])][name] if name in weight_map else t,
                     "the written safetensors")
            written[name] = True
        _check_all_seen(written, hf_keys, "the written safetensors")
        extra = sorted(set(written) - set(hf_keys))
        if extra:
            raise ValueError(f"read-back check failed: the written safetensors hold {extra[:5]}, "
                             f"which the source did not")
    return out_dir
