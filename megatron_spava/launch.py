"""Start a command-line program on several local ranks when it was not started by torchrun,
and set up the process group it then runs in."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


#: Set by `relaunch` for its ranks: where a failing rank writes its error (one JSON file).
ERROR_DIR_ENV = "MEGATRON_SPAVA_ERROR_DIR"


class RankError(RuntimeError):
    """A rank failed; the message is the first failing rank's error, in one line."""


def relaunch(module: str, nproc: int, argv: Optional[Sequence[str]] = None, *,
             verbose: bool = True) -> None:
    """Run `python -m module argv` (or the script `module`, a path ending in .py) on `nproc`
    local ranks through torchrun and return when they finish. NVLink multicast stays off; CPU threads are split between the ranks.

    If a rank fails, raises RankError with the earliest error a rank reported through
    `report_rank_errors` (instead of torchrun's ChildFailedError report; with `verbose`,
    torchrun's own logging stays on)."""
    import json
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
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
    if not verbose:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="megatron_spava_errors_") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        try:
            target = [module] if module.endswith(".py") else ["-m", module]
            torchrun(["--standalone", f"--nproc-per-node={nproc}", *target, *args])
        except ChildFailedError as err:
            reports = []
            for name in os.listdir(errors):
                with open(os.path.join(errors, name)) as f:
                    reports.append(json.load(f))
            if not reports:
                first = next(iter(err.failures.values()))
                raise RankError(f"rank {first.local_rank} exited with code {first.exitcode}") from None
            first = min(reports, key=lambda r: r["time"])
            raise RankError(first["message"] + (f" (rank {first['rank']})" if nproc > 1 else "")) from None
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)


@contextlib.contextmanager
def report_rank_errors(verbose: bool = False):
    """In a rank: an exception leaves the process with exit code 1 after reporting it once.
    Under `relaunch` the error goes to the parent, which prints the earliest one; under a
    plain torchrun, local rank 0 prints its own (once per node: each node's log says why). Tracebacks are printed only with `verbose`."""
    import json
    import time
    import traceback

    try:
        yield
    except Exception as err:
        rank = int(os.environ.get("RANK", 0))
        message = str(err) if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: {err}"
        message = " ".join(message.split())
        if verbose:
            traceback.print_exc()
        errors = os.environ.get(ERROR_DIR_ENV)
        if errors:
            with open(os.path.join(errors, f"rank{rank}.json"), "w") as f:
                json.dump({"rank": rank, "time": time.time(), "message": message}, f)
        elif int(os.environ.get("LOCAL_RANK", rank)) == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # no interpreter teardown: a peer may still sit in a collective


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised by `end_children_on_signals`; a BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it). str(): the signal's name."""

    def __init__(self, signum: int):
        import signal
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def kill_children(timeout: float = 5.0) -> None:
    """SIGKILL every descendant of this process (helper processes: multiprocessing workers,
    managers, resource trackers, torchrun's ranks) and wait up to `timeout` s for them."""
    import psutil
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)


@contextlib.contextmanager
def end_children_on_signals():
    """Within the block, SIGINT and SIGTERM kill this process's descendants and then raise
    `Interrupted` in the main thread, so that `finally` blocks (e.g. removing a partial output)
    run and the caller can print one line and exit. A forked child that inherited the handler
    exits at once (code 128 + signal). Main thread only."""
    import signal

    main = os.getpid()
    signals = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        if os.getpid() != main:
            os._exit(128 + signum)
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        kill_children()
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def init_distributed(device: str, backend: str = "nccl", timeout: Optional[datetime.timedelta] = None) -> torch.device:
    """Under torchrun: pick this rank's GPU (or the CPU compatibility patches) and start the
    process group. Returns the device to run on. On CUDA, backend "nccl" (one GPU per rank),
    "gloo" (ranks may share GPUs: all-gather, all-reduce and broadcast work on CUDA tensors
    there; ../shared/ENVIRONMENT.md) or "auto" (gloo exactly when this node's ranks
    outnumber its GPUs); local rank r runs on GPU r mod the GPU count. CPU: gloo."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        gpus = torch.cuda.device_count()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % gpus)
        if backend == "auto":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
            backend = "nccl" if gpus >= local_world else "gloo"
        dist.init_process_group(backend, **kwargs)
        return torch.device("cuda", torch.cuda.current_device())
    from . import cpu_compat
    cpu_compat.apply()
    dist.init_process_group("gloo", **kwargs)
    return torch.device("cpu")


def model_parallel_state(tp: int = 1, cp: int = 1):
    """megatron-core's parallel state, (re)initialised for a TP x CP grid (the rest of the
    world data-parallel) with the inference RNG tracker that model construction needs.
    Returns megatron.core.parallel_state; a model keeps the groups it was built with."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize_rng_tracker(inference_rng_tracker=True)
    return ps


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
