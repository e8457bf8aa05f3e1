"""The shipped needle model (megatron_spava/assets/needle_qwen, trained by
tools/train_needle_model.py) on a fixed small eval set (4 samples per task at 4K video
tokens, seed 0) through the project's Megatron path on 2 CPU ranks: full attention answers
at least 95% right; Spava with passing blocks as long as the blocks gives the same answers
(1 sample per task); Spava at its default budgets is within 5 points of full on VNBench's
three tasks (with the default lse score: not yet; with lse-max: yes) (scene is where the algorithms differ by design: BENCHMARKS.md section 9).

MEGATRON_SPAVA_NEEDLE_CHECKPOINT and MEGATRON_SPAVA_NEEDLE_TOKENS point the tests at another
checkpoint and length (for validating a checkpoint before it is shipped)."""

import os

import pytest
import torch

from megatron_spava.tasks.model import ASSET_DIR
from megatron_spava.testing.tools import run_tool

CKPT = os.environ.get("MEGATRON_SPAVA_NEEDLE_CHECKPOINT") or ASSET_DIR
TOKENS = int(os.environ.get("MEGATRON_SPAVA_NEEDLE_TOKENS", 4096))
PER_TASK = 4  # 16 samples: 95% allows no wrong answer
VNBENCH_TASKS = ("retrieval", "ordering", "counting")

pytestmark = [pytest.mark.slow,  # evaluates the trained model on 2 ranks, end to end
              pytest.mark.skipif(not os.path.isfile(os.path.join(CKPT, "model.safetensors")),
                                 reason=f"no trained needle model at {CKPT} (tools/train_needle_model.py)")]


def _answer_all(ckpt, tokens, per_task):
    """On each of 2 ranks: full attention for its half of the eval set (one replica per
    rank), then Spava on CP = 2 for all of it, at full and at default budgets."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from megatron_spava import SpavaConfig, cpu_compat
    from megatron_spava.inference.generate import generate
    from megatron_spava.tasks import TASKS, eval_set, render_frames
    from megatron_spava.tasks.evaluate import _build_model
    from megatron_spava.tasks.model import NeedlePrompter

    cpu_compat.apply()
    rank = dist.get_rank()
    prompter = NeedlePrompter(ckpt)
    samples = eval_set(TASKS, tokens, per_task, seed=0)
    inputs = [prompter.inputs(s, render_frames(s)) for s in samples]
    out = {"full": {}, "spava_full_budget": {}, "spava": {}, "spava_lse_max": {}}
    vnbench = {i for i, s in enumerate(samples) if s.task in VNBENCH_TASKS}
    exact_check = {i for i, s in enumerate(samples) if s.index < 1}  # 1 per task: time
    for cp, runs in ((1, [("full", "full", SpavaConfig(), set(range(len(samples))))]),
                     (2, [("spava_full_budget", "spava", SpavaConfig(budget_align=1, passing_len=1 << 20),
                           exact_check),
                          ("spava", "spava", SpavaConfig(), vnbench),
                          ("spava_lse_max", "spava", SpavaConfig(selection="lse-max"), vnbench)])):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, context_parallel_size=cp)
        initialize_rng_tracker(inference_rng_tracker=True)
        model = _build_model(ckpt, cp, torch.device("cpu"), torch.float32)
        group = ps.get_context_parallel_group()
        for name, algo, config, which in runs:
            for i, (s, x) in enumerate(zip(samples, inputs)):
                if i not in which or (cp == 1 and i % 2 != rank):
                    continue
                g = generate(model, x, algo=algo, config=config, cp_group=group, device=torch.device("cpu"),
                             max_new_tokens=10, group=group)
                out[name][i] = prompter.decode(g.tokens)
    ps.destroy_model_parallel()
    return out, [(s.task, s.answer) for s in samples]


@pytest.fixture(scope="module")
def answers():
    from megatron_spava.testing import run_ranks
    results = run_ranks(_answer_all, 2, CKPT, TOKENS, PER_TASK, timeout=600)
    (a, truth), (b, _) = results
    a["full"].update(b["full"])
    assert a["spava"] == b["spava"] and a["spava_full_budget"] == b["spava_full_budget"]
    assert a["spava_lse_max"] == b["spava_lse_max"]
    return a, truth


def _accuracy(preds, truth, tasks):
    picked = [i for i, (task, _) in enumerate(truth) if task in tasks]
    return sum(preds[i].strip() == truth[i][1] for i in picked) / len(picked)


def test_full_attention_answers_the_eval_set(answers):
    preds, truth = answers
    from megatron_spava.tasks import TASKS
    wrong = [(truth[i], preds["full"][i]) for i in range(len(truth)) if preds["full"][i].strip() != truth[i][1]]
    assert _accuracy(preds["full"], truth, TASKS) >= 0.95, wrong


def test_spava_at_full_budget_gives_full_attentions_answers(answers):
    preds, _ = answers
    assert len(preds["spava_full_budget"]) == 4
    assert preds["spava_full_budget"] == {i: preds["full"][i] for i in preds["spava_full_budget"]}


@pytest.mark.xfail(strict=True, reason=(
    "issue 12's target is missed by the shipped model (measured 2026-12-06, CPU, CP=2, 4K tokens, 4 "
    "samples per task: full 12/12 on retrieval/ordering/counting, spava at default budgets with the "
    "default lse score 10/12, the two misses both ordering, which drop needles from the answer; with "
    "the reference's mean score 8/12). tools/selection_coverage.py: at layer 1, KV head 0 keeps 0-31% "
    "of the earlier blocks' needle tokens in the missed samples, where full attention's later needles "
    "put 67-74% of that head's attention on the earlier needles and the question 0.1-1%; the lse-max "
    "score (lse shared by the KV heads) answers 12/12 (the test below); SPAVA.md keeps lse the "
    "default. strict: if Spava ever meets the "
    "target, this test fails and the mark must go"))
def test_spava_at_default_budgets_is_within_5_points_of_full(answers):
    preds, truth = answers
    full, spava = _accuracy(preds["full"], truth, VNBENCH_TASKS), _accuracy(preds["spava"], truth, VNBENCH_TASKS)
    assert spava >= full - 0.05, (full, spava)


def test_spava_with_the_lse_max_score_at_default_budgets_is_within_5_points_of_full(answers):
    """The same target with selection "lse-max" (lse shared by the KV heads; docs/NOTES.md:
    at layer 1 one KV head's question does not look at the needles, and the later needles'
    tokens need them there)."""
    preds, truth = answers
    full = _accuracy(preds["full"], truth, VNBENCH_TASKS)
    spava = _accuracy(preds["spava_lse_max"], truth, VNBENCH_TASKS)
    assert spava >= full - 0.05, (full, spava)


def test_selection_coverage_tool_measures_every_score(tmp_path):
    """tools/selection_coverage.py on 2 CPU ranks at 1K tokens, through the selection hook:
    every selected block that holds needle tokens gets a coverage per score of the table and
    KV head, each a fraction; the oracle keeps every needle token; the recall is a share."""
    import json

    from megatron_spava.algos.spava.selection import SCORERS
    out = tmp_path / "coverage.json"
    argv = ["--checkpoint", CKPT, "--tokens", "1024", "--samples", "1", "--tasks", "ordering", "counting",
            "--oracle", "--json", str(out)]
    assert run_tool("tools/selection_coverage.py", argv) == 0
    data = json.loads(out.read_text())
    samples = [s for rank in data["ranks"] for s in rank["samples"]]
    records = [r for s in samples for r in s["records"]]
    assert records and {r["layer"] for r in records} == set(range(4))
    for r in records:
        assert set(r["coverage"]) == set(SCORERS) >= {"lse", "mean", "lse-max"}  # the table, no oracle
        assert all(len(v) == 2 and all(0.0 <= c <= 1.0 for c in v) for v in r["coverage"].values())
        assert r["kept"] == [1.0, 1.0] and set(r["needles"].values()) == {1.0}  # the oracle
    for s in samples:
        assert s["recall"] and all(0.0 < t / c <= 1.0 for t, c in s["recall"].values())
