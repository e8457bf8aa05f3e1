"""Multi-node launches, tested on one machine: two torchrun agents ("nodes") on localhost
with a static rendezvous on 127.0.0.1, through examples/cluster/launch_node.sh, on gloo.

The video QA job at TP=2 x CP=2 on 2 nodes x 2 ranks (TP inside a node, CP across the two)
must give the same answer tokens and first-token logits as the same job on one node of 4
ranks, and, at full passing budget, the same tokens as exact attention without CP. A misfit
fails on both nodes with one error; examples/cluster/video_qa.sbatch runs under stand-ins for
srun and scontrol."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # multi-node launches, end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "examples", "cluster", "launch_node.sh")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
       "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nnodes: int, nproc: int, args, timeout: float = 240):
    """Run launch_node.sh once per node (node ranks 0..nnodes-1, all on localhost); return
    each node's (returncode, combined output)."""
    port = _free_port()
    procs = []
    for node in range(nnodes):
        env = {**ENV, "NNODES": str(nnodes), "NPROC_PER_NODE": str(nproc), "NODE_RANK": str(node),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(["bash", LAUNCH, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:  # a hang fails the test and leaves no torchrun agent or worker behind
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return results


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One tiny checkpoint and synthetic video for every launch here (written once)."""
    from megatron_spava.models.qwen2_5_vl.tiny import make_tiny_checkpoint
    from megatron_spava.video import write_synthetic_video
    path = tmp_path_factory.mktemp("work")
    make_tiny_checkpoint(str(path / "tiny-qwen2.5-vl"))
    write_synthetic_video(str(path / "synthetic.mp4"), frames=128, height=224, width=224, fps=8)
    return path


def _TINY(work):
    """The fixture's tiny random checkpoint and synthetic video (the pipeline, not the
    answers; without these the job answers the shipped needle model's needle video)."""
    return ["--random-weights", "--video", str(work / "synthetic.mp4")]


def _video_qa_args(work, out, name):
    return ["video_qa", "--work-dir", str(work), *_TINY(work), "--tensor-model-parallel-size", "2",
            "--context-parallel-size", "2", "--context-parallel-algo", "spava",
            "--spava-passing-len", "1024", "--max-frames", "16", "--max-new-tokens", "3",
            "--compare", "full", "--json", str(out / f"{name}.json"),
            "--save-logits", str(out / f"{name}.pt")]


def test_two_nodes_tp2_cp2_equal_one_node(work, tmp_path):
    one = _launch(1, 4, _video_qa_args(work, tmp_path, "one"))
    assert one[0][0] == 0, one[0][1][-4000:]
    two = _launch(2, 2, _video_qa_args(work, tmp_path, "two"))
    for rc, out in two:
        assert rc == 0, out[-4000:]
    assert "placement: 2 node(s) x 2 rank(s); TP=2 groups inside nodes; CP=2 groups over 2 node(s)" \
        in two[0][1], two[0][1][-3000:]
    assert "WARNING" not in two[0][1]
    r1, r2 = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert r1["video_tokens"] == r2["video_tokens"] > 100
    s1, s2 = r1["runs"]["spava"], r2["runs"]["spava"]
    assert (s1["tp"], s1["cp"]) == (s2["tp"], s2["cp"]) == (2, 2)
    assert len(s1["tokens"]) == 3 and s1["tokens"] == s2["tokens"]
    assert s2["tokens"] == r2["runs"]["full"]["tokens"]  # full budget: exact attention's answer
    l1, l2 = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    assert torch.allclose(l1["spava"], l2["spava"], rtol=0, atol=1e-6)
    assert r2["first_logits_max_abs_diff"] < 1e-3


def test_two_nodes_misfit_fails_on_every_node_with_the_placement_warning(work):
    """TP=2 over two nodes of one rank each spans the nodes (warned), and an anchor longer
    than the prompt cannot fit: one LaunchError on both nodes, no hang, before the model."""
    res = _launch(2, 1, ["video_qa", "--work-dir", str(work), *_TINY(work), "--tensor-model-parallel-size", "2",
                         "--context-parallel-size", "1", "--max-frames", "8", "--compare", "none",
                         "--spava-anchor-len", "65536"], timeout=180)
    for rc, out in res:
        assert rc != 0
        assert "error: --context-parallel-algo spava at CP=1" in out, out[-3000:]  # one line per node
        assert "longer than the context" in out
        assert "loading HF weights" not in out  # failed before the checkpoint was read
    assert "1 of 1 tensor-parallel groups span nodes" in res[0][1], res[0][1][-3000:]


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: run the command once per node, all on this machine, like
# srun --ntasks-per-node=1 would on SLURM_NNODES nodes.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_sbatch_script_under_a_fake_slurm(work, tmp_path):
    """examples/cluster/video_qa.sbatch as SLURM would run it on two nodes (srun and scontrol
    replaced by stand-ins that start both "nodes" here): the pre-flight placement check, then
    c10d rendezvous at the first host, one rank per node, CP=2 across them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "fake[1-2]", "SLURM_JOB_ID": "7",
           "SLURM_SUBMIT_DIR": ROOT, "GPUS_PER_NODE": "1", "PORT": str(_free_port()),
           "DEVICE_ARGS": "--device cpu"}
    p = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "cluster", "video_qa.sbatch"),
                          "--work-dir", str(work), *_TINY(work), "--max-frames", "8", "--max-new-tokens", "2",
                          "--json", str(tmp_path / "r.json")], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "placement: 2 node(s) x 1 rank(s); TP=1 groups inside nodes; CP=2" in stdout  # pre-flight
    result = json.load(open(tmp_path / "r.json"))
    assert result["runs"]["spava"]["cp"] == 2 and len(result["runs"]["spava"]["tokens"]) == 2
