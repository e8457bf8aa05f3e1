"""The README's main job and the TP x CP launch example run end to end on CPU ranks."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd, timeout=300):
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_demo_prints_the_comparison_table():
    out = _run([sys.executable, "-m", "megatron_spava.attention_demo", "--context-len", "2048",
                "--query-len", "16", "--repeats", "1"])
    rows = {m.group(1).strip(): m for m in re.finditer(
        r"^(full \(1 process\)|spava, full budget|spava|star \(no passing\))\s+(\d+)\s+(\d+)\s+"
        r"([\d.]+)\s+([\d.]+)x\s+([\d.e+-]+)\s+([\d.e+-]+)$", out, flags=re.M)}
    assert set(rows) == {"full (1 process)", "spava", "star (no passing)", "spava, full budget"}, out
    assert float(rows["spava, full budget"].group(6)) < 1e-5  # exact at full budget
    assert float(rows["spava"].group(7)) < 1e-5  # query rows exact
    assert int(rows["spava"].group(2)) == 2 and int(rows["spava"].group(3)) < 2048


def test_demo_rejects_bad_sizes_before_launching():
    out = subprocess.run([sys.executable, "-m", "megatron_spava.attention_demo", "--context-len", "3"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "context too short" in out.stderr


@pytest.mark.slow
def test_gpt_prefill_example_tp2_cp2_full_budget_is_exact():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                "examples/gpt_prefill.py", "--tensor-model-parallel-size", "2",
                "--context-parallel-size", "2", "--context-parallel-algo", "spava",
                "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                "--num-query-groups", "2", "--seq-length", "1024", "--spava-query-len", "16",
                "--spava-passing-len", "1024", "--repeats", "1", "--compare-full"])
    assert "spava on local layers: TP=2 x CP=2, 1024 tokens (16 query)" in out
    diffs = dict(re.findall(r"(\w+) rows ([\d.e+-]+)", out))
    assert set(diffs) == {"query", "all", "anchor"} and max(map(float, diffs.values())) < 1e-4, out


SHIPPED = os.path.isfile(os.path.join(ROOT, "megatron_spava", "assets", "needle_qwen", "model.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="the trained needle model is not shipped yet")
def test_video_qa_main_job(tmp_path):
    """README's first command, on a fresh work dir: the needle video is written as an mp4,
    the shipped model answers its question under Spava on 2 CPU ranks and under full
    attention, and both answers are right."""
    out = _run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                "--json", str(tmp_path / "r.json")], timeout=600)
    import json
    result = json.load(open(tmp_path / "r.json"))
    assert set(result["runs"]) == {"spava", "full"}
    assert result["runs"]["spava"]["cp"] == 2 and result["runs"]["full"]["cp"] == 1
    assert result["video"].endswith(".mp4") and result["video_tokens"] >= 4000
    assert result["runs"]["spava"]["answer"] == result["true_answer"], out
    assert result["runs"]["full"]["answer"] == result["true_answer"], out
    assert f"true answer: {result['true_answer']!r}" in out and "question:" in out and "WRONG" not in out


@pytest.mark.slow
def test_video_qa_random_weights_full_budget_agrees_with_full(tmp_path):
    out = _run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                "--random-weights", "--needle-tokens", "1024", "--max-new-tokens", "4",
                "--spava-passing-len", "1024", "--json", str(tmp_path / "r.json")], timeout=600)
    import json
    result = json.load(open(tmp_path / "r.json"))
    assert result["first_logits_max_abs_diff"] < 1e-3 and result["same_answer"], out
    assert len(result["runs"]["spava"]["tokens"]) == 4  # random weights: no early end


def _bad(tmp_path, *args):
    out = subprocess.run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                          "--random-weights", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr
    return out.returncode, lines


@pytest.mark.slow  # several CLI processes end to end (15-21 s)
def test_video_qa_reports_bad_input_before_launching(tmp_path):
    code, lines = _bad(tmp_path, "--hf-path", str(tmp_path / "missing"))
    assert code == 2 and lines == [f"megatron-spava-demo: error: checkpoint directory not found: {tmp_path / 'missing'}"]
    code, lines = _bad(tmp_path, "--video", str(tmp_path / "missing.mp4"))
    assert code == 2 and len(lines) == 1 and "video not found" in lines[0]
    (tmp_path / "text.mp4").write_text("not a video")
    code, lines = _bad(tmp_path, "--video", str(tmp_path / "text.mp4"))
    assert code == 2 and len(lines) == 1 and "cannot decode video" in lines[0]
    from megatron_spava.video import write_synthetic_video
    short = write_synthetic_video(str(tmp_path / "short.mp4"), frames=6)
    code, lines = _bad(tmp_path, "--video", short, "--context-parallel-size", "4")
    assert code == 2 and len(lines) == 1 and "temporal groups" in lines[0] and "needs at least 4" in lines[0]


@pytest.mark.slow
def test_video_qa_reports_a_rank_error_once(tmp_path):
    code, lines = _bad(tmp_path, "--needle-tokens", "1024", "--spava-anchor-len", "99968", "--compare", "none")
    errors = [line for line in lines if "error" in line]
    assert code == 1 and len(errors) == 1 and "anchor_len=99968 is longer than the context" in errors[0], lines


@pytest.mark.slow
def test_video_qa_several_questions_over_one_cached_context(tmp_path):
    """--question twice: one video prefill, both questions answered over the cached context,
    a row per question (the second pays only its query pass), compared with exact attention."""
    out = _run([sys.executable, "-m", "megatron_spava.video_qa", "--work-dir", str(tmp_path),
                "--random-weights",  # the pipeline, not the answers: random weights decode every token
                "--max-new-tokens", "2", "--max-frames", "16", "--question", "What is shown?",
                "--question", "What colour is it?", "--json", str(tmp_path / "r.json")], timeout=600)
    import json
    result = json.load(open(tmp_path / "r.json"))
    assert result["questions"] == ["What is shown?", "What colour is it?"]
    spava, full = result["runs"]["spava"], result["runs"]["full"]
    assert len(spava) == len(full) == 2 and spava[0]["cp"] == 2 and full[0]["cp"] == 1
    assert spava[0]["context_s"] > 0 and spava[1]["context_s"] == 0 == spava[1]["vision_s"]
    assert all(len(r["tokens"]) == 2 and 0 <= r["first_logits_rel_err_vs_full"] < 0.5 for r in spava)
    assert "question 2: 'What colour is it?'" in out, out


@pytest.mark.slow
def test_bench_prefill_runs_ablation_variants_by_name(tmp_path):
    """tools/bench_prefill.py on 2 CPU ranks, tiny shape: variants named by the registry
    (two-pass prefill, vision without frame parallelism) run and are reported."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "tools/bench_prefill.py", "--shape", "tiny", "--device", "cpu", "--tokens", "1200",
          "--repeats", "1", "--warmup", "0", "--algos", "spava", "spava-no-fuse-query",
          "spava-no-overlap-no-frame-parallel", "spava-selection-mean", "full", "--json", str(tmp_path / "b.json")])
    import json
    result = json.load(open(tmp_path / "b.json"))
    runs = result["runs"]["1200"]
    assert set(runs) == {"spava", "spava-no-fuse-query", "spava-no-overlap-no-frame-parallel",
                         "spava-selection-mean", "full"}
    assert all(r["ttft_median_s"] > 0 and "speedup_vs_full" in r for r in runs.values())
    # the roofline floor beside each run (its FLOPs: tests/test_roofline.py), rates from this run
    assert result["rates"]["gemm_flops_per_s"] > 0 and result["rates"]["attention_flops_per_s"] > 0
    floors = {a: r["roofline"] for a, r in runs.items()}
    assert all(f["floor_s"] == pytest.approx(f["vision_s"] + f["dense_s"] + f["attention_s"]) for f in floors.values())
    assert floors["spava-no-overlap-no-frame-parallel"]["vision_s"] == pytest.approx(floors["full"]["vision_s"])
    assert floors["spava"]["vision_s"] < floors["full"]["vision_s"]


@pytest.mark.slow
def test_bench_prefill_runs_internvl3(tmp_path):
    """tools/bench_prefill.py --model internvl3 --shape tiny on 2 CPU ranks (the tool's dry
    run of --shape internvl3-2b): the one-pass and two-pass prefills run and are reported."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "tools/bench_prefill.py", "--model", "internvl3", "--shape", "tiny", "--device", "cpu",
          "--tokens", "1200", "--repeats", "1", "--warmup", "0", "--algos", "spava",
          "spava-no-fuse-query", "full", "--json", str(tmp_path / "b.json")])
    import json
    result = json.load(open(tmp_path / "b.json"))
    runs = result["runs"]["1200"]
    assert result["model"] == "internvl3" and set(runs) == {"spava", "spava-no-fuse-query", "full"}
    assert all(r["ttft_median_s"] > 0 and r["tokens"] == 1196 for r in runs.values())


def _bench_prefill():
    from megatron_spava.perf import bench_prefill
    return bench_prefill


def test_bench_prefill_megatron_variants_need_te_and_pad_the_prompt():
    """megatron-<comm> is accepted by name, refused in one line where TE does not import, and
    a run with it pads every algorithm's prompt to a multiple of 2 x CP (TE's rule)."""
    from megatron_spava.specs import te_available
    from megatron_spava.perf.inputs import prompt_lengths, synthetic_inputs
    bp = _bench_prefill()
    cfg = bp.model_config("tiny")
    for multiple in (1, 4, 8):
        groups, context, query = prompt_lengths(1200, cfg, multiple)
        assert (context + query) % multiple == 0 and 24 <= query < 24 + multiple
        assert synthetic_inputs(cfg, 1200, 0, multiple).input_ids.shape[1] == context + query
    assert bp.algo_and_config("megatron-a2a")[0] == "megatron" and bp.variant_option("megatron-a2a+p2p") == "a2a+p2p"
    if te_available():
        pytest.skip("Transformer Engine imports here: tests/test_te.py runs the megatron variants")
    out = subprocess.run([sys.executable, "tools/bench_prefill.py", "--shape", "tiny", "--device", "cpu",
                          "--algos", "spava", "megatron-p2p"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and "Transformer Engine does not import here" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_tp_cp_check_agrees_with_one_rank_and_can_fail(tmp_path):
    """tools/tp_cp_check.py on 4 CPU ranks: spava at full budget and ring at TP=2 x CP=2 and
    TP=1 x CP=4 give TP=1 x CP=1 full attention's first-token logits (float32) and its 16
    tokens, from weights drawn once per grid with the same seed; an impossible tolerance
    makes the same runs fail (exit 1)."""
    import json
    cmd = [sys.executable, "tools/tp_cp_check.py", "--nproc", "4", "--grids", "2x2", "1x4",
           "--json", str(tmp_path / "t.json")]
    _run(cmd, timeout=300)
    result = json.load(open(tmp_path / "t.json"))
    assert [(r["tp"], r["cp"], r["algo"]) for r in result["rows"]] == [
        (2, 2, "spava"), (2, 2, "ring"), (1, 4, "spava"), (1, 4, "ring")]
    assert all(r["ok"] and r["same_tokens"] and r["rel_err"] < 1e-5 for r in result["rows"]), result["rows"]
    assert len(result["reference_tokens"]) == 16
    out = subprocess.run(cmd[:-2] + ["--tolerance", "1e-12", "--algos", "spava"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "FAIL" in out.stdout, out.stdout[-2000:]
