"""The Megatron-LM patches and the hooks they call.

One patch per family of Megatron-LM tags (megatron_spava.megatron_lm_patch.PATCHES); the
tool picks the one that fits a checkout. Each is checked and applied to a real checkout
named by MEGATRON_LM_016_PATH (core_v0.16.1), MEGATRON_LM_017_PATH (core_v0.17.x),
MEGATRON_LM_018_PATH (core_v0.18.x) or MEGATRON_LM_019_PATH (core_v0.19.0), skipped when
the variable is unset (no Megatron-LM code is committed). The hooks themselves run here on
CPU with Megatron-LM-shaped arguments and megatron-core's TransformerConfig.
"""

import argparse
import copy
import importlib
import os
import py_compile
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_spava.megatron_lm_patch import FILES, PATCHES, patch_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "megatron_lm_patch.py")
#: env var naming a checkout -> the patch the tool must pick for it
CHECKOUT_VARS = {"MEGATRON_LM_016_PATH": "megatron_lm_core_v0.16.1.patch",
                 "MEGATRON_LM_017_PATH": "megatron_lm_core_v0.17.0.patch",
                 "MEGATRON_LM_018_PATH": "megatron_lm_core_v0.18.0.patch",
                 "MEGATRON_LM_019_PATH": "megatron_lm_core_v0.19.0.patch"}


def _patch_text(name):
    with open(patch_path(name)) as f:
        return f.read()


def test_every_patch_is_in_patches_and_tested():
    on_disk = sorted(f for f in os.listdir(os.path.join(ROOT, "patches")) if f.endswith(".patch"))
    assert on_disk == sorted(PATCHES) == sorted(CHECKOUT_VARS.values())
    assert os.path.samefile(os.path.dirname(patch_path(on_disk[0])), os.path.join(ROOT, "patches"))


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_is_small_and_touches_only_the_three_files(name):
    text = _patch_text(name)
    touched = re.findall(r"^\+\+\+ b/(\S+)", text, flags=re.M)
    assert sorted(touched) == sorted(FILES)
    added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in text.splitlines() if l.startswith("-") and not l.startswith("---")]
    assert len(added) <= 25 and len(removed) <= 2
    assert len(re.findall(r"^@@", text, flags=re.M)) <= 6


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_every_hook_the_patch_imports_exists_and_is_called_the_same_way(name):
    text = _patch_text(name)
    names = re.findall(r"^\+\s*from (megatron_spava[\w.]*) import (\w+)", text, flags=re.M)
    assert len(names) == (5 if "gpt_config_from_args" in text else 4)
    for module, hook in names:
        assert hasattr(importlib.import_module(module), hook), (module, hook)
    # one interface per hook, on every tag
    assert re.search(r"^\+\s*return layer_spec\((get_args\(\)|args), use_te, config\)$", text, flags=re.M)
    assert re.search(r"^\+\s*model = prepare_model\(model, args\)$", text, flags=re.M)
    assert re.search(r"^\+\s*batch = get_batch_on_this_cp_rank_from_args\(batch, args\)$", text, flags=re.M)
    if name == "megatron_lm_core_v0.19.0.patch":  # its pretrain_gpt builds from a GPTModelConfig
        assert re.search(r"^\+\s*model_cfg = configure_model_config\(model_cfg, args\)$", text, flags=re.M)


def test_tool_names_the_supported_tags_when_no_patch_fits(tmp_path):
    for rel in FILES:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_text("# not Megatron-LM\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([sys.executable, TOOL, "check", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "no megatron_spava patch fits" in out.stderr
    assert "core_v0.16.1" in out.stderr and "core_v0.19.0" in out.stderr
    os.remove(tmp_path / "gpt_builders.py")
    out = subprocess.run([sys.executable, TOOL, "check", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "missing gpt_builders.py" in out.stderr


@pytest.mark.parametrize("var", sorted(CHECKOUT_VARS))
def test_patch_applies_to_a_megatron_lm_checkout(tmp_path, var):
    checkout = os.environ.get(var)
    if not checkout:
        pytest.skip(f"set {var} to a Megatron-LM checkout for {CHECKOUT_VARS[var]}")
    expected = CHECKOUT_VARS[var]
    check = subprocess.run([sys.executable, TOOL, "check", checkout], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert expected in check.stdout, check.stdout
    # apply to a copy of the three files, never to the user's checkout
    for rel in FILES:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(checkout, rel), tmp_path / rel)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for action, wanted in (("apply", "applied"), ("status", "applied"),
                           ("revert", "reverted"), ("status", "not applied")):
        out = subprocess.run([sys.executable, TOOL, action, str(tmp_path)], capture_output=True,
                             text=True)
        assert out.returncode == 0 and wanted in out.stdout and expected in out.stdout, \
            (action, out.stdout, out.stderr)
    subprocess.run([sys.executable, TOOL, "apply", str(tmp_path)], check=True, capture_output=True)
    for rel in FILES:
        py_compile.compile(str(tmp_path / rel), doraise=True)
    assert "--context-parallel-algo" in (tmp_path / FILES[0]).read_text()
    assert "megatron_spava.megatron_lm import layer_spec" in (tmp_path / "gpt_builders.py").read_text()


def _core_v0_19_builder_rank(checkout):
    """One gloo rank: core_v0.19's GPTModelConfig path (what its pretrain_gpt builds the
    model from) after configure_model_config, built by the builder the config names."""
    sys.path.insert(0, checkout)
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.training.models.gpt import GPTModelConfig  # from the checkout
    from megatron_spava import megatron_lm
    from megatron_spava.modules import SpavaCoreAttention, SpavaRotaryEmbedding
    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1)
    initialize_rng_tracker(inference_rng_tracker=True)
    try:
        model_cfg = GPTModelConfig(transformer=_megatron_lm_config(transformer_impl="local"),
                                   vocab_size=64, seq_length=64, position_embedding_type="rope")
        assert megatron_lm.configure_model_config(model_cfg, _megatron_lm_args()) is model_cfg
        builder = model_cfg.get_builder_cls()(model_cfg)
        model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups())
        cores = {type(layer.self_attention.core_attention) for layer in model.decoder.layers}
        return dict(builder=type(builder).__name__, cores=cores == {SpavaCoreAttention},
                    rope=type(model.rotary_pos_emb) is SpavaRotaryEmbedding)
    finally:
        ps.destroy_model_parallel()


def test_core_v0_19_model_config_hook_builds_spava_layers_and_rope():
    """core_v0.19's pretrain_gpt builds the model from a GPTModelConfig, not through
    gpt_builders: configure_model_config must reach that path (a launch it misses would run
    Megatron's own attention and match the no-CP loss trivially)."""
    checkout = os.environ.get("MEGATRON_LM_019_PATH")
    if not checkout:
        pytest.skip("set MEGATRON_LM_019_PATH to a Megatron-LM core_v0.19.0 checkout")
    probe = subprocess.run([sys.executable, "-c", "import megatron.training.models.gpt"], cwd=checkout,
                           env={**os.environ, "PYTHONPATH": checkout}, capture_output=True, text=True)
    if probe.returncode:
        pytest.skip("core_v0.19.0's megatron.training does not import with the installed megatron-core "
                    "(it needs 0.19.x): " + probe.stderr.strip().splitlines()[-1][:200])
    from megatron_spava.testing import run_ranks
    got = run_ranks(_core_v0_19_builder_rank, 1, checkout, timeout=300)[0]
    assert got == dict(builder="SpavaGPTModelBuilder", cores=True, rope=True), got


def _megatron_lm_args(**overrides):
    """The Megatron-LM arguments the hooks read, as parse_args would produce them."""
    from megatron_spava.arguments import add_spava_args
    parser = argparse.ArgumentParser()
    parser.add_argument("--context-parallel-algo", default=None)
    add_spava_args(parser)
    args = parser.parse_args([])
    defaults = dict(context_parallel_algo="spava", tensor_model_parallel_size=1,
                    context_parallel_size=2, num_attention_heads=4, num_query_groups=2,
                    seq_length=None, spava_query_len=8)
    for key, value in {**defaults, **overrides}.items():
        setattr(args, key, value)
    return args


def _megatron_lm_config(**overrides):
    """The run's TransformerConfig, as core_transformer_config_from_args builds it; fields
    set afterwards the way a launch's flags would set them (no re-validation)."""
    from megatron_spava.models.gpt import gpt_config
    config = copy.copy(gpt_config(num_layers=2, hidden_size=32, num_attention_heads=4,
                                  num_query_groups=2, ffn_hidden_size=64, normalization="RMSNorm"))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_hooks_report_what_compare_eval_loss_requires(capsys):
    """compare_eval_loss.py fails a launch whose log lacks the hooks' lines; they must match
    what the hooks print."""
    import importlib.util
    from megatron_spava import megatron_lm
    spec = importlib.util.spec_from_file_location(
        "compare_eval_loss", os.path.join(ROOT, "examples", "megatron_lm", "compare_eval_loss.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    megatron_lm._SAID.clear()
    args = _megatron_lm_args()
    megatron_lm.layer_spec(args, False, _megatron_lm_config())
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    model = torch.nn.Module()  # the part of a GPTModel prepare_model touches
    model.rotary_pos_emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    megatron_lm.prepare_model(model, args)
    out = capsys.readouterr().out
    for what, pattern in tool.HOOK_LINES.items():
        assert re.search(pattern.format(algo="spava"), out), (what, out)
    assert "SpavaCoreAttention" in out and "SpavaRotaryEmbedding" in out


def test_compare_eval_loss_judges_each_launch_by_exit_hooks_and_losses(tmp_path, capsys):
    """finish() passes a launch only with exit 0, both losses and (for a CP algorithm) the
    hooks' lines; each missing piece fails it (a pass of every launch went unnoticed once)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "compare_eval_loss", os.path.join(ROOT, "examples", "megatron_lm", "compare_eval_loss.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    class Done:
        def __init__(self, rc):
            self.rc, self.pid = rc, 0

        def wait(self, timeout=None):
            return self.rc

    hooks = ("megatron_spava: --context-parallel-algo spava: layer spec (te) with core attention "
             "SpavaCoreAttention\nmegatron_spava: --context-parallel-algo spava: layout-aware RoPE "
             "(SpavaRotaryEmbedding)\n")
    losses = (" validation loss at iteration 0 on validation set | lm loss value: 9.117058E+00 |\n"
              " validation loss at iteration 0 on test set | lm loss value: 9.117512E+00 |\n")

    def judge(algo, rc, text):
        log = tmp_path / "run.log"
        log.write_text(text)
        return tool.finish("run", algo, Done(rc), str(log), 1)

    assert judge("spava", 0, hooks + losses) == {"validation": 9.117058, "test": 9.117512}
    assert judge("none", 0, losses) == {"validation": 9.117058, "test": 9.117512}
    assert judge("spava", 0, losses) is None            # Megatron's own attention ran
    assert judge("spava", 1, hooks + losses) is None    # the launch failed after evaluating
    assert judge("none", 1, losses) is None
    assert judge("spava", 0, hooks) is None             # no loss reported
    out = capsys.readouterr().out
    assert out.count("FAILED") == 4 and "hooks did not run" in out


def test_layer_spec_hook():
    """The hook builds megatron-core's own local spec from the config (the keywords
    Megatron-LM's _get_transformer_layer_spec passes) with only core_attention replaced."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_spava import megatron_lm
    from megatron_spava.modules import SpavaCoreAttention
    config = _megatron_lm_config()
    spec = megatron_lm.layer_spec(_megatron_lm_args(), False, config)
    assert spec.submodules.self_attention.submodules.core_attention is SpavaCoreAttention
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        assert getattr(spec.submodules, name) is getattr(stock.submodules, name)
    qk = megatron_lm.layer_spec(_megatron_lm_args(), False, _megatron_lm_config(qk_layernorm=True))
    assert qk.submodules.self_attention.submodules.q_layernorm is \
        get_gpt_layer_local_spec(qk_layernorm=True).submodules.self_attention.submodules.q_layernorm
    with pytest.raises(ValueError, match="multi-latent-attention"):
        megatron_lm.layer_spec(_megatron_lm_args(), False, _megatron_lm_config(multi_latent_attention=True))
    with pytest.raises(ValueError, match="not divisible"):
        megatron_lm.layer_spec(_megatron_lm_args(tensor_model_parallel_size=3), False, config)


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


#: pretrain_gpt.BATCH_KEYS of Megatron-LM core_v0.18-0.19 (copied: no Megatron-LM code here)
BATCH_KEYS = ["attention_mask", "cu_seqlens", "cu_seqlens_padded", "hybrid_cp_group", "labels",
              "local_cp_size", "loss_mask", "max_seqlen", "position_ids", "tokens"]


def test_get_batch_hook_takes_the_batch_keys_batch_of_core_v0_19(no_request_after):
    """core_v0.19's get_batch hands over every BATCH_KEYS key (the packing ones None) and
    returns [batch[k] for k in BATCH_KEYS]: the hook keeps every key, shards the sequence
    ones like the dict batch of core_v0.16, and refuses packed sequences."""
    from unittest import mock
    from megatron_spava import megatron_lm
    S = 300
    dense = {"tokens": torch.arange(S).expand(2, -1), "labels": torch.arange(1, S + 1).expand(2, -1),
             "loss_mask": torch.ones(2, S), "attention_mask": None,
             "position_ids": torch.arange(S).expand(2, -1)}
    batch = {key: dense.get(key) for key in BATCH_KEYS}
    args = _megatron_lm_args(spava_budget_align=1, spava_anchor_len=12)
    with mock.patch("megatron.core.parallel_state.get_context_parallel_rank", return_value=1):
        local = megatron_lm.get_batch_on_this_cp_rank_from_args(dict(batch), args)
        reference = megatron_lm.get_batch_on_this_cp_rank_from_args(dict(dense), args)
        returned = [local[key] for key in BATCH_KEYS]  # what the patched get_batch returns
        assert len(returned) == len(BATCH_KEYS)
        for key in BATCH_KEYS:
            if dense.get(key) is None:
                assert local[key] is None, key
            else:
                assert torch.equal(local[key], reference[key]) and local[key].shape[-1] < S, key
        packed = dict(batch, cu_seqlens=torch.tensor([[0, 100, S]]), max_seqlen=torch.tensor([200]))
        with pytest.raises(ValueError, match="packed sequences"):
            megatron_lm.get_batch_on_this_cp_rank_from_args(packed, args)


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
        megatron_lm.layer_spec(args, False, _megatron_lm_config())
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
        megatron_lm.layer_spec(args, False, _megatron_lm_config())


def _te_and_gpu():
    from megatron_spava.specs import te_available
    return torch.cuda.is_available() and te_available()


@pytest.mark.cuda
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_PATH"),
                    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout (core_v0.16.1 or core_v0.19.0)")
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
