"""Start-up checks of a TP x CP launch, on one node or many, before any heavy work.

    report = check_launch(tp=2, cp=4, algos=["spava"], config=cfg,
                          requests=[Request(context_len=n, query_len=lq, frame_groups=g)])

Two questions, answered before the model is built or a checkpoint is read:

1. **Placement.** Megatron numbers its ranks TP-fastest (order "tp-cp-ep-dp-pp"): TP group
   g is the consecutive global ranks [g*TP, (g+1)*TP). torchrun and `srun
   --distribution=block` give each node a consecutive block of global ranks, so TP groups
   stay inside a node (NVLink) whenever the ranks per node are a multiple of TP, and the CP
   groups (ranks TP apart) are the ones that cross nodes. A TP group that spans nodes puts
   its two all-reduces per layer on the network: the check warns, with the fix. Node
   identity comes from each rank (hostname plus torchrun's GROUP_RANK, so several torchrun
   agents on one machine count as several nodes, as in the CPU test), gathered once.
2. **Fit.** The CP size, the video's frame groups and every requested layout must fit
   (SPAVA.md section 1 limits; the model's head counts against TP). A misfit raises one
   `LaunchError` with the same message on every rank: the ranks first agree on the error
   in one all_gather_object, so a rank that sees different input cannot leave the others
   waiting in a collective.

`python -m megatron_spava.placement --nnodes 8 --nproc-per-node 8 --tp 2 --cp 32` runs the
placement part without any process group (before submitting a job).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

#: Megatron-core's default rank order (initialize_model_parallel(order=...)).
MEGATRON_ORDER = "tp-cp-ep-dp-pp"


class LaunchError(ValueError):
    """The launch cannot work as configured; raised with the same message on every rank."""


@dataclass(frozen=True)
class Request:
    """One prompt to plan: context_len n (tokens before the query), query_len l_q, and the
    number of temporal frame groups of its video (None: no video)."""

    context_len: int
    query_len: int
    frame_groups: Optional[int] = None


@dataclass
class Placement:
    """Where the groups landed. nodes[r]: node of global rank r; tp_groups/cp_groups: global
    ranks of every group (Megatron's order); warnings: placement problems, each with its fix."""

    nodes: List[str]
    tp: int
    cp: int
    tp_groups: List[List[int]]
    cp_groups: List[List[int]]
    warnings: List[str] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        return len(set(self.nodes))

    def summary(self) -> str:
        per_node = {}
        for n in self.nodes:
            per_node[n] = per_node.get(n, 0) + 1
        counts = sorted(set(per_node.values()))
        ranks = "x".join(map(str, counts)) if len(counts) == 1 else "/".join(map(str, counts))
        cp_nodes = max(len({self.nodes[r] for r in g}) for g in self.cp_groups)
        tp_ok = not any(len({self.nodes[r] for r in g}) > 1 for g in self.tp_groups)
        return (f"placement: {self.num_nodes} node(s) x {ranks} rank(s); TP={self.tp} groups "
                f"{'inside' if tp_ok else 'ACROSS'} nodes; CP={self.cp} groups over {cp_nodes} "
                f"node(s)" + (" (CP traffic crosses the network)" if cp_nodes > 1 else ""))


def node_identity(env: Optional[dict] = None) -> str:
    """This process's node: its hostname, plus torchrun's agent rank (GROUP_RANK) when set,
    or SLURM's node id under a bare srun. Pure given `env` (default os.environ)."""
    env = os.environ if env is None else env
    host = socket.gethostname()
    for key in ("GROUP_RANK", "SLURM_NODEID"):
        if env.get(key) not in (None, ""):
            return f"{host}#{key.lower()}={env[key]}"
    return host


def megatron_groups(world: int, tp: int, cp: int, kind: str) -> List[List[int]]:
    """Global ranks of every `kind` ("tp" or "cp") group, exactly as megatron-core's
    initialize_model_parallel forms them (its RankGenerator, default order). Pure."""
    from megatron.core.parallel_state import RankGenerator

    if world % (tp * cp):
        raise LaunchError(f"{world} ranks are not a multiple of TP={tp} x CP={cp}")
    gen = RankGenerator(tp=tp, ep=1, dp=world // (tp * cp), pp=1, cp=cp, order=MEGATRON_ORDER)
    return gen.get_ranks(kind)


def plan_placement(nodes: Sequence[str], tp: int, cp: int) -> Placement:
    """The TP and CP groups over ranks placed on `nodes` (nodes[r] = node of global rank r),
    and a warning, with its fix, for every TP group that spans nodes. Pure."""
    world = len(nodes)
    tp_groups = megatron_groups(world, tp, cp, "tp")
    cp_groups = megatron_groups(world, tp, cp, "cp")
    out = Placement(list(nodes), tp, cp, tp_groups, cp_groups)
    spanning = [g for g in tp_groups if len({nodes[r] for r in g}) > 1]
    if not spanning:
        return out
    per_node = {}
    for n in nodes:
        per_node[n] = per_node.get(n, 0) + 1
    smallest = min(per_node.values())
    seen, contiguous = {nodes[0]}, True  # every node's ranks one consecutive block
    for r in range(1, world):
        if nodes[r] != nodes[r - 1]:
            contiguous &= nodes[r] not in seen
            seen.add(nodes[r])
    example = spanning[0]
    where = ", ".join(f"{r}@{nodes[r]}" for r in example)
    if tp > smallest:
        fix = (f"TP={tp} is larger than the {smallest} ranks of a node: keep TP <= GPUs per node "
               f"(NVLink) and put the rest of the parallelism into CP, e.g. TP={_largest_divisor(smallest, tp)} "
               f"x CP={cp * tp // _largest_divisor(smallest, tp)}")
    elif not contiguous:
        fix = ("the launcher numbered ranks round-robin over nodes: give each node a consecutive "
               "block of ranks (torchrun does; with srun use --distribution=block)")
    else:
        fix = (f"nodes hold {sorted(set(per_node.values()))} ranks, not a multiple of TP={tp}: "
               f"launch a multiple of {tp} ranks per node (--nproc-per-node)")
    out.warnings.append(
        f"{len(spanning)} of {len(tp_groups)} tensor-parallel groups span nodes (e.g. ranks "
        f"{where}): their two all-reduces per layer would cross the network. Fix: {fix}")
    return out


def _largest_divisor(limit: int, tp: int) -> int:
    return max(d for d in range(1, min(limit, tp) + 1) if tp % d == 0)


def request_of(inputs, model_config) -> Request:
    """The Request of one prompt of a model family (`video.inputs`: VideoQAInputs,
    InternVLInputs): the query by the family's rule (`model_config.query_length`: the tokens
    after the video), frame groups = the units frame parallelism splits."""
    ids = inputs.input_ids
    lq = model_config.query_length(ids.cpu())
    groups = getattr(inputs, "frame_groups", None)
    return Request(context_len=int(ids.shape[1]) - lq, query_len=lq, frame_groups=groups)


def fit_error(*, tp: int, cp: int, algos: Sequence[str], config=None,
              requests: Sequence[Request] = (), model_config=None,
              frame_parallel: bool = True) -> Optional[str]:
    """Why this launch cannot run (CP size, frame groups, layout, model heads vs TP), or
    None. algos: names from megatron_spava.algos.ALGOS, or (name, SpavaConfig) pairs for
    variants with their own switches (otherwise `config` applies). Pure: every rank with
    the same arguments gets the same answer."""
    from .algos import plan_layout
    from .models.family import frame_group_error
    from .models.registry import family_of_config

    # the one frame-group check, in the words of the model's family (a generic group without one)
    groups_error = (family_of_config(model_config).frame_group_error if model_config is not None
                    else frame_group_error)
    if model_config is not None:
        try:
            model_config.validate(tp)
        except ValueError as err:
            return f"the model does not fit TP={tp}: {err}"
    for req in requests:
        if frame_parallel and cp > 1 and req.frame_groups is not None:
            error = groups_error(req.frame_groups, cp)
            if error:
                return error
        for entry in algos:
            algo, cfg = entry if isinstance(entry, tuple) else (entry, config)
            # unfused (fuse_query=False): the prefill holds the context only, the query runs
            # over the cache afterwards
            fused = cfg is None or cfg.fuse_query
            try:
                plan_layout(algo, context_len=req.context_len,
                            query_len=req.query_len if fused else 0,
                            cp_size=1 if algo == "full" else cp, config=cfg)
            except ValueError as err:
                return (f"--context-parallel-algo {algo} at CP={cp} with a {req.context_len}-token "
                        f"context and a {req.query_len}-token query: {err}")
    return None


def check_launch(*, tp: int, cp: int, algos: Sequence[str], config=None,
                 requests: Sequence[Request] = (), model_config=None, frame_parallel: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> Placement:
    """Check placement and fit on every rank of the initialised default process group, with
    one all_gather_object (call it after init_process_group, before building the model).
    Global rank 0 prints the placement summary (multi-node launches) and any warning through
    `log` (default: stderr). Raises LaunchError with the same message on every rank when the
    launch cannot fit. Returns the Placement."""
    import torch.distributed as dist

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        error = fit_error(tp=tp, cp=cp, algos=algos, config=config, requests=requests,
                          model_config=model_config, frame_parallel=frame_parallel)
    except Exception as err:  # a bug in a check must not leave the other ranks waiting
        error = f"{type(err).__name__}: {err}"
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered: List[Tuple[str, Optional[str]]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, (node_identity(), error))
    placement = plan_placement([n for n, _ in gathered], tp, cp)  # same on every rank
    if rank == 0:
        if placement.num_nodes > 1 or placement.warnings:
            log(f"megatron_spava {placement.summary()}")
        for w in placement.warnings:
            log(f"megatron_spava placement WARNING: {w}")
    errors = [(r, e) for r, (_, e) in enumerate(gathered) if e]
    if errors:
        r, e = errors[0]
        same = len(errors) == world and all(e2 == e for _, e2 in errors)
        raise LaunchError(e if same else f"(rank {r}) {e}")
    return placement


def check_video_qa(opts, inputs) -> Placement:
    """check_launch for the video QA job: its options (`video_qa.Options`: TP, CP, algorithm,
    --compare, the Spava config, the family and checkpoint, for the model's head counts) and
    the prompt(s) (one input of the model's family, or a list). Call on every rank before the
    model is built."""
    cfg = opts.family.config(opts.checkpoint)
    config = opts.spava_config
    algo = opts.context_parallel_algo
    algos = [algo] + (["full"] if opts.compare == "full" and algo != "full" else [])
    many = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return check_launch(tp=opts.tensor_model_parallel_size, cp=opts.context_parallel_size,
                        algos=algos, config=config, model_config=cfg,
                        requests=[request_of(x, cfg) for x in many],
                        frame_parallel=config.frame_parallel)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_spava.placement",
        description="Show the TP and CP groups a multi-node launch will form (Megatron's rank "
                    "order, each node a consecutive block of ranks as torchrun numbers them) and "
                    "warn when a TP group spans nodes; with --context-len, also check that the "
                    "layout fits. No process group, no GPU: run it before submitting the job.")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    p.add_argument("--cp", type=int, required=True, help="context-parallel size")
    p.add_argument("--algo", default="spava", help="(default: %(default)s)")
    p.add_argument("--context-len", type=int, help="context tokens n, to check the layout")
    p.add_argument("--query-len", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--frame-groups", type=int, help="temporal groups of the video (2 frames each)")
    args = p.parse_args(argv)
    nodes = [f"node{i}" for i in range(args.nnodes) for _ in range(args.nproc_per_node)]
    try:
        placement = plan_placement(nodes, args.tp, args.cp)
        error = None
        if args.context_len is not None:
            error = fit_error(tp=args.tp, cp=args.cp, algos=[args.algo], requests=[
                Request(args.context_len, args.query_len, args.frame_groups)])
    except (LaunchError, ValueError) as err:
        p.error(str(err))
    print(placement.summary())
    print(f"TP groups: {_short(placement.tp_groups)}")
    print(f"CP groups: {_short(placement.cp_groups)}")
    for w in placement.warnings:
        print(f"WARNING: {w}")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if placement.warnings else 0


def _short(groups: List[List[int]], limit: int = 4) -> str:
    text = ", ".join(map(str, groups[:limit]))
    return text + (f", ... ({len(groups)} groups)" if len(groups) > limit else "")


if __name__ == "__main__":
    sys.exit(main())
