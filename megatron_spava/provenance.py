"""Which commit produced a result, for the JSON every benchmark and evaluation writes.

The device machines receive a copy of the working tree whose git metadata is stale (it
reads the commit the session started from), so `MEGATRON_SPAVA_COMMIT`, when set, wins;
otherwise `git rev-parse` of this checkout, marked "+dirty" when tracked files differ."""

from __future__ import annotations

import os
import subprocess
from typing import Optional

COMMIT_ENV = "MEGATRON_SPAVA_COMMIT"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(explicit: Optional[str] = None, *, short: bool = False) -> str:
    """`explicit`, else $MEGATRON_SPAVA_COMMIT, else this checkout's HEAD (+dirty), else
    "unknown"."""
    if explicit:
        return explicit
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
