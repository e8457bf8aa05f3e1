"""Fault injection (issue 21): a rank that stalls (SIGSTOP) or is killed ends the whole job
within --distributed-timeout-minutes, with one line naming the rank and what it was doing,
on the main job and on the prefill benchmark; every program that starts ranks has the flag;
through the API, a rank with bad input cannot leave its peers waiting forever."""

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
from megatron_spava.launch import (DEFAULT_TIMEOUT_MINUTES, FAULT_ENV, explain_failure,
                                   is_collective_failure)
from megatron_spava.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TIMEOUT_MIN = 0.25  # 15 s: the collective timeout the fault tests run under (rank start-up
# skew on a loaded 2-core machine reaches several seconds, and the rendezvous shares it)


def _error_lines(stderr):
    return [ln for ln in stderr.splitlines() if "error" in ln]


# ---- explain_failure: which rank the one line names -------------------------------------

def test_explain_failure_names_the_cause_not_the_waiters():
    timeout = {"phase": "running prefill", "timeout_s": 3.0}
    waiting = {"message": "[gloo] Timed out waiting 3000ms for recv operation to complete", "time": 2.0,
               "phase": "running prefill"}
    # a stalled rank: the waiter's timeout is not the cause
    line = explain_failure(2, {0: waiting}, {0: 1, 1: -9}, {0: timeout, 1: timeout}, {1: "stopped"})
    assert line.startswith("rank 1 stopped responding while running prefill (process stopped)")
    assert "rank 0 waited for it 0.05 min (--distributed-timeout-minutes)" in line
    # a killed rank: named with its signal, even though torchrun then SIGTERMs the others
    lost = dict(waiting, message="Connection closed by peer [127.0.0.1]:1234")
    line = explain_failure(3, {0: lost}, {0: 1, 1: -15, 2: -9}, {r: timeout for r in range(3)}, {})
    assert line == "rank 2 was killed (SIGKILL) while running prefill"
    # a rank's own error wins over its peers' timeouts, whatever came first
    own = {"message": "anchor_len=9 is longer than the context", "time": 5.0, "phase": "planning"}
    assert explain_failure(2, {0: waiting, 1: own}, {0: 1, 1: 1}, {}, {}) == \
        "anchor_len=9 is longer than the context (rank 1, while planning)"
    assert explain_failure(1, {0: own}, {0: 1}, {}, {}) == "anchor_len=9 is longer than the context"
    assert explain_failure(2, {}, {1: 3}, {1: timeout}, {}) == "rank 1 exited with code 3 while running prefill"
    assert is_collective_failure(waiting["message"]) and not is_collective_failure(own["message"])


# ---- every program that starts ranks has Megatron-LM's flag -----------------------------

def _load(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_parser(module):
    import importlib
    return importlib.import_module(module).parse_args


def _parsers():
    from megatron_spava.attention_demo import build_parser as demo_parser
    from megatron_spava.perf.bench_prefill import parse_args as bench_parser
    from megatron_spava.tasks.evaluate import build_parser as eval_parser
    from megatron_spava.video_qa import build_parser as qa_parser
    return {"video_qa": lambda a: qa_parser().parse_args(a),
            "attention_demo": lambda a: demo_parser().parse_args(a),
            "eval_needles": lambda a: eval_parser().parse_args(a),
            "bench_prefill": lambda a: bench_parser(a),
            "tp_cp_check": lambda a: _tool_parser("megatron_spava.perf.tp_cp_check")(a),
            "bench_ring": lambda a: _tool_parser("megatron_spava.perf.bench_ring")(a),
            "gpt_prefill": lambda a: _load("examples/gpt_prefill.py").parse_args(
                a + ["--context-parallel-algo", "full"])}


@pytest.mark.parametrize("program", sorted(_parsers()))
def test_every_program_that_starts_ranks_has_the_timeout_flag(program):
    parse = _parsers()[program]
    assert parse([]).distributed_timeout_minutes == DEFAULT_TIMEOUT_MINUTES == 10
    assert parse(["--distributed-timeout-minutes", "0.5"]).distributed_timeout_minutes == 0.5


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-m", "megatron_spava.video_qa", "--random-weights"],
    [sys.executable, "tools/bench_prefill.py", "--shape", "tiny", "--device", "cpu"],
    [sys.executable, "tools/eval_needles.py"],
    [sys.executable, "-m", "megatron_spava.attention_demo"],
], ids=["video_qa", "bench_prefill", "eval_needles", "attention_demo"])
@pytest.mark.parametrize("bad", [["--distributed-timeout-minutes", "0"], ["--distributed-timeout-minutes", "-1"],
                                 ["--nproc", "0"]], ids=["timeout0", "timeout-1", "nproc0"])
@pytest.mark.slow  # 12 tool start-ups, ~4.5 s each on the 2-core machine
def test_bad_timeout_and_nproc_are_refused_before_any_rank(tmp_path, cmd, bad):
    out = subprocess.run(cmd + ["--work-dir", str(tmp_path)] * ("megatron_spava.video_qa" in cmd) + bad,
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = _error_lines(out.stderr)
    assert len(errors) == 1 and bad[0] in errors[0], out.stderr
    assert "Traceback" not in out.stderr


# ---- a stalled or killed rank ends the job ------------------------------------------------

MAIN_JOB = [sys.executable, "-m", "megatron_spava.video_qa", "--random-weights", "--needle-tokens", "1024",
            "--max-new-tokens", "2", "--compare", "none"]
BENCH = [sys.executable, "tools/bench_prefill.py", "--nproc", "2", "--shape", "tiny", "--device", "cpu",
         "--tokens", "1200", "--repeats", "1", "--warmup", "0", "--algos", "spava"]


def _run_with_fault(cmd, fault, tmp_path):
    """Run `cmd` with rank fault `fault` (launch.FAULT_ENV) under a 3 s collective timeout;
    return (exit code, stderr, seconds); no process of the run may outlive it."""
    extra = ["--work-dir", str(tmp_path)] if "megatron_spava.video_qa" in cmd else []
    start = time.time()
    p = subprocess.Popen(cmd + extra + ["--distributed-timeout-minutes", str(TIMEOUT_MIN)], cwd=ROOT,
                         env={**ENV, FAULT_ENV: fault}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = set()
    try:
        while p.poll() is None and time.time() - start < 240:
            try:
                seen.update(psutil.Process(p.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    elapsed = time.time() - start
    time.sleep(0.5)
    alive = [c for c in seen if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for c in alive:
        c.kill()
    assert not alive, f"processes outlived the job: {alive}"
    assert seen, "no rank started"
    return p.returncode, err, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("program", ["video_qa", "bench_prefill"])
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_stalled_or_killed_rank_ends_the_job_naming_it(tmp_path, program, how):
    cmd, phase = (MAIN_JOB, "prefill") if program == "video_qa" else (BENCH, "running spava")
    code, err, elapsed = _run_with_fault(cmd, f"1:{phase}:{how}", tmp_path)
    errors = _error_lines(err)
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert "Traceback" not in err
    if how == "stop":
        assert "rank 1 stopped responding while running" in errors[0] and "(process stopped)" in errors[0]
        assert "rank 0 waited for it 0.25 min (--distributed-timeout-minutes)" in errors[0], errors[0]
    else:
        assert "rank 1 was killed (SIGKILL) while running" in errors[0], errors[0]
    assert phase in errors[0]
    assert elapsed < 120, elapsed


# ---- the API: one rank's bad input ----------------------------------------------------------

FREE = dict(budget_align=1, anchor_len=4)


def _one_rank_catches_its_error(check):
    """Rank 1's input is bad; it catches its ValueError and moves on to a barrier, while
    rank 0 goes into the attention's collectives. Returns what each rank saw."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = SpavaLayout.plan(context_len=100, query_len=3, cp_size=world,
                              config=SpavaConfig(check_ranks_agree=check, **FREE))
    s = layout.local_len(rank)
    q, k, v = torch.randn(s, 1, 4, 8), torch.randn(s, 1, 2, 8), torch.randn(s, 1, 2, 8)
    if rank == 1:
        q = q[:, :, :3]  # bad on rank 1 only
    start, seen = time.time(), []
    try:
        try:
            spava_attn_func(q, k, v, layout=layout, cp_group=dist.group.WORLD)
            seen.append("ok")
        except ValueError as err:
            seen.append(f"ValueError: {err}")
            dist.barrier()  # the caller moves on to its next collective
            seen.append("barrier passed")
    except RuntimeError as err:  # the process group's timeout, or its peer gone after it
        seen.append(f"RuntimeError: {' '.join(str(err).split())}")
    return seen, time.time() - start


def test_one_ranks_bad_input_through_the_api():
    """What README's "One rank's bad input" says: with check_ranks_agree=True every rank
    raises the same ValueError (so a caller that catches it stays in step); without it, a
    rank that catches its own error leaves its peer in a collective until the process
    group's timeout, which then raises there instead of hanging."""
    agreed = run_ranks(_one_rank_catches_its_error, 2, True, timeout=30)
    assert all(len(m) == 2 and m[0].startswith("ValueError: spava_attn_func: (rank 1)") and
               m[1] == "barrier passed" for m, _ in agreed), agreed
    assert agreed[0][0] == agreed[1][0]
    alone = run_ranks(_one_rank_catches_its_error, 2, False, timeout=3, grace=10)
    (seen0, t0), (seen1, t1) = alone
    assert seen1[0].startswith("ValueError: spava_attn_func: query heads (3)"), alone
    assert "barrier passed" not in seen1 and seen0 != ["ok"], alone
    failures = [seen0[-1], seen1[-1]]
    assert all(f.startswith("RuntimeError") and is_collective_failure(f) for f in failures), alone
    assert any("Timed out" in f for f in failures) and 2.5 < max(t0, t1) < 30, alone


# ---- atomic caches: an interrupted or damaged entry is rebuilt ------------------------------

def test_cached_dir_and_file_rebuild_what_is_incomplete_or_damaged(tmp_path):
    from megatron_spava.cache import MANIFEST, cached_dir, cached_file

    calls = []

    def build(d):
        calls.append(d)
        for name, text in (("model.safetensors", "weights"), ("tokenizer.json", "tok")):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)

    def broken(d):  # killed half-way: the weights written, the tokenizer not
        with open(os.path.join(d, "model.safetensors"), "w") as f:
            f.write("weights")
        raise KeyboardInterrupt

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        cached_dir(ckpt, broken)
    assert os.listdir(tmp_path) == []  # nothing at the path, no partial folder left
    os.makedirs(ckpt)  # what the old code left: weights and no tokenizer
    open(os.path.join(ckpt, "model.safetensors"), "w").write("weights")
    assert cached_dir(ckpt, build) == ckpt and len(calls) == 1
    assert sorted(os.listdir(ckpt)) == sorted([MANIFEST, "model.safetensors", "tokenizer.json"])
    cached_dir(ckpt, build)
    assert len(calls) == 1  # complete: reused
    open(os.path.join(ckpt, "tokenizer.json"), "w").write("damaged")
    cached_dir(ckpt, build)
    assert len(calls) == 2 and open(os.path.join(ckpt, "tokenizer.json")).read() == "tok"
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    cached_dir(ckpt, build)
    assert len(calls) == 3 and sorted(os.listdir(tmp_path)) == ["ckpt"]

    video = str(tmp_path / "v.mp4")
    writes = []

    def write(p):
        assert p.endswith(".mp4")  # the writer sees the extension
        writes.append(p)
        open(p, "wb").write(b"video bytes")

    cached_file(video, write)
    cached_file(video, write)
    assert len(writes) == 1
    open(video, "wb").write(b"video")  # cut short
    cached_file(video, write)
    assert len(writes) == 2 and open(video, "rb").read() == b"video bytes"
    os.remove(video + ".sha256")  # killed between the rename and the digest
    cached_file(video, write)
    assert len(writes) == 3


def test_main_job_rebuilds_a_half_written_checkpoint_and_a_damaged_video(tmp_path):
    """The demo's own set-up (create_defaults, run before any rank starts): a --random-weights
    checkpoint folder holding only model.safetensors (a kill mid-write, before this fix) and a
    truncated needle video are both rebuilt; the rebuilt video equals the first one."""
    from megatron_spava.video import count_sampled_frames
    from megatron_spava.video_qa import build_parser, create_defaults, resolve_options

    args = build_parser().parse_args(["--work-dir", str(tmp_path), "--random-weights", "--needle-tokens", "256"])
    opts = resolve_options(args)
    checkpoint = opts.checkpoint
    os.makedirs(checkpoint)
    open(os.path.join(checkpoint, "model.safetensors"), "wb").write(b"half")
    create_defaults(opts)
    opts.family.prompter(checkpoint)  # the tokenizer and chat template load
    from megatron_spava.models.common.checkpoint_io import iter_hf_tensors
    assert len(dict(iter_hf_tensors(checkpoint))) > 10
    first = open(opts.video, "rb").read()
    frames = count_sampled_frames(opts.video, fps=None, max_frames=None, frames_fps=2.0)
    with open(opts.video, "r+b") as f:
        f.truncate(len(first) // 3)
    create_defaults(opts)
    assert open(opts.video, "rb").read() == first
    assert count_sampled_frames(opts.video, fps=None, max_frames=None, frames_fps=2.0) == frames


# ---- bounded, validated inputs of the main job --------------------------------------------

BAD_FLAGS = {
    ("--max-frames", "0"): "--max-frames must be >= 1, got 0",
    ("--max-frames", "-5"): "--max-frames must be >= 1, got -5",
    ("--fps", "-1"): "--fps must be a positive number, got -1.0",
    ("--fps", "nan"): "--fps must be a positive number",
    ("--frames-fps", "0"): "--frames-fps must be a positive number",
    ("--context-parallel-size", "0"): "--context-parallel-size must be >= 1, got 0",
    ("--context-parallel-size", "-1"): "--context-parallel-size must be >= 1, got -1",
    ("--tensor-model-parallel-size", "0"): "--tensor-model-parallel-size must be >= 1, got 0",
    ("--video", "a.mp4", "--frames-dir", "frames"): "--video and --frames-dir exclude each other",
    ("--hf-path", "a", "--megatron-path", "b"): "--hf-path and --megatron-path exclude each other",
    ("--spava-no-passing", "--spava-passing-len", "512"): "--spava-passing-len sets the passing budget, "
                                                           "which --spava-no-passing turns off",
    ("--spava-no-passing", "--spava-passing-scale", "2"): "--spava-passing-scale sets the passing budget",
}


@pytest.mark.parametrize("flags", sorted(BAD_FLAGS), ids=" ".join)
def test_main_job_refuses_bad_sizes_and_flags_that_exclude_each_other(flags):
    from megatron_spava.arguments import spava_config_from_args
    from megatron_spava.video_qa import build_parser, check_flags
    args = build_parser().parse_args(list(flags))
    with pytest.raises(ValueError) as err:
        check_flags(args)
        spava_config_from_args(args)
    assert BAD_FLAGS[flags] in str(err.value)


@pytest.mark.parametrize("flags", [("--max-frames", "-5"), ("--video", "a.mp4", "--frames-dir", "frames"),
                                   ("--spava-no-passing", "--spava-passing-len", "512"),
                                   ("--context-parallel-size", "0")], ids=" ".join)
def test_main_job_bad_flags_are_one_line_before_any_rank(tmp_path, flags):
    out = subprocess.run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                          "--random-weights", *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120)
    errors = _error_lines(out.stderr)
    assert out.returncode == 2 and len(errors) == 1 and BAD_FLAGS[flags] in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_run_beyond_the_machines_memory_is_refused_before_rendering(tmp_path):
    from megatron_spava import memory
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                          "--random-weights", "--needle-tokens", "100000000"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    errors = _error_lines(out.stderr)
    assert out.returncode == 2 and len(errors) == 1, out.stderr
    assert "GiB of host memory" in errors[0] and "lower --needle-tokens" in errors[0], errors
    assert time.time() - start < 60 and not [n for n in os.listdir(tmp_path) if n.endswith(".mp4")]
    # 256K tokens on 2 ranks asks for more than a 24 GiB machine has; 4096 fits in 8 GiB
    with pytest.raises(ValueError, match="lower --needle-tokens"):
        memory.check_host_memory(262144, 2, available=24 << 30)
    memory.check_host_memory(4096, 2, available=8 << 30)
    with pytest.raises(ValueError, match="per GPU at TP 1 x CP 2"):
        from megatron_spava.models.qwen2_5_vl.tiny import shaped_hf_config
        from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig
        cfg = Qwen25VLConfig.from_hf(shaped_hf_config("7b"))
        memory.check_gpu_memory(cfg, 4 << 20, 1, 2, 2, 15 << 30, False, total=80 << 30)


@pytest.mark.slow
def test_host_memory_estimate_covers_a_measured_run(tmp_path):
    """The estimate is at least the measured peak (whole process tree) of a real run."""
    from megatron_spava.memory import estimate_host_bytes
    p = subprocess.Popen([*MAIN_JOB, "--work-dir", str(tmp_path)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        try:
            procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            peak = max(peak, sum(q.memory_info().rss for q in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    assert p.returncode == 0, p.stderr.read()[-2000:]
    assert 0.5 * estimate_host_bytes(1024, 2) < peak <= estimate_host_bytes(1024, 2), peak


@pytest.mark.slow
def test_non_finite_logits_are_an_error(tmp_path):
    """A checkpoint with a NaN weight: one line saying the logits are not finite, exit 1
    (it used to print an answer and "same answer: True")."""
    from safetensors.torch import load_file, save_file
    from megatron_spava.models.qwen2_5_vl.tiny import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"))
    path = os.path.join(ckpt, "model.safetensors")
    weights = load_file(path)
    name = next(k for k in weights if k.endswith("norm.weight") and "visual" not in k)
    weights[name][0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    out = subprocess.run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                          "--hf-path", ckpt, "--needle-tokens", "1024", "--max-new-tokens", "2"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = _error_lines(out.stderr)
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-3000:]
    assert "first-token logits are not finite" in errors[0] and "same answer" not in out.stdout


# ---- check_ranks_agree compares the plans, not only the errors ------------------------------

def _ranks_plan_differently(case):
    rank, world = dist.get_rank(), dist.get_world_size()
    n = 120 if (case == "context_len" and rank == 1) else 100
    cfg = SpavaConfig(check_ranks_agree=True, **FREE)
    layout = SpavaLayout.plan(context_len=n, query_len=3, cp_size=world, config=cfg)
    s = layout.local_len(rank)
    batch = 2 if (case == "batch" and rank == 1) else 1
    dtype = torch.float64 if (case == "dtype" and rank == 1) else torch.float32
    q, k, v = (torch.randn(s, batch, h, 8, dtype=dtype) for h in (4, 2, 2))
    try:
        spava_attn_func(q, k, v, layout=layout, cp_group=dist.group.WORLD)
        return None
    except ValueError as err:
        dist.barrier()
        return str(err)


@pytest.mark.parametrize("case,detail", [("context_len", "context_len 120 vs 100"),
                                         ("batch", "q shape [b, heads, head_dim] (2, 4, 8) vs (1, 4, 8)"),
                                         ("dtype", "dtype torch.float64 vs torch.float32"),
                                         ("same", None)])
def test_check_ranks_agree_compares_layouts_and_shapes(case, detail):
    messages = run_ranks(_ranks_plan_differently, 2, case, timeout=30)
    if detail is None:
        assert messages == [None, None]
        return
    assert messages[0] == messages[1], messages  # the same error on every rank
    assert messages[0].startswith("spava_attn_func: (rank 1) its layout or inputs differ from rank 0's (plan hash")
    assert detail in messages[0], messages[0]


# ---- smaller things -------------------------------------------------------------------------

def test_attention_without_a_process_group_says_to_start_one():
    layout = SpavaLayout.plan(context_len=100, query_len=3, cp_size=2, config=SpavaConfig(**FREE))
    s = layout.local_len(0)
    q, k, v = torch.randn(s, 1, 4, 8), torch.randn(s, 1, 2, 8), torch.randn(s, 1, 2, 8)
    with pytest.raises(ValueError, match=r"torch.distributed is not initialised and cp_group is None .* "
                                         r"cp_size=2: initialise a process group"):
        spava_attn_func(q, k, v, layout=layout, cp_group=None)


def test_attention_refuses_autograd():
    layout = SpavaLayout.plan(context_len=100, query_len=3, cp_size=1, config=SpavaConfig(**FREE))
    s = layout.local_len(0)
    q, k, v = torch.randn(s, 1, 4, 8, requires_grad=True), torch.randn(s, 1, 2, 8), torch.randn(s, 1, 2, 8)
    with pytest.raises(ValueError, match="forward only: .* torch.no_grad"):
        spava_attn_func(q, k, v, layout=layout)
    with torch.no_grad():
        assert spava_attn_func(q, k, v, layout=layout).shape == q.shape


def test_megatron_algo_without_te_says_it_needs_transformer_engine():
    from megatron_spava.specs import te_available
    if te_available():
        pytest.skip("Transformer Engine imports here")
    out = subprocess.run([sys.executable, "-m", "megatron_spava.video_qa", "--context-parallel-algo", "megatron"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" not in out.stderr
    assert "needs the transformer_engine package" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("cmd,bad,expect", [
    (["tools/eval_needles.py"], ["--tokens", "-5"], "--tokens must be >= 1, got -5"),
    (["tools/eval_needles.py"], ["--checkpoint", "/nonexistent/ckpt"], "checkpoint not found"),
    (["tools/bench_prefill.py", "--shape", "tiny", "--device", "cpu"], ["--tokens", "-5"],
     "--tokens must be >= 1, got -5"),
    (["-m", "megatron_spava.video_qa"], ["--fp8-format", "e4m3"], "FP8 runs on a CUDA GPU"),
    (["-m", "megatron_spava.video_qa"], ["--lm-fusions", "te-ops"], "--lm-fusions: lm_fusions='te-ops' needs "
                                                                    "Transformer Engine layers"),
    (["tools/eval_needles.py"], ["--lm-fusions", "megatron"], "--lm-fusions: lm_fusions='megatron' needs"),
], ids=["eval-tokens", "eval-checkpoint", "bench-tokens", "qa-fp8-cpu", "qa-fusions-local", "eval-fusions-local"])
def test_tools_report_bad_input_in_one_line(cmd, bad, expect):
    out = subprocess.run([sys.executable, *cmd, *bad], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120)
    errors = _error_lines(out.stderr)
    assert out.returncode == 2 and len(errors) == 1 and expect in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
