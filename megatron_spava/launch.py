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


#: Set by `relaunch` for its ranks: where a failing rank writes its error (rank{R}.json) and
#: every rank what it is doing (rank{R}.phase: pid, phase, process-group timeout).
ERROR_DIR_ENV = "MEGATRON_SPAVA_ERROR_DIR"
#: Fault injection for the tests: "RANK:WORD:stop" or "RANK:WORD:kill" makes rank RANK stop
#: itself (SIGSTOP: a stalled rank) or die (SIGKILL) when it enters a phase naming WORD.
FAULT_ENV = "MEGATRON_SPAVA_TEST_FAULT"
#: Megatron-LM's --distributed-timeout-minutes default.
DEFAULT_TIMEOUT_MINUTES = 10.0
#: After a rank reports an error, how long `relaunch` lets the other ranks end on their own
#: before it kills them (a stopped or stalled rank never would).
GRACE_S = 2.0

_state = {"phase": "starting", "timeout_s": DEFAULT_TIMEOUT_MINUTES * 60}


class RankError(RuntimeError):
    """A rank failed; the message, in one line, names the rank that caused it and what it was
    doing (`explain_failure`)."""


def add_distributed_timeout_arg(parser) -> None:
    """Megatron-LM's --distributed-timeout-minutes (float here, so tests can pass fractions)."""
    parser.add_argument("--distributed-timeout-minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="how long a rank waits for the others in a collective before the job "
                             "ends, naming the rank that stalled (Megatron-LM's flag; default: "
                             "%(default)s)")


def distributed_timeout(args) -> datetime.timedelta:
    """The process-group timeout from --distributed-timeout-minutes; ValueError unless > 0."""
    minutes = args.distributed_timeout_minutes
    if not minutes > 0 or minutes != minutes or minutes == float("inf"):
        raise ValueError(f"--distributed-timeout-minutes must be a positive number, got {minutes}")
    return datetime.timedelta(minutes=minutes)


def set_phase(phase: str) -> None:
    """Record what this rank is doing now (e.g. "loading the checkpoint"): an error report says
    it, and under `relaunch` the parent names it for a rank that stalls or is killed."""
    _state["phase"] = phase
    errors = os.environ.get(ERROR_DIR_ENV)
    rank = int(os.environ.get("RANK", 0))
    if errors:
        import json
        tmp = os.path.join(errors, f".rank{rank}.phase")
        with open(tmp, "w") as f:
            json.dump({"rank": rank, "pid": os.getpid(), "phase": phase, "timeout_s": _state["timeout_s"]}, f)
        os.replace(tmp, os.path.join(errors, f"rank{rank}.phase"))
    fault = os.environ.get(FAULT_ENV, "")
    if fault.count(":") == 2:
        f_rank, word, how = fault.split(":")
        if int(f_rank) == rank and word in phase:
            import signal
            os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)


def current_phase() -> str:
    return _state["phase"]


_COLLECTIVE_FAILURE = ("Timed out", "timed out", "wait timeout", "Connection closed by peer", "Connection reset",
                       "ProcessGroupGloo", "ProcessGroupNCCL", "NCCL error", "Broken pipe",
                       "Watchdog caught collective operation timeout")


def is_collective_failure(message: str) -> bool:
    """Whether an error is a collective giving up on its peers (a timeout or a closed
    connection): a consequence of another rank's failure, not a cause."""
    return any(p in message for p in _COLLECTIVE_FAILURE)


def explain_failure(nproc: int, reports: dict, exitcodes: dict, phases: dict, unresponsive: dict) -> str:
    """One line naming the rank that made a multi-rank job fail and what it was doing. Pure.

    reports: rank -> {"message", "time", "phase"} from `report_rank_errors`; exitcodes: rank ->
    exit code of ranks that failed (negative: killed by that signal); phases: rank ->
    {"phase", "timeout_s"} last recorded by `set_phase`; unresponsive: rank -> the process
    state (e.g. "stopped") of ranks still running when the others had given up.
    In order: a rank's own error (not a collective giving up), a rank killed by a signal
    without reporting, a rank that stopped responding, the earliest report."""
    import signal

    def where(rank):
        phase = (reports.get(rank) or {}).get("phase") or (phases.get(rank) or {}).get("phase")
        return f"while {phase}" if phase else "before it started"

    def suffix(rank):
        return f" (rank {rank}, {where(rank)})" if nproc > 1 else ""

    own = [(r["time"], k) for k, r in reports.items() if not is_collective_failure(r["message"])]
    if own:
        rank = min(own)[1]
        return reports[rank]["message"] + suffix(rank)
    killed = sorted(k for k, c in exitcodes.items() if c is not None and c < 0 and k not in reports
                    and k not in unresponsive)
    if killed:
        # torchrun ends the other ranks with SIGTERM once one fails: another signal is the cause
        rank = min(killed, key=lambda k: (exitcodes[k] == -signal.SIGTERM, k))
        try:
            name = signal.Signals(-exitcodes[rank]).name
        except ValueError:
            name = f"signal {-exitcodes[rank]}"
        return f"rank {rank} was killed ({name}) {where(rank)}"
    if unresponsive:
        rank = min(unresponsive)
        waiters = sorted(reports)
        timeout = (phases.get(waiters[0]) or phases.get(rank) or {}).get("timeout_s") if waiters else None
        waited = (f"; rank {', '.join(map(str, waiters))} waited for it "
                  f"{f'{timeout / 60:g} min ' if timeout else ''}(--distributed-timeout-minutes) "
                  f"in a collective and gave up" if waiters else "")
        return f"rank {rank} stopped responding {where(rank)} (process {unresponsive[rank]}){waited}"
    if reports:
        rank = min((r["time"], k) for k, r in reports.items())[1]
        return reports[rank]["message"] + suffix(rank)
    if exitcodes:
        rank = min(exitcodes)
        return f"rank {rank} exited with code {exitcodes[rank]} {where(rank)}"
    return "a rank failed"


def _read_json_files(folder: str, ext: str) -> dict:
    import json
    out = {}
    for name in os.listdir(folder):
        if name.startswith("rank") and name.endswith(ext):
            try:
                with open(os.path.join(folder, name)) as f:
                    data = json.load(f)
                out[int(data["rank"])] = data
            except (OSError, ValueError, KeyError):
                pass
    return out


def _stop_the_rest_after_an_error(errors: str, done, unresponsive: dict) -> None:
    """Watcher thread of `relaunch`: once a rank has reported an error, give the others
    GRACE_S to end, then SIGKILL the ranks still running (a stopped rank ignores torchrun's
    SIGTERM for 30 s), noting their process state in `unresponsive` (rank -> state)."""
    import time

    import psutil
    while not done.wait(0.2):
        if any(n.endswith(".json") for n in os.listdir(errors)):
            break
    else:
        return
    if done.wait(GRACE_S):
        return
    phases = _read_json_files(errors, ".phase")
    reported = _read_json_files(errors, ".json")
    for rank, info in phases.items():
        if rank in reported:
            continue
        try:
            proc = psutil.Process(info["pid"])
            status = proc.status()
            if status == psutil.STATUS_ZOMBIE:
                continue
            unresponsive[rank] = {psutil.STATUS_STOPPED: "stopped", psutil.STATUS_TRACING_STOP: "stopped"}.get(
                status, f"still {status}")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(0.1)


def relaunch(module: str, nproc: int, argv: Optional[Sequence[str]] = None, *,
             verbose: bool = True) -> None:
    """Run `python -m module argv` (or the script `module`, a path ending in .py) on `nproc`
    local ranks through torchrun and return when they finish. NVLink multicast stays off; CPU threads are split between the ranks.

    If a rank fails, raises RankError with one line naming the rank that caused it and what
    it was doing (`explain_failure`: its own error, reported through `report_rank_errors`, or
    that it was killed or stopped responding) instead of torchrun's ChildFailedError report;
    with `verbose`, torchrun's own logging stays on. Once a rank has reported an error the
    others get GRACE_S seconds, then are killed: a stalled rank (one its peers gave up on
    after --distributed-timeout-minutes) ends the job too."""
    import logging
    import tempfile
    import threading

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
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
        done, unresponsive = threading.Event(), {}
        watcher = threading.Thread(target=_stop_the_rest_after_an_error, args=(errors, done, unresponsive),
                                   daemon=True)
        watcher.start()
        try:
            target = [module] if module.endswith(".py") else ["-m", module]
            torchrun(["--standalone", f"--nproc-per-node={nproc}", *target, *args])
        except ChildFailedError as err:
            done.set()
            watcher.join()
            exitcodes = {int(r): f.exitcode for r, f in err.failures.items()}
            raise RankError(explain_failure(nproc, _read_json_files(errors, ".json"), exitcodes,
                                            _read_json_files(errors, ".phase"), unresponsive)) from None
        finally:
            done.set()
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
            tmp = os.path.join(errors, f".rank{rank}.json")
            with open(tmp, "w") as f:
                json.dump({"rank": rank, "time": time.time(), "message": message, "phase": current_phase()}, f)
            os.replace(tmp, os.path.join(errors, f"rank{rank}.json"))
        elif int(os.environ.get("LOCAL_RANK", rank)) == 0:
            print(f"error: {message} (rank {rank}, while {current_phase()})", file=sys.stderr, flush=True)
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
    outnumber its GPUs); local rank r runs on GPU r mod the GPU count. CPU: gloo.
    timeout: how long a collective waits for the other ranks before it raises (default:
    Megatron-LM's 10 minutes; `distributed_timeout(args)` reads --distributed-timeout-minutes)."""
    timeout = timeout or datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    _state["timeout_s"] = timeout.total_seconds()
    set_phase("starting the process group")
    kwargs = {"timeout": timeout}
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
    # its groups get the process group's timeout (megatron-core's own default is 30 min)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 distributed_timeout_minutes=_state["timeout_s"] / 60)
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
    import logging
    # megatron-core 0.19 logs a deprecation of GPTModel (the base of this project's models)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    pattern = re.compile("|".join(map(re.escape, _KNOWN_WARNING_PATTERNS)))
    original = warnings.showwarning
    shown = []

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if f"{os.sep}megatron{os.sep}core{os.sep}" in filename or pattern.search(text):
            if announce and not shown:
                shown.append(True)
                print("note: megatron-core's import warnings (Apex or Transformer Engine not "
                      "installed, local fallbacks, deprecations) are hidden; --verbose shows them",
                      file=sys.stderr, flush=True)
            return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
