"""Generated files that later runs reuse (the needle videos, the generated checkpoints),
written so that an interrupted or damaged entry is rebuilt, never trusted.

  cached_file(path, build)   build(tmp) writes one file; renamed into place, then its
                             SHA-256 written beside it (PATH.sha256)
  cached_dir(path, build)    build(tmp_dir) fills a folder; a manifest of every file's
                             SHA-256 (MANIFEST) is written into it, then it is renamed into place

An entry is reused only when its digest (every file's, for a folder) matches what was
recorded when it was completed: a file cut short by a kill, a folder with a weight file but
no tokenizer, or a file damaged later are all rebuilt. Building is deterministic here (the
generators are seeded), so a rebuilt entry equals the lost one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable

MANIFEST = ".megatron_spava_complete.json"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def file_is_complete(path: str) -> bool:
    """Whether `path` was completed by `cached_file` and is unchanged since."""
    sidecar = path + ".sha256"
    if not (os.path.isfile(path) and os.path.isfile(sidecar)):
        return False
    with open(sidecar) as f:
        return f.read().strip() == _digest(path)


def cached_file(path: str, build: Callable[[str], object]) -> str:
    """`path`, built by `build(tmp_path)` unless a complete, undamaged copy is there. The
    temporary name keeps the extension (writers pick the format from it)."""
    if file_is_complete(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial-{os.getpid()}{ext}"
    try:
        build(tmp)
        digest = _digest(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _write_atomic(path + ".sha256", digest + "\n")
    return path


def dir_is_complete(path: str) -> bool:
    """Whether folder `path` was completed by `cached_dir` and no file of it changed since."""
    manifest = os.path.join(path, MANIFEST)
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        return all(_digest(os.path.join(path, name)) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached_dir(path: str, build: Callable[[str], object]) -> str:
    """Folder `path`, built by `build(tmp_dir)` into a temporary folder beside it and renamed
    into place, unless a complete, undamaged one is there (an incomplete or damaged one is
    replaced whole)."""
    if dir_is_complete(path):
        return path
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-{os.getpid()}-", dir=parent)
    try:
        build(tmp)
        files = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                full = os.path.join(root, name)
                files[os.path.relpath(full, tmp)] = _digest(full)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"files": files}, f, indent=1)
        os.chmod(tmp, 0o755)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(path, os.path.join(old, base))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
