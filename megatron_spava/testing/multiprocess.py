"""Run one function on W ranks of a fresh process group, inside one pytest test.

    from megatron_spava.testing import run_ranks

    def _body(x):                      # module-level, so every rank can import it
        t = torch.full((2,), float(dist.get_rank()))
        dist.all_reduce(t)
        return t

    results = run_ranks(_body, 4, 1.0)  # [result of rank 0, ..., rank 3]

Each rank is a fresh process (forked from a forkserver that has already imported torch,
megatron-core and, on CPU-only hosts, this package's modules and models, so starting one costs milliseconds,
not those imports). Inside it the default process
group spans all W ranks, on gloo (CPU) or NCCL (one GPU per rank), and every collective
is bounded by `timeout`. If any rank raises, `run_ranks` raises `RankFailure` with
every failing rank's traceback; ranks still running a few seconds later (blocked in a
collective the failed rank never joined) are terminated and named. Nothing can hang:
the whole run has a deadline.
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List

_CONTEXT = None


class RankFailure(RuntimeError):
    """One or more ranks failed. `failures` maps rank -> traceback text (or a reason)."""

    def __init__(self, failures: Dict[int, str]):
        self.failures = dict(sorted(failures.items()))
        text = "\n".join(f"----- rank {r} -----\n{tb}" for r, tb in self.failures.items())
        super().__init__(f"{len(self.failures)} rank(s) failed: {sorted(self.failures)}\n{text}")


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        # megatron-core's import is 5-12 s on the CPU machines (0.19.2 under PyPI's CUDA torch
        # the slowest); imported once here, every rank forked after it starts without it.
        # Not where a GPU is: importing Transformer Engine (through the package's modules)
        # initialises CUDA in the forkserver, and no rank forked from it could use CUDA then.
        import torch
        package = [] if torch.cuda.is_available() else ["megatron_spava.modules", "megatron_spava.models"]
        _CONTEXT.set_forkserver_preload(["torch", "torch.distributed"] + package)
    return _CONTEXT


def _resolve(ref):
    module, qualname = ref
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank, world, init_file, fn_ref, args, kwargs, timeout, backend, threads, sys_path, out):
    try:
        sys.path[:] = sys_path
        # megatron-core warns about missing apex/TE and CUDA-only tuning in every process
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        try:
            result = _resolve(fn_ref)(*args, **kwargs)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensors by value; the queue's own pickler would share them
        # through file descriptors that die with this process.
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report everything, KeyboardInterrupt included
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
              backend: str = "gloo", threads_per_rank: int | None = None,
              grace: float = 10.0, **kwargs: Any) -> List[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return the results in rank order.

    fn: a module-level function (ranks import it by name). timeout: bound on every
    collective and, plus `grace`, on the whole run (seconds). backend: "gloo" or "nccl".
    threads_per_rank: torch threads per rank (default: CPU cores // world_size, >= 1).
    grace: how long to wait for the other ranks once one has failed.
    Results and arguments must be picklable. Raises RankFailure on any failure.
    """
    if not 1 <= world_size <= 64:
        raise ValueError(f"world_size must be in [1, 64], got {world_size}")
    if fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
        raise ValueError("run_ranks needs a module-level function its ranks can import by name")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context()
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        # not daemonic: ranks may start processes of their own (the dist-checkpoint writer
        # does); they are stopped in the finally block below.
        procs = [ctx.Process(target=_worker, daemon=False,
                             args=(r, world_size, init_file, (fn.__module__, fn.__qualname__),
                                   args, kwargs, timeout, backend, threads, list(sys.path), out))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: Dict[int, Any] = {}
        failures: Dict[int, str] = {}
        deadline = time.monotonic() + timeout + grace
        try:
            while len(results) + len(failures) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, ok, value = out.get(timeout=min(remaining, 1.0))
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if not p.is_alive() and r not in results and r not in failures]
                    for r in dead:  # died without reporting (segfault, os._exit, OOM kill)
                        time.sleep(0.2)  # let a last message arrive first
                        if out.empty():
                            failures[r] = f"process exited with code {procs[r].exitcode} without reporting"
                    continue
                if ok:
                    results[rank] = pickle.loads(value)
                else:
                    failures[rank] = value
                    deadline = min(deadline, time.monotonic() + grace)
        finally:
            if not failures and len(results) == world_size:
                # Let ranks that reported exit normally: terminating one skips its atexit
                # handlers and orphans its helper processes (e.g. the multiprocessing
                # Manager that megatron-core's dist-checkpoint writer starts).
                end = time.monotonic() + grace
                for p in procs:
                    p.join(max(0.0, end - time.monotonic()))
            for r, p in enumerate(procs):
                if p.is_alive():
                    p.terminate()
                    if r not in results and r not in failures:
                        failures[r] = ("still running when the run was stopped "
                                       f"({'after another rank failed' if failures else 'deadline reached'}; "
                                       f"timeout={timeout}s)")
            for p in procs:
                p.join(5)
    if failures:
        raise RankFailure(failures)
    return [results[r] for r in range(world_size)]
