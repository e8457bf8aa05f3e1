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
    torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", module,
              *(sys.argv[1:] if argv is None else argv)])


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
