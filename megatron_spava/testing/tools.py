"""Run a command of the checkout's tools/ the way a user does: `python tools/<name>.py ...`,
in a fresh process from the checkout's root (tests use the commands; nothing imports them)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(path: str, argv: Sequence[str], timeout: float = 900) -> int:
    """Run `python <checkout>/<path> argv`; on a non-zero exit print its stdout and stderr
    (pytest shows them). Returns the exit status."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, path), *map(str, argv)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        print(out.stdout[-4000:], out.stderr[-4000:], sep="\n")
    return out.returncode
