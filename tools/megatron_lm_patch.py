#!/usr/bin/env python3
"""Apply, check or revert megatron_spava's patch to a Megatron-LM checkout.

The patch (patches/megatron_lm_core_v0.16.1.patch) adds `--context-parallel-algo` to
Megatron-LM's arguments (and megatron_spava's `--spava-*` options when it is
installed), selects megatron_spava's layer spec and RoPE when the flag is set, and
shards batches by the algorithm's layout in pretrain_gpt.py. It targets tag
core_v0.16.1; every hunk is checked before anything is written.

    python tools/megatron_lm_patch.py check  /path/to/Megatron-LM   # dry run, exit 1 if it fails
    python tools/megatron_lm_patch.py apply  /path/to/Megatron-LM
    python tools/megatron_lm_patch.py revert /path/to/Megatron-LM
    python tools/megatron_lm_patch.py status /path/to/Megatron-LM   # applied / not applied / conflicts
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "patches",
                     "megatron_lm_core_v0.16.1.patch")
TAG = "core_v0.16.1"
FILES = ("megatron/training/arguments.py", "gpt_builders.py", "pretrain_gpt.py")


def _git_apply(checkout: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *flags, os.path.abspath(PATCH)], cwd=checkout,
                          capture_output=True, text=True)


def status(checkout: str) -> str:
    """'applied', 'not applied' or 'conflicts' for the patch in `checkout`."""
    if _git_apply(checkout, "--check").returncode == 0:
        return "not applied"
    if _git_apply(checkout, "--check", "--reverse").returncode == 0:
        return "applied"
    return "conflicts"


def _describe(checkout: str) -> str:
    out = subprocess.run(["git", "describe", "--tags", "--always"], cwd=checkout,
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["check", "apply", "revert", "status"])
    parser.add_argument("megatron_lm", help="path to a Megatron-LM checkout (tag %s)" % TAG)
    args = parser.parse_args(argv)
    root = args.megatron_lm
    missing = [f for f in FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        parser.error(f"{root} does not look like Megatron-LM: missing {', '.join(missing)}")
    version = _describe(root)
    if version != TAG:
        print(f"note: checkout is at {version}; the patch targets {TAG}", file=sys.stderr)
    state = status(root)
    if args.action == "status":
        print(state)
        return 0 if state != "conflicts" else 1
    if args.action in ("check", "apply") and state == "applied":
        print("already applied")
        return 0
    if args.action == "revert" and state == "not applied":
        print("not applied; nothing to revert")
        return 0
    if state == "conflicts":
        print(f"the patch does not apply to {root} (at {version}):\n"
              f"{_git_apply(root, '--check').stderr}", file=sys.stderr)
        return 1
    if args.action == "check":
        print(f"applies cleanly to {root} (at {version})")
        return 0
    result = _git_apply(root, *(["--reverse"] if args.action == "revert" else []))
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return 1
    print(f"{'reverted' if args.action == 'revert' else 'applied'}: {', '.join(FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
