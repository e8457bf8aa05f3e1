"""The Transformer Engine backend's CPU-checkable parts: --transformer-impl resolution, the
TE layer spec's arguments (megatron-core's TE spec built with TE's classes mocked, since
TE cannot be installed here), the local <-> TE state-dict key layouts, norm dtypes, dist
checkpoints without extra states, and the `megatron` algorithm's layout against
megatron-core's own get_batch_on_this_cp_rank. The GPU side is tests/test_te.py."""

import argparse
import functools
from unittest import mock

import pytest
import torch

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_spava import modules, specs


@pytest.fixture
def mocked_te(monkeypatch):
    """megatron-core's TE spec builder made callable without TE: its TE classes are the
    MagicMock placeholders megatron-core defines when TE is missing, and TE's version
    reads 2.11. Yields megatron.core.extensions.transformer_engine (the placeholders)."""
    from packaging.version import Version
    import megatron.core.utils as mcore_utils
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.extensions.transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(specs, "te_available", lambda: True)
    monkeypatch.setattr(mcore_utils, "get_te_version", lambda: Version("2.11.0"))
    for name, value in (("TESpecProvider", provider.TESpecProvider), ("TENorm", te_ext.TENorm),
                        ("TEFusedMLP", te_ext.TEFusedMLP)):
        monkeypatch.setattr(gpt_layer_specs, name, value, raising=False)
    yield te_ext


def test_te_spec_takes_the_local_kwargs(mocked_te):
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron_spava.modules import SpavaCoreAttention
    spec = specs.get_gpt_layer_spec("transformer_engine", normalization="RMSNorm", qk_layernorm=False,
                                    num_experts=None)
    core = spec.submodules.self_attention.submodules.core_attention
    assert isinstance(core, ModuleSpec) and core.module is SpavaCoreAttention
    assert core.params == {"expected_normalization": "RMSNorm"}
    # megatron-core builds it with the check (a plain partial would not build: build_module
    # takes classes and ModuleSpecs only)
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module
    from megatron_spava.models.gpt import gpt_config
    ln = gpt_config(num_layers=1, hidden_size=32, num_attention_heads=2, normalization="LayerNorm")
    with pytest.raises(ValueError, match="normalization is 'LayerNorm'"):
        build_module(core, config=ln, layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")  # raises before any process group is read
    # TE fuses both pre-norms into the next linear
    assert spec.submodules.input_layernorm is IdentityOp and spec.submodules.pre_mlp_layernorm is IdentityOp
    assert spec.submodules.self_attention.submodules.linear_qkv is mocked_te.TELayerNormColumnParallelLinear
    with pytest.raises(ValueError, match="TE layers support"):
        specs.get_gpt_layer_spec("te", normalization="BatchNorm")
    with pytest.raises(TypeError, match="unknown keyword argument.*'bogus'"):
        specs.get_gpt_layer_spec("te", bogus=1)
    with pytest.raises(TypeError, match="unknown keyword argument.*use_te_op_fuser"):
        specs.get_gpt_layer_spec("local", use_te_op_fuser=True)  # TE-only option


def test_te_spec_normalization_is_checked_against_the_config():
    from megatron_spava.models.gpt import gpt_config
    rms, ln = (gpt_config(num_layers=1, hidden_size=32, num_attention_heads=2, normalization=n)
               for n in ("RMSNorm", "LayerNorm"))
    modules.check_normalization(rms, "RMSNorm")
    modules.check_normalization(ln, None)
    with pytest.raises(ValueError, match="normalization is 'LayerNorm': TE's fused norms read"):
        modules.check_normalization(ln, "RMSNorm")


def test_megatron_lm_hook_passes_normalization_to_the_te_spec(mocked_te):
    from megatron_spava import megatron_lm
    from tests.test_megatron_lm import _megatron_lm_args, _megatron_lm_config
    spec = megatron_lm.layer_spec(_megatron_lm_args(), True, _megatron_lm_config())
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.params == {"expected_normalization": "RMSNorm"}


def _module_paths(spec, cls, prefix=""):
    """Dotted submodule paths of a layer-spec tree whose module is `cls` (entries are
    ModuleSpecs, classes or builder partials: compat.spec_module_and_submodules)."""
    from megatron_spava.compat import spec_module_and_submodules
    found = []
    _, subs = spec_module_and_submodules(spec)
    for name in getattr(subs, "__dataclass_fields__", {}):
        value = getattr(subs, name)
        module, children = spec_module_and_submodules(value)
        path = prefix + name
        if value is cls or module is cls:  # TE's placeholders without TE are not classes
            found.append(path)
        if children is not None:
            found += _module_paths(value, cls, path + ".")
    return found


def test_key_layouts_follow_megatron_core_specs(mocked_te):
    """Our TE names of the norms are exactly the submodules of megatron-core's TE spec that
    fuse a norm into a linear, and the local names are the local spec's norms."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.identity_op import IdentityOp
    te_spec = get_gpt_layer_with_transformer_engine_spec()
    fused = _module_paths(te_spec, mocked_te.TELayerNormColumnParallelLinear)
    pairs = specs._norm_key_map()
    assert sorted(te.rsplit(".", 1)[0] for _, te in pairs) == sorted(fused)
    assert all(te.endswith(".layer_norm_") for _, te in pairs)  # TE LayerNormLinear's layer_norm_weight
    local_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    for local, _ in pairs:
        module = getattr(local_spec.submodules, local.rstrip("."))
        assert module is not IdentityOp and getattr(te_spec.submodules, local.rstrip(".")) is IdentityOp


def _gpt(dtype=torch.float32, **overrides):
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron_spava.models.gpt import build_gpt_model, gpt_config
    config = gpt_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, dtype=dtype, **overrides)
    return build_gpt_model(config, vocab_size=64, max_sequence_length=64)


@pytest.fixture
def parallel_state():
    from megatron_spava import cpu_compat
    from megatron_spava.models.common.checkpoint_io import single_process_parallel_state
    cpu_compat.apply()
    with single_process_parallel_state():
        yield


def test_state_dict_local_to_te_and_back_is_bit_exact(parallel_state):
    model = _gpt(add_qkv_bias=True)
    state = model.state_dict()
    te = specs.state_dict_for_backend(state, "te")
    assert not any(specs.is_extra_state(k) for k in te)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    assert specs.backend_of_keys(te) == "te" and specs.backend_of_keys(state) == "local"
    back = specs.state_dict_for_backend(te, "local")
    weights = {k: v for k, v in state.items() if not specs.is_extra_state(k)}
    assert list(back) == list(weights)
    assert all(back[k] is weights[k] for k in weights)  # a renaming: the very same tensors
    fresh = _gpt(add_qkv_bias=True)
    for p in fresh.parameters():
        p.data.zero_()
    specs.load_state_dict_any_layout(fresh, te)  # a TE-layout state dict into a local model
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values())
               if isinstance(a, torch.Tensor))
    with pytest.raises(ValueError, match="does not fit"):
        specs.load_state_dict_any_layout(fresh, {k: v for k, v in te.items() if "fc2" not in k})


def test_norm_weights_in_the_model_dtype(parallel_state):
    model = _gpt(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary_pos_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from megatron_spava.models.qwen2_5_vl.tiny import tiny_hf_config
    initialize_rng_tracker(inference_rng_tracker=True)
    qwen = Qwen25VLModel(Qwen25VLConfig.from_hf(tiny_hf_config()), dtype=torch.bfloat16)
    assert {p.dtype for p in qwen.parameters()} == {torch.bfloat16}


def test_qwen_hf_mapping_handles_both_layouts(parallel_state):
    """HF -> megatron names land on a TE model's fused-norm keys, and megatron -> HF gives
    the same HF tensors from either layout."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from megatron_spava.models.common.checkpoint_io import to_model_layout
    from megatron_spava.models.qwen2_5_vl.checkpoint import megatron_to_hf
    from megatron_spava.models.qwen2_5_vl.tiny import tiny_hf_config
    initialize_rng_tracker(inference_rng_tracker=True)
    cfg = Qwen25VLConfig.from_hf(tiny_hf_config())
    params = dict(Qwen25VLModel(cfg).named_parameters())
    te_names = {specs.local_to_te_key(n) for n in params}
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_names
    for name, tensor in params.items():
        te_name = to_model_layout(name, te_names)
        assert te_name in te_names and to_model_layout(name, set(params)) == name
        ours, theirs = megatron_to_hf(te_name, tensor, cfg), megatron_to_hf(name, tensor, cfg)
        assert [k for k, _ in ours] == [k for k, _ in theirs]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))


def _save_without_extra_state(ckpt):
    from megatron.core import dist_checkpointing
    from megatron_spava.models.common.checkpoint_io import load_dist_into_model, single_process_parallel_state
    with single_process_parallel_state():
        model = _gpt()
        sharded = {k: v for k, v in model.sharded_state_dict().items() if not specs.is_extra_state(k)}
        dist_checkpointing.save(sharded, ckpt)
        fresh = _gpt()
        for p in fresh.parameters():
            p.data.zero_()
        load_dist_into_model(fresh, ckpt)  # requests no _extra_state: loads
        return all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_dist_checkpoint_without_extra_states_loads(tmp_path):
    """A checkpoint missing some `_extra_state` objects (as one written by the other
    backend may be) loads; every weight is still required."""
    from megatron_spava.testing import run_ranks
    assert run_ranks(_save_without_extra_state, 1, str(tmp_path), timeout=120) == [True]


# ---- --transformer-impl --------------------------------------------------------------

def test_transformer_impl_resolution(monkeypatch, capsys):
    assert specs.resolve_transformer_impl(None, "cpu") == "local"
    assert "transformer impl: local (default" in capsys.readouterr().out
    assert specs.resolve_transformer_impl("local", "cuda", verbose=False) == "local"
    monkeypatch.setattr(specs, "te_available", lambda: False)
    assert specs.resolve_transformer_impl(None, "cuda", verbose=False) == "local"
    with pytest.raises(ValueError, match="does not import here"):
        specs.resolve_transformer_impl("transformer_engine", "cuda", verbose=False)
    monkeypatch.setattr(specs, "te_available", lambda: True)
    assert specs.resolve_transformer_impl(None, "cuda", verbose=False) == "transformer_engine"
    assert specs.resolve_transformer_impl(None, "cpu", verbose=False) == "local"
    with pytest.raises(ValueError, match="runs on CUDA only"):
        specs.resolve_transformer_impl("transformer_engine", torch.device("cpu"), verbose=False)
    assert specs.backend_for_impl("transformer_engine") == "te"
    with pytest.raises(ValueError, match="unknown layer-spec backend"):
        specs.backend_for_impl("apex")


def test_transformer_impl_args_are_added_once():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cp-comm-type", nargs="+", default=["p2p"])  # as Megatron-LM has it
    specs.add_transformer_impl_arg(parser)
    specs.add_transformer_impl_arg(parser)
    args = parser.parse_args(["--transformer-impl", "local"])
    assert args.transformer_impl == "local" and args.cp_comm_type == ["p2p"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--transformer-impl", "te"])


def _load(path):
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(root, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("program", ["video_qa", "examples/gpt_prefill.py", "bench_prefill", "convert"])
def test_every_model_building_program_has_the_flag(program, capsys):
    if program == "video_qa":
        from megatron_spava.video_qa import build_parser
        run = lambda: build_parser().parse_args(["--help"])  # noqa: E731
    elif program == "convert":
        from megatron_spava.convert import main
        run = lambda: main(["hf-to-megatron", "--help"])  # noqa: E731
    elif program == "bench_prefill":
        from megatron_spava.perf.bench_prefill import parse_args
        run = lambda: parse_args(["--help"])  # noqa: E731
    else:
        run = lambda: _load(program).parse_args(["--help"])  # noqa: E731
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 0
    assert "--transformer-impl {local,transformer_engine}" in capsys.readouterr().out


# ---- the `megatron` algorithm's layout -------------------------------------------------

@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_megatron_layout_is_megatron_cores_sharding(cp):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from megatron_spava.algos.megatron import MegatronLayout
    from megatron_spava.compat import stock_get_batch_on_this_cp_rank
    from megatron_spava.batch import get_batch_on_this_cp_rank
    from megatron_spava.inference import cache_rows
    S, lq = 24 * cp, 5
    layout = MegatronLayout.plan(context_len=S - lq, query_len=lq, cp_size=cp)
    tokens = torch.arange(S).expand(2, -1)
    covered = []
    for rank in range(cp):
        # megatron-core's own sharding, on a real (fake-backend) CP group of size cp
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=cp)
        try:
            theirs = stock_get_batch_on_this_cp_rank({"tokens": tokens.clone()}, dist.group.WORLD)["tokens"]
        finally:
            dist.destroy_process_group()
        idx = layout.local_indices(rank)
        assert torch.equal(theirs[0], idx) and layout.local_len(rank) == S // cp
        ours = get_batch_on_this_cp_rank({"tokens": tokens, "loss_mask": torch.ones(2, S)}, layout, rank)
        assert torch.equal(ours["tokens"], theirs) and bool(ours["loss_mask"].all())
        assert layout.owned_rows(rank).all() and torch.equal(cache_rows(layout, rank), layout.cache_rows(rank))
        covered.append(idx)
    assert torch.equal(torch.cat(covered).sort().values, torch.arange(S))


def test_megatron_layout_errors_and_te_requirement():
    from megatron_spava.algos.megatron import MegatronLayout, core_attention_for, megatron_core_attention
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size = 4"):
        MegatronLayout.plan(context_len=10, query_len=1, cp_size=2)
    with pytest.raises(ValueError, match="cp_size must be an integer >= 1"):
        MegatronLayout.plan(context_len=10, query_len=2, cp_size=0)
    assert MegatronLayout.plan(context_len=9, query_len=2, cp_size=1).local_len(0) == 11
    with pytest.raises(ValueError, match="out of range"):
        MegatronLayout.plan(context_len=10, query_len=2, cp_size=2).local_indices(2)
    with pytest.raises(ValueError, match="--cp-comm-type must be one of"):
        megatron_core_attention("ring")
    assert core_attention_for("spava", "p2p") is None
    if not specs.te_available():
        with pytest.raises(ImportError, match="transformer_engine"):
            core_attention_for("megatron", "p2p")


def test_needle_ranks_resolve_the_layers_as_the_launcher_does():
    """The evaluation's ranks parse the flags again and run `resolve_layers` (the launcher's
    check_args does too), so both build the layers and fusions the flags resolve to."""
    from megatron_spava.tasks import evaluate
    args = evaluate.build_parser().parse_args(["--tokens", "1024"])
    evaluate.resolve_layers(args)
    assert (args.transformer_impl, args.lm_fusions) == ("local", "none")
    args = evaluate.build_parser().parse_args(["--lm-fusions", "te-ops"])
    with pytest.raises(ValueError, match="--lm-fusions: .*needs Transformer Engine layers"):
        evaluate.resolve_layers(args)


def test_lm_fusions_follow_megatron_lms_defaults_on_te_layers_only(mocked_te):
    """'megatron' (the TE default) turns on the fusions Megatron-LM turns on by default;
    local layers run none of them; 'te-ops' adds TE's fused MLP to the layer spec; a fused
    choice on local layers or an unknown one is one clear error."""
    assert specs.resolve_lm_fusions(None, "local") == "none"
    assert specs.resolve_lm_fusions(None, "transformer_engine") == "megatron"
    assert specs.resolve_lm_fusions(None, "transformer_engine", fp8=True) == "te-ops"  # FP8's default
    assert specs.resolve_lm_fusions("megatron", "transformer_engine", fp8=True) == "megatron"
    assert specs.resolve_lm_fusions(None, "local", fp8=True) == "none"
    fields = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion")
    config, spec = specs.lm_fusion_settings(None, "local")
    assert config == dict.fromkeys(fields, False) and spec == {}
    config, spec = specs.lm_fusion_settings(None, "te")
    assert config == dict.fromkeys(fields, True) and spec == {}
    config, spec = specs.lm_fusion_settings("te-ops", "te")
    assert config == dict.fromkeys(fields, True) and spec == {"use_te_op_fuser": True}
    if mocked_te.TEFusedMLP is not None:  # megatron-core 0.19 has no placeholder for it without TE
        mlp = specs.get_gpt_layer_spec("te", **spec).submodules.mlp
        assert mlp.module is mocked_te.TEFusedMLP
        assert specs.get_gpt_layer_spec("te").submodules.mlp.module is not mocked_te.TEFusedMLP
    with pytest.raises(ValueError, match="needs Transformer Engine layers"):
        specs.lm_fusion_settings("megatron", "local")
    with pytest.raises(ValueError, match="choose one of"):
        specs.resolve_lm_fusions("all", "te")


def test_bench_prefill_refuses_fusions_on_local_layers(capsys):
    from megatron_spava.perf import bench_prefill
    with pytest.raises(SystemExit):
        bench_prefill.main(["--device", "cpu", "--transformer-impl", "local", "--lm-fusions", "megatron",
                            "--tokens", "1024"])
    assert "--lm-fusions: lm_fusions='megatron' needs Transformer Engine layers" in capsys.readouterr().err
