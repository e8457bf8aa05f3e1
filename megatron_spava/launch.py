"""Start a command-line program on several local ranks when it was not started by torchrun,
and set up the process group it then runs in."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def relaunch(module: str, nproc: int, argv: Optional[Sequence[str]] = None) -> None:
    """Run `python -m module argv` on `nproc` local ranks through torchrun and return when
    they finish. NVLink multicast stays off; CPU threads are split between the ranks."""
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    args = list(sys.argv[1:] if argv is None else argv)
    # The ranks do not need --nproc, and torchrun's own parser would reject it as an
    # ambiguous abbreviation of its --nproc-per-node / --nproc_per_node.
    for i in reversed(range(len(args))):
        if args[i] == "--nproc":
            del args[i:i + 2]
        elif args[i].startswith("--nproc="):
            del args[i]
    torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", module, *args])


def init_distributed(device: str) -> torch.device:
    """Under torchrun: pick this rank's GPU (or the CPU compatibility patches) and start the
    NCCL (or gloo) process group. Returns the device to run on."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        return torch.device("cuda", torch.cuda.current_device())
    from . import cpu_compat
    cpu_compat.apply()
    dist.init_process_group("gloo")
    return torch.device("cpu")


#: Warnings megatron-core prints in every process on machines without Transformer Engine or
#: Apex (and its deprecation notes): known, harmless for this project's local layers.
_KNOWN_WARNING_PATTERNS = ("Transformer Engine", "Apex is not installed", "apex", "TransformerEngine",
                           "full scope is deprecated")


def quiet_known_warnings(verbose: bool = False, announce: bool = True) -> None:
    """Hide the known megatron-core warnings (any warning raised from megatron/core, and
    any mentioning Transformer Engine or Apex). With `announce`, the first one hidden is
    replaced by a single line saying so; with `verbose`, nothing is hidden."""
    import re
    import warnings

    if verbose:
        return
    pattern = re.compile("|".join(map(re.escape, _KNOWN_WARNING_PATTERNS)))
    original = warnings.showwarning
    shown = []

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if f"{os.sep}megatron{os.sep}core{os.sep}" in filename or pattern.search(text):
            if announce and not shown:
                shown.append(True)
                print("note: megatron-core warns that Transformer Engine/Apex are missing and uses "
                      "its local fallbacks (--verbose shows its warnings)", file=sys.stderr, flush=True)
            return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
