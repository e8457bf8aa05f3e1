"""Apply, check or revert megatron_spava's patch to a Megatron-LM checkout.

    megatron-spava-patch-megatron-lm check  /path/to/Megatron-LM   # dry run, exit 1 if none fits
    megatron-spava-patch-megatron-lm apply  /path/to/Megatron-LM
    megatron-spava-patch-megatron-lm revert /path/to/Megatron-LM
    megatron-spava-patch-megatron-lm status /path/to/Megatron-LM   # which patch, applied or not
(`python tools/megatron_lm_patch.py ...` is the same command.)

Each patch adds `--context-parallel-algo` to Megatron-LM's arguments (and megatron_spava's
`--spava-*` options when it is installed), selects megatron_spava's layer spec and RoPE
when the flag is set, and shards batches by the algorithm's layout in pretrain_gpt.py.
Megatron-LM rewrote these files between tags, so there is one patch per family of tags
(PATCHES). The checkout is detected by its content: the patch whose every hunk applies
(or, for revert/status, is applied) is the one; `git describe` is only reported. Nothing
is written before every hunk has been checked.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional, Tuple

#: The three files every patch touches.
FILES = ("megatron/training/arguments.py", "gpt_builders.py", "pretrain_gpt.py")

#: patch file (in patches/) -> the Megatron-LM tags it was checked on, and what marks them.
PATCHES = {
    "megatron_lm_core_v0.16.1.patch": (("core_v0.16.1",),
                                       "spec builder reads args (args = get_args()); dict get_batch"),
    "megatron_lm_core_v0.17.0.patch": (("core_v0.17.0", "core_v0.17.1"),
                                       "config-driven spec builder; dict get_batch"),
    "megatron_lm_core_v0.18.0.patch": (("core_v0.18.0", "core_v0.18.2"),
                                       "config-driven spec builder; BATCH_KEYS inside get_batch"),
    "megatron_lm_core_v0.19.0.patch": (("core_v0.19.0",),
                                       "config-driven spec builder; module-level BATCH_KEYS"),
}


def supported_tags() -> List[str]:
    return [tag for tags, _ in PATCHES.values() for tag in tags]


def patches_dir() -> str:
    """patches/ shipped with the package (package data), else the repository's patches/
    next to the package (a source checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "patches"), os.path.join(here, "..", "patches")):
        if os.path.isfile(os.path.join(candidate, next(iter(PATCHES)))):
            return os.path.normpath(candidate)
    raise FileNotFoundError(f"megatron_spava's Megatron-LM patches are not installed (looked in "
                            f"{here}/patches and {os.path.dirname(here)}/patches)")


def patch_path(name: str) -> str:
    return os.path.join(patches_dir(), name)


def _git_apply(checkout: str, patch: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *flags, patch_path(patch)], cwd=checkout,
                          capture_output=True, text=True)


def detect(checkout: str) -> Tuple[Optional[str], str]:
    """(patch name, "not applied" | "applied") for the one patch that fits `checkout`,
    or (None, "conflicts") if none does."""
    for name in PATCHES:
        if _git_apply(checkout, name, "--check").returncode == 0:
            return name, "not applied"
        if _git_apply(checkout, name, "--check", "--reverse").returncode == 0:
            return name, "applied"
    return None, "conflicts"


def status(checkout: str) -> str:
    """'applied', 'not applied' or 'conflicts' for the patch that fits `checkout`."""
    return detect(checkout)[1]


def _describe(checkout: str) -> str:
    out = subprocess.run(["git", "describe", "--tags", "--always"], cwd=checkout,
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def _features(checkout: str) -> str:
    """What the checkout's files look like, for the error when no patch fits."""
    def read(rel):
        with open(os.path.join(checkout, rel), encoding="utf-8") as f:
            return f.read()
    pretrain, builders, arguments = read("pretrain_gpt.py"), read("gpt_builders.py"), \
        read("megatron/training/arguments.py")
    spec_fn = builders.split("def _get_transformer_layer_spec", 1)[-1].split("\ndef ", 1)[0]
    batch_keys = ("module-level BATCH_KEYS" if "\nBATCH_KEYS" in pretrain else
                  "BATCH_KEYS inside get_batch" if "BATCH_KEYS" in pretrain else "dict get_batch")
    return (f"pretrain_gpt.py: {batch_keys}; gpt_builders.py: spec builder "
            f"{'reads args' if 'args = get_args()' in spec_fn else 'config-driven'}; "
            f"arguments.py: {'has' if '--cp-comm-type' in arguments else 'no'} --cp-comm-type")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-spava-patch-megatron-lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["check", "apply", "revert", "status"])
    parser.add_argument("megatron_lm", help="path to a Megatron-LM checkout (tags: %s)"
                        % ", ".join(supported_tags()))
    args = parser.parse_args(argv)
    root = args.megatron_lm
    missing = [f for f in FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        parser.error(f"{root} does not look like Megatron-LM: missing {', '.join(missing)}")
    version = _describe(root)
    name, state = detect(root)
    if name is None:
        print(f"no megatron_spava patch fits {root} (git describe: {version}; {_features(root)}). "
              f"Supported Megatron-LM tags: {', '.join(supported_tags())}", file=sys.stderr)
        return 1
    tags = ", ".join(PATCHES[name][0])
    if args.action == "status":
        print(f"{state} ({name}, for {tags}; git describe: {version})")
        return 0
    if args.action in ("check", "apply") and state == "applied":
        print(f"already applied ({name})")
        return 0
    if args.action == "revert" and state == "not applied":
        print(f"not applied ({name}); nothing to revert")
        return 0
    if args.action == "check":
        print(f"{name} (for {tags}) applies cleanly to {root} (git describe: {version})")
        return 0
    result = _git_apply(root, name, *(["--reverse"] if args.action == "revert" else []))
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return 1
    print(f"{'reverted' if args.action == 'revert' else 'applied'} {name}: {', '.join(FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
