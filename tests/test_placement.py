"""Start-up placement and fit checks (megatron_spava/placement.py): TP groups against nodes,
layout and frame-group limits, one error on every rank."""

import os
import pytest
import torch.distributed as dist

from megatron_spava import SpavaConfig
from megatron_spava.placement import (LaunchError, Request, check_launch, fit_error, node_identity,
                                      plan_placement)
from megatron_spava.testing import run_ranks

def _nodes(nnodes, per_node):
    """Block placement, as torchrun numbers ranks: node i holds [i*per_node, (i+1)*per_node)."""
    return [f"n{i}" for i in range(nnodes) for _ in range(per_node)]


def test_tp_inside_nodes_cp_across():
    p = plan_placement(_nodes(2, 8), tp=2, cp=8)
    assert p.warnings == [] and p.num_nodes == 2
    # Megatron's order, written out by hand: TP = consecutive pairs, CP = stride TP.
    assert p.tp_groups == [[2 * g, 2 * g + 1] for g in range(8)]
    assert p.cp_groups == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert "TP=2 groups inside nodes" in p.summary() and "over 2 node(s)" in p.summary()


def test_tp_larger_than_a_node_warns_with_the_fix():
    p = plan_placement(_nodes(4, 2), tp=4, cp=2)
    assert len(p.warnings) == 1
    w = p.warnings[0]
    assert "4 of 4 tensor-parallel groups span nodes" not in w  # 2 groups of 4 over 4 nodes
    assert "2 of 2 tensor-parallel groups span nodes" in w
    assert "larger than the 2 ranks of a node" in w and "TP=2 x CP=4" in w


def test_ranks_per_node_not_a_multiple_of_tp_warns():
    p = plan_placement(_nodes(2, 3), tp=2, cp=3)  # group [2, 3] straddles the nodes
    assert len(p.warnings) == 1 and "1 of 3 tensor-parallel groups" in p.warnings[0]
    assert "--nproc-per-node" in p.warnings[0]


def test_round_robin_rank_numbering_warns():
    nodes = [f"n{r % 2}" for r in range(8)]  # srun --distribution=cyclic
    p = plan_placement(nodes, tp=2, cp=4)
    assert len(p.warnings) == 1 and "round-robin" in p.warnings[0]
    assert "--distribution=block" in p.warnings[0]


def test_world_not_a_multiple_of_tp_times_cp():
    with pytest.raises(LaunchError, match="not a multiple of TP=2 x CP=2"):
        plan_placement(_nodes(1, 6), tp=2, cp=2)


def test_node_identity_from_torchrun_and_slurm(monkeypatch):
    assert node_identity({"GROUP_RANK": "1"}).endswith("#group_rank=1")
    assert node_identity({"SLURM_NODEID": "3"}).endswith("#slurm_nodeid=3")
    assert node_identity({"GROUP_RANK": "0"}) != node_identity({"GROUP_RANK": "1"})
    assert "#" not in node_identity({})


def test_fit_errors_name_the_limit():
    ok = Request(context_len=4096, query_len=16, frame_groups=8)
    assert fit_error(tp=1, cp=4, algos=["spava", "ring", "apb", "star"], requests=[ok]) is None
    few = Request(context_len=4096, query_len=16, frame_groups=3)
    assert "3 frame groups for 4 ranks (CP=4" in fit_error(tp=1, cp=4, algos=["spava"], requests=[few])
    assert fit_error(tp=1, cp=4, algos=["spava"], requests=[few], frame_parallel=False) is None
    short = Request(context_len=130, query_len=16)  # 128-token anchor, 2 tokens for 8 blocks
    err = fit_error(tp=1, cp=4, algos=["spava"], requests=[short])
    assert "--context-parallel-algo spava at CP=4" in err and "context too short" in err
    err = fit_error(tp=1, cp=2, algos=["spava"], config=SpavaConfig(anchor_len=8192),
                    requests=[ok])
    assert "longer than the context" in err
    # (algo, config) pairs: a variant's own switches decide its limits.
    seven = [Request(context_len=128 + 7, query_len=4)]  # 7 tokens after the anchor
    assert fit_error(tp=1, cp=4, algos=["spava"], requests=seven) is not None  # 8 blocks
    assert fit_error(tp=1, cp=4, algos=[("spava", SpavaConfig(zigzag=False))], requests=seven) is None


def test_fit_error_plans_an_unfused_prefill_without_query_rows():
    """fuse_query off: the prefill layout holds the context alone (as generate plans it), so
    the check must not plan it with the query (that raises in the layout)."""
    ok = Request(context_len=4096, query_len=16, frame_groups=8)
    unfused = SpavaConfig(fuse_query=False)
    assert fit_error(tp=1, cp=2, algos=[("spava", unfused), ("ring", unfused)], requests=[ok]) is None
    short = Request(context_len=130, query_len=16)
    assert "context too short" in fit_error(tp=1, cp=4, algos=[("spava", unfused)], requests=[short])


def test_fit_error_checks_the_model_heads_against_tp():
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_spava.models.qwen2_5_vl.tiny import shaped_hf_config
    cfg = Qwen25VLConfig.from_hf(shaped_hf_config("7b"))  # 28 heads, 4 KV heads
    assert fit_error(tp=4, cp=2, algos=["spava"], model_config=cfg) is None
    assert "does not fit TP=3" in fit_error(tp=3, cp=2, algos=["spava"], model_config=cfg)


def _check(case):
    rank = dist.get_rank()
    good = Request(context_len=4096, query_len=16, frame_groups=8)
    bad = Request(context_len=4096, query_len=16, frame_groups=1)
    logs = []
    try:
        check_launch(tp=1, cp=dist.get_world_size(), algos=["spava"],
                     requests=[bad if case == "all" or rank == 1 else good], log=logs.append)
    except LaunchError as err:
        return str(err), logs
    return None, logs


def _placement_ok():
    os.environ["GROUP_RANK"] = str(dist.get_rank() // 2)  # two torchrun agents of 2 ranks
    logs = []
    p = check_launch(tp=2, cp=2, algos=["spava"], requests=[Request(4096, 16, 4)], log=logs.append)
    return p.nodes, p.warnings, logs


def _cases():
    return _check("all"), _check("one"), _placement_ok()


def test_check_launch_on_four_ranks():
    """Bad input on every rank, or on one: the same LaunchError everywhere (the second
    names the rank). Good input on two 'nodes' of two ranks: node identities gathered,
    TP inside nodes, only rank 0 prints."""
    results = run_ranks(_cases, 4, timeout=30)
    for case, k in (("all", 0), ("one", 1)):
        messages = [r[k][0] for r in results]
        assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
        assert "1 frame groups for 4 ranks (CP=4" in messages[0]
        assert messages[0].startswith("(rank 1)") == (case == "one")
        assert all(r[k][1] == [] for r in results)  # one node, no warning: nothing printed
    nodes, warnings, logs = results[0][2]
    assert len(set(nodes)) == 2 and nodes[0] == nodes[1] != nodes[2] == nodes[3]
    assert warnings == [] and len(logs) == 1 and "TP=2 groups inside nodes" in logs[0]
    assert all(r[2][2] == [] for r in results[1:])


def test_cli_before_submitting(capsys):
    from megatron_spava.placement import main
    assert main(["--nnodes", "8", "--nproc-per-node", "8", "--tp", "2", "--cp", "32",
                 "--context-len", "131072", "--frame-groups", "512"]) == 0
    out = capsys.readouterr().out
    assert "TP=2 groups inside nodes" in out and "CP=32 groups over 8 node(s)" in out
    assert main(["--nnodes", "2", "--nproc-per-node", "4", "--tp", "8", "--cp", "1"]) == 1
    out = capsys.readouterr().out
    assert "WARNING" in out and "TP=4 x CP=2" in out
    assert main(["--nnodes", "2", "--nproc-per-node", "8", "--cp", "16", "--context-len", "4096",
                 "--frame-groups", "8"]) == 2
    assert "8 frame groups for 16 ranks (CP=16" in capsys.readouterr().err
