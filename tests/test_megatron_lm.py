"""The Megatron-LM patch and the hooks it calls.

The patch is applied to a real checkout when MEGATRON_LM_PATH points to Megatron-LM at
tag core_v0.16.1 (the test is skipped otherwise; no Megatron-LM code is committed).
The hooks themselves run here on CPU with Megatron-LM-shaped arguments.
"""

import argparse
import importlib
import os
import py_compile
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = os.path.join(ROOT, "patches", "megatron_lm_core_v0.16.1.patch")
TOOL = os.path.join(ROOT, "tools", "megatron_lm_patch.py")
FILES = ("megatron/training/arguments.py", "gpt_builders.py", "pretrain_gpt.py")


def _patch_text():
    with open(PATCH) as f:
        return f.read()


def test_patch_is_small_and_touches_only_the_three_files():
    text = _patch_text()
    touched = re.findall(r"^\+\+\+ b/(\S+)", text, flags=re.M)
    assert sorted(touched) == sorted(FILES)
    added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in text.splitlines() if l.startswith("-") and not l.startswith("---")]
    assert len(added) <= 25 and len(removed) <= 2
    assert len(re.findall(r"^@@", text, flags=re.M)) <= 6


def test_every_hook_the_patch_imports_exists():
    names = re.findall(r"^\+\s*from (megatron_spava[\w.]*) import (\w+)", _patch_text(), flags=re.M)
    assert names
    for module, name in names:
        assert hasattr(importlib.import_module(module), name), (module, name)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_PATH"),
                    reason="set MEGATRON_LM_PATH to a Megatron-LM core_v0.16.1 checkout")
def test_patch_applies_to_a_megatron_lm_checkout(tmp_path):
    checkout = os.environ["MEGATRON_LM_PATH"]
    check = subprocess.run([sys.executable, TOOL, "check", checkout], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # apply to a copy of the three files, never to the user's checkout
    for rel in FILES:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(checkout, rel), tmp_path / rel)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for action, expected in (("apply", "applied"), ("status", "applied"),
                             ("revert", "reverted"), ("status", "not applied")):
        out = subprocess.run([sys.executable, TOOL, action, str(tmp_path)], capture_output=True,
                             text=True)
        assert out.returncode == 0 and expected in out.stdout, (action, out.stdout, out.stderr)
    subprocess.run([sys.executable, TOOL, "apply", str(tmp_path)], check=True, capture_output=True)
    for rel in FILES:
        py_compile.compile(str(tmp_path / rel), doraise=True)
    assert "--context-parallel-algo" in (tmp_path / FILES[0]).read_text()
    assert "megatron_spava.megatron_lm import layer_spec" in (tmp_path / "gpt_builders.py").read_text()


def _megatron_lm_args(**overrides):
    """The Megatron-LM arguments the hooks read, as parse_args would produce them."""
    from megatron_spava.arguments import add_spava_args
    parser = argparse.ArgumentParser()
    parser.add_argument("--context-parallel-algo", default=None)
    add_spava_args(parser)
    args = parser.parse_args([])
    defaults = dict(context_parallel_algo="spava", tensor_model_parallel_size=1,
                    context_parallel_size=2, num_attention_heads=4, num_query_groups=2,
                    seq_length=None, num_experts=None, moe_grouped_gemm=False,
                    qk_layernorm=False, qk_l2_norm=False, normalization="RMSNorm",
                    multi_latent_attention=False, spava_query_len=8)
    for key, value in {**defaults, **overrides}.items():
        setattr(args, key, value)
    return args


def test_layer_spec_hook():
    from megatron_spava import megatron_lm
    from megatron_spava.modules import SpavaCoreAttention
    spec = megatron_lm.layer_spec(_megatron_lm_args(), use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is SpavaCoreAttention
    with pytest.raises(ValueError, match="multi-latent-attention"):
        megatron_lm.layer_spec(_megatron_lm_args(multi_latent_attention=True), use_te=False)
    with pytest.raises(ValueError, match="not divisible"):
        megatron_lm.layer_spec(_megatron_lm_args(tensor_model_parallel_size=3), use_te=False)


@pytest.fixture
def no_request_after():
    from megatron_spava import context
    yield
    context.deactivate()  # the hook activates a request for "the next forward"


def test_get_batch_hook_shards_and_activates_the_request(no_request_after):
    from megatron_spava import megatron_lm
    from megatron_spava.context import current_request
    S = 300
    batch = {"tokens": torch.arange(S).expand(2, -1), "labels": torch.arange(1, S + 1).expand(2, -1),
             "loss_mask": torch.ones(2, S), "attention_mask": torch.ones(2, 1, S, S, dtype=torch.bool),
             "position_ids": torch.arange(S).expand(2, -1)}
    args = _megatron_lm_args(spava_budget_align=1, spava_anchor_len=12)
    owned = torch.zeros(S)
    for rank in (0, 1):
        from unittest import mock
        with mock.patch("megatron.core.parallel_state.get_context_parallel_rank", return_value=rank):
            local = megatron_lm.get_batch_on_this_cp_rank_from_args(dict(batch), args)
        assert list(local) == list(batch)  # Megatron's keys, in Megatron's order
        layout = current_request().layout
        idx = layout.local_indices(rank)
        assert torch.equal(local["tokens"][0], idx) and torch.equal(local["position_ids"][1], idx)
        assert torch.equal(current_request().positions, idx)
        assert local["attention_mask"] is None
        owned.index_add_(0, idx, local["loss_mask"][0])
    assert torch.equal(owned, torch.ones(S))  # every token's loss counted exactly once


def test_options_validated_once_per_run_and_layout_planned_once_per_length(no_request_after):
    """Per batch the hook only looks up the cached layout: validation runs once per run,
    planning once per sequence length, however many batches."""
    from unittest import mock
    from megatron_spava import megatron_lm
    from megatron_spava.context import current_request
    megatron_lm._layout.cache_clear()
    args = _megatron_lm_args(spava_budget_align=1, spava_anchor_len=12)
    batches = [{"tokens": torch.arange(S).expand(2, -1), "position_ids": torch.arange(S).expand(2, -1)}
               for S in (300, 300, 300, 256, 256)]
    with mock.patch.object(megatron_lm, "validate_spava_args", wraps=megatron_lm.validate_spava_args) as v, \
            mock.patch.object(megatron_lm, "plan_layout", wraps=megatron_lm.plan_layout) as p, \
            mock.patch("megatron.core.parallel_state.get_context_parallel_rank", return_value=1):
        megatron_lm.layer_spec(args, use_te=False)
        layouts = []
        for batch in batches:
            megatron_lm.get_batch_on_this_cp_rank_from_args(batch, args)
            layouts.append(current_request().layout)  # each batch replaces the last request
    assert v.call_count == 1 and p.call_count == 2
    assert layouts[0] is layouts[2] and layouts[3].total_len == 256


def test_request_lifecycle():
    from megatron_spava.context import activate, cp_request, current_request, deactivate
    assert current_request() is None
    first = activate("layout-1")
    assert current_request() is first
    second = activate("layout-2")  # replaces, never stacks
    assert current_request() is second
    with cp_request("scoped") as scoped:
        assert current_request() is scoped  # a with block shadows the activated request
    assert current_request() is second
    deactivate()
    assert current_request() is None
    with pytest.raises(RuntimeError, match="boom"), cp_request("scoped"):
        raise RuntimeError("boom")
    assert current_request() is None  # reset on exceptions too


def test_unfused_prefill_is_refused_by_the_single_pass_hook():
    from megatron_spava import megatron_lm
    args = _megatron_lm_args(spava_no_fuse_query=True, seq_length=4096)
    with pytest.raises(ValueError, match="fuse_query=False.*forward_step"):
        megatron_lm.layer_spec(args, use_te=False)


def _te_and_gpu():
    from megatron_spava.specs import te_available
    return torch.cuda.is_available() and te_available()


@pytest.mark.cuda
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_PATH"),
                    reason="set MEGATRON_LM_PATH to a Megatron-LM core_v0.16.1 checkout")
@pytest.mark.skipif(not _te_and_gpu(), reason="needs a GPU and Transformer Engine")
def test_megatron_lm_launch_eval_loss_matches_without_cp(tmp_path):
    """Megatron-LM's pretrain_gpt.py --skip-train on mock data with TE layers: the
    evaluation loss with --context-parallel-algo spava (full budget) and ring equals the
    launch without CP (examples/megatron_lm/compare_eval_loss.py). TP x CP from
    MEGATRON_LM_TP / MEGATRON_LM_CP (default 1 x 1: one GPU)."""
    tp, cp = os.environ.get("MEGATRON_LM_TP", "1"), os.environ.get("MEGATRON_LM_CP", "1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "megatron_lm", "compare_eval_loss.py"),
                          "--megatron-lm", os.environ["MEGATRON_LM_PATH"], "--tp", tp, "--cp", cp,
                          "--work", str(tmp_path)], capture_output=True, text=True, timeout=900)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
