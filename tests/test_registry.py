"""The algorithm registry and the layout interface: a toy algorithm registered from this
file alone runs through the attention dispatch, the batch sharding, megatron-core's
GPTModel, the distributed KV cache, the roofline and the scaling model; presets never
override explicit settings; CLI and benchmark read the registry."""

import argparse
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig
from megatron_spava.algos import (Algorithm, Layout, ablation_chain, benchmark_variants,
                                  config_for, cp_attn_func, get, names, parse_variant,
                                  plan_layout, registered, variant_config)
from megatron_spava.algos.base import check_lengths, split_len
from megatron_spava.ops.attention import attend, merge_partials
from megatron_spava.testing import run_ranks
from megatron_spava.testing.reference import full_attention, random_qkv


# ---- a toy algorithm: exact attention over an all-gathered sequence ------------------------
# This is all a new algorithm needs: a layout, an attention function, its cost (what the
# roofline and the scaling model charge), one registry entry.

@dataclass(frozen=True)
class GatheredLayout(Layout):
    """Rank r holds the r-th of W contiguous chunks of the prompt."""

    chunk_len: int

    @classmethod
    def plan(cls, *, context_len, query_len, cp_size, config=None):
        config = check_lengths("gathered layout", context_len, query_len, cp_size, config)
        chunk = split_len(context_len + query_len, cp_size, who="gathered layout",
                          subject="prompt", unit="chunk", hint="use fewer ranks")
        return cls(context_len, query_len, cp_size, chunk, config=config)

    def local_indices(self, rank):
        self.check_rank(rank)
        lo = rank * self.chunk_len
        return torch.arange(lo, min(lo + self.chunk_len, self.total_len))


def gathered_attn_func(q, k, v, *, layout, cp_group=None, softmax_scale=None):
    """All-gather every rank's K|V; attend causally to the own chunk, fully to earlier ones."""
    rank, world = (dist.get_rank(cp_group), dist.get_world_size(cp_group)) if cp_group else (0, 1)
    d = k.shape[-1]
    mine = k.new_zeros(layout.chunk_len, *k.shape[1:-1], 2 * d)
    mine[: k.shape[0]] = torch.cat([k, v], dim=-1)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=cp_group) if world > 1 else every.__setitem__(0, mine)
    parts = [attend(q, k, v, causal=True, scale=softmax_scale)]
    if rank:
        before = torch.cat(every[:rank])  # earlier chunks are all full
        parts.append(attend(q, before[..., :d], before[..., d:], scale=softmax_scale))
    return merge_partials(parts)[0].to(q.dtype)


def gathered_cost(req):
    """What one layer of the toy costs each rank (the roofline and the scaling model read it
    through the registry): its K|V chunk all-gathered, then a causal call over its own chunk
    and a full one to every earlier chunk; the dense work of its local tokens."""
    from megatron_spava.perf.work import Call, Comm, LayerWork, Op, dense_split
    layout = GatheredLayout.plan(context_len=req.context, query_len=req.query, cp_size=req.cp)
    shape, hf, pre = req.shape, 1.0 / req.tp, dense_split(req.shape)
    slot = int(layout.chunk_len * shape.kv_heads / req.tp * 2 * shape.head_dim * shape.act_bytes)
    ops, local = [], []
    for r in range(req.cp):
        lo = r * layout.chunk_len
        rows = min(lo + layout.chunk_len, layout.total_len) - lo
        head = [Op(comm=req.weights_of(r))] if req.weights is not None else []
        calls = [Call(rows, rows, True, hf)] + ([Call(rows, lo, False, hf)] if lo else [])
        ops.append(head + [Op(dense=pre * rows, gemm_rows=rows),
                           Op(comm=Comm("all_gather", list(req.group), slot, req.group[r], name="kv")),
                           Op(wait=len(head)), Op(calls=calls),
                           Op(dense=(1 - pre) * rows, gemm_rows=rows)])
        local.append(rows)
    return LayerWork(layout, tuple(local), ops)


TOY = Algorithm("gathered", "toy: exact attention over an all-gathered sequence",
                GatheredLayout, attn_func=gathered_attn_func, exact=True, cost=gathered_cost)


def _toy_attention_rank(n, lq):
    rank, world = dist.get_rank(), dist.get_world_size()
    with registered(TOY):
        layout = plan_layout("gathered", context_len=n, query_len=lq, cp_size=world)
        q, k, v = random_qkv(n + lq, 2, 4, 2, 16, seed=3)
        idx = layout.local_indices(rank)
        out = cp_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    assert "gathered" not in names()  # unregistered on leaving the block
    return idx, out


def test_toy_algorithm_attention_is_exact():
    results = run_ranks(_toy_attention_rank, 3, 100, 5, timeout=60)
    q, k, v = random_qkv(105, 2, 4, 2, 16, seed=3)
    ref = full_attention(q, k, v)
    assert torch.equal(torch.cat([idx for idx, _ in results]), torch.arange(105))
    for idx, out in results:
        torch.testing.assert_close(out.double(), ref[idx], rtol=1e-5, atol=1e-5)


def _toy_gpt_rank(algo, cp):
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import register
    from megatron_spava.batch import get_batch_on_this_cp_rank
    from megatron_spava.models.gpt import build_gpt_model, cp_prefill, gpt_config

    register(TOY)  # this process only
    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=cp)
    config = gpt_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, context_parallel=cp)
    model = build_gpt_model(config, vocab_size=128, max_sequence_length=1024, algo=algo)
    tokens = torch.randint(0, 128, (2, 203), generator=torch.Generator().manual_seed(0))
    if algo is None:
        with torch.no_grad():
            return torch.arange(203), model(tokens, torch.arange(203).expand(2, -1), None), None
    layout = plan_layout(algo, context_len=195, query_len=8, cp_size=cp)
    logits, idx = cp_prefill(model, tokens, layout)
    rank = ps.get_context_parallel_rank()
    local = get_batch_on_this_cp_rank({"tokens": tokens, "loss_mask": torch.ones(2, 203)},
                                      layout, rank)
    return idx, logits, local["loss_mask"]


def test_toy_algorithm_runs_through_gpt_model_and_batch_sharding():
    (_, ref, _), = run_ranks(_toy_gpt_rank, 1, None, 1, timeout=120)
    results = run_ranks(_toy_gpt_rank, 2, "gathered", 2, timeout=180)
    counted = torch.zeros(203)
    for idx, logits, loss_mask in results:
        torch.testing.assert_close(logits, ref[:, idx], rtol=1e-5, atol=1e-5)
        counted.index_add_(0, idx, loss_mask[0])
    assert torch.equal(counted, torch.ones(203))  # every token's loss counted once



def _toy_two_pass_rank(n, lq):
    """The toy's prefill of the context alone into the distributed KV cache, then the query
    (replicated) over the cache (`inference.decode_attn_func`), on a 2-layer GPTModel."""
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import register
    from megatron_spava.batch import get_batch_on_this_cp_rank
    from megatron_spava.context import cp_request
    from megatron_spava.inference import DistributedKVCache
    from megatron_spava.models.gpt import build_gpt_model, gpt_config

    register(TOY)  # this process only
    cp = dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=cp)
    config = gpt_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, context_parallel=cp)
    model = build_gpt_model(config, vocab_size=128, max_sequence_length=1024, algo="gathered")
    tokens = torch.randint(0, 128, (2, n + lq), generator=torch.Generator().manual_seed(0))
    rank = ps.get_context_parallel_rank()
    layout = plan_layout("gathered", context_len=n, query_len=0, cp_size=cp)
    cache = DistributedKVCache(layout, rank, cp, max_new_tokens=lq)
    positions = torch.arange(n + lq).expand_as(tokens)
    local = get_batch_on_this_cp_rank({"tokens": tokens[:, :n], "position_ids": positions[:, :n]},
                                      layout, rank)
    with torch.no_grad():
        with cp_request(layout, positions=local["rope_positions"], cache=cache):
            context = model(local["tokens"], local["position_ids"], None)
        cache.begin_tokens(lq)
        with cp_request(layout, positions=torch.arange(n, n + lq), cache=cache, decode=True):
            query = model(tokens[:, n:], positions[:, n:], None)
    return layout.local_indices(rank), context, query


def test_toy_algorithm_fills_the_kv_cache_and_the_query_reads_it():
    """Context through the toy into the distributed KV cache on 3 ranks, then the query over
    the cache: every row's logits equal megatron-core's stock model (causal mask, 1 rank)."""
    (_, ref, _), = run_ranks(_toy_gpt_rank, 1, None, 1, timeout=120)  # 195 + 8 tokens
    results = run_ranks(_toy_two_pass_rank, 3, 195, 8, timeout=180)
    assert torch.equal(torch.cat([idx for idx, _, _ in results]), torch.arange(195))
    for idx, context, query in results:
        torch.testing.assert_close(context, ref[:, idx], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(query, ref[:, 195:], rtol=1e-5, atol=1e-5)


def _toy_flops_rank():
    """The roofline test's count (tests/test_roofline.py: FLOPs counted by PyTorch inside
    `generate` against the floor's) for the toy, registered in this process only."""
    from megatron_spava.algos import register
    from test_roofline import _count
    register(TOY)
    return _count("qwen2_5_vl", ["gathered"])


@pytest.mark.slow
def test_toy_algorithm_roofline_is_the_flops_its_prefill_executes():
    """The toy's cost (its registry entry, nothing else) is what the roofline charges; the
    FLOPs a real 2-rank prefill of a tiny Qwen2.5-VL executes under it equal it per rank and
    part, and the scaling model simulates it; without a cost, both refuse it by name."""
    from megatron_spava.perf.layer import layer_ops
    from megatron_spava.perf.simulate import predict
    from megatron_spava.perf.work import Shape
    per_rank = run_ranks(_toy_flops_rank, 2, timeout=300)
    for r in per_rank:
        got, want = r["gathered"]["counted"], r["gathered"]["floor"]
        for part in ("vision", "dense", "attention"):
            assert want[part] > 0 and got[part] == pytest.approx(want[part], rel=1e-9), (r["rank"], part, got, want)
    assert per_rank[0]["gathered"]["busiest"] == pytest.approx(max(r["gathered"]["total"] for r in per_rank))
    with registered(TOY):
        plan, ops = layer_ops("gathered", 65536, 4, 1, Shape())
        assert sum(plan.local_tokens) == plan.tokens and len(ops) == 4
        predicted = predict("gathered", 65536, 4, shape=Shape())
        assert predicted["local_tokens"] == max(plan.local_tokens) and predicted["ttft"] > predicted["vision"] > 0
    from dataclasses import replace
    with registered(replace(TOY, name="costless", cost=None)):
        with pytest.raises(ValueError, match="'costless' has no cost model"):
            layer_ops("costless", 65536, 4, 1, Shape())
    with pytest.raises(ValueError, match="unknown context-parallel algorithm 'gathered'"):
        layer_ops("gathered", 65536, 4, 1, Shape())


def test_layout_defaults_follow_local_indices():
    """The base class's owned_rows (lowest holding rank owns a token) agrees with Spava's
    own rule, and its cache_rows hold every token exactly once."""
    spava = plan_layout("spava", context_len=500, query_len=7, cp_size=3,
                        config=SpavaConfig(budget_align=1, anchor_len=20))
    toy = GatheredLayout.plan(context_len=500, query_len=7, cp_size=3)
    for rank in range(3):
        assert torch.equal(Layout.owned_rows(spava, rank), spava.owned_rows(rank))
    held = torch.cat([toy.local_indices(r)[toy.cache_rows(r)] for r in range(3)])
    assert torch.equal(held.sort().values, torch.arange(507))
    with pytest.raises(ValueError, match="out of range"):
        toy.local_indices(3)
    with pytest.raises(TypeError):
        Layout(10, 1, 1)  # abstract


# ---- presets ------------------------------------------------------------------------------

def test_apb_doubles_an_explicit_passing_len_and_the_default():
    free = dict(budget_align=1, anchor_len=30)
    explicit = SpavaConfig(passing_len=12, **free)
    for cfg, spava_budget in ((explicit, 12), (SpavaConfig(passing_divisor=30, **free), 900 // 30)):
        apb = plan_layout("apb", context_len=900, query_len=4, cp_size=3, config=cfg)
        spava = plan_layout("spava", context_len=900, query_len=4, cp_size=3, config=cfg)
        assert spava.passing_len == spava_budget and apb.passing_len == 2 * spava_budget
        assert (apb.config.zigzag, apb.config.overlap) == (False, False)
    assert config_for("apb", SpavaConfig(passing_scale=3)).passing_scale == 6


@pytest.mark.parametrize("setting", [dict(anchor_len=256), dict(passing_len=128),
                                     dict(passing_scale=2)])
def test_star_refuses_an_explicit_budget_it_would_ignore(setting):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"'star'.*conflicts with {name}="):
        plan_layout("star", context_len=4000, query_len=4, cp_size=2, config=SpavaConfig(**setting))


def test_star_accepts_what_it_does_not_override():
    cfg = SpavaConfig(anchor_len="block", shard_anchor=False, kernel="math", overlap=False)
    star = config_for("star", cfg)
    assert (star.anchor_len, star.passing, star.zigzag) == ("block", False, False)
    assert (star.shard_anchor, star.kernel, star.overlap) == (False, "math", False)  # kept


def test_presets_conflict_raises_through_the_cli_validation():
    from megatron_spava.arguments import add_spava_args, validate_spava_args
    args = add_spava_args(argparse.ArgumentParser()).parse_args(
        ["--context-parallel-algo", "star", "--spava-anchor-len", "256"])
    with pytest.raises(ValueError, match="--context-parallel-algo star: .*conflicts with anchor_len=256"):
        validate_spava_args(args)


# ---- registry, CLI, benchmark names -------------------------------------------------------

def test_registry_entries_and_errors():
    assert {"full", "ring", "star", "apb", "spava"} <= set(names())
    assert get("ring").exact and not get("spava").exact
    with pytest.raises(ValueError, match="unknown context-parallel algorithm 'ulysses'"):
        get("ulysses")
    with pytest.raises(ValueError, match="exactly one of attn_func"):
        Algorithm("bad", "x", GatheredLayout)
    with pytest.raises(ValueError, match="lowercase"):
        Algorithm("Bad-Name", "x", GatheredLayout, attn_func=gathered_attn_func)
    with pytest.raises(ValueError, match="Layout subclass"):
        Algorithm("bad", "x", dict, attn_func=gathered_attn_func)
    with registered(TOY), pytest.raises(ValueError, match="already registered"):
        from megatron_spava.algos import register
        register(Algorithm("gathered", "again", GatheredLayout, attn_func=gathered_attn_func))


def test_an_unavailable_module_is_reported_not_listed():
    from megatron_spava.algos import register_module, unregister
    register_module("nosuch", "megatron_spava.algos.nosuch")
    try:
        assert "nosuch" not in names()
        with pytest.raises(ValueError, match="'nosuch' is not available here: .*does not import"):
            get("nosuch")
    finally:
        unregister("nosuch")


def test_register_module_contract(tmp_path, monkeypatch):
    """The contract of an optional algorithm module (Megatron's own CP): it defines
    ALGORITHM and may import any part of megatron_spava; a missing dependency makes it
    unavailable with the reason, a broken import of our own code is raised."""
    from megatron_spava.algos import register_module, unregister
    (tmp_path / "optional_ok.py").write_text(
        "from megatron_spava.modules import SpavaCoreAttention\n"
        "from megatron_spava.algos import Algorithm, SpavaLayout\n"
        "ALGORITHM = Algorithm('optional_ok', 'x', SpavaLayout, core_attention=SpavaCoreAttention)\n")
    (tmp_path / "optional_missing.py").write_text("import transformer_engine_that_is_not_here\n")
    (tmp_path / "optional_broken.py").write_text("from megatron_spava.no_such_module import x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        register_module("optional_ok", "optional_ok")
        register_module("optional_missing", "optional_missing")
        assert "optional_ok" in names() and "optional_missing" not in names()
        with pytest.raises(ValueError, match="not available here: .*transformer_engine_that_is_not_here"):
            get("optional_missing")
        register_module("optional_broken", "optional_broken")
        with pytest.raises(ImportError, match="megatron_spava.no_such_module"):
            names()
    finally:
        for name in ("optional_ok", "optional_missing", "optional_broken"):
            unregister(name)


def test_module_algorithm_is_built_by_the_spec_and_refused_by_cp_attn_func():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron_spava.specs import get_gpt_layer_spec
    own = Algorithm("own_module", "its own core attention", GatheredLayout,
                    core_attention=DotProductAttention)
    with registered(own):
        spec = get_gpt_layer_spec("local", algo="own_module", normalization="RMSNorm")
        assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention
        layout = plan_layout("own_module", context_len=10, query_len=2, cp_size=1)
        q = torch.zeros(12, 1, 2, 8)
        with pytest.raises(ValueError, match="runs in its own core-attention module"):
            cp_attn_func(q, q, q, layout=layout)


def test_cli_choices_help_and_switch_flags_come_from_the_registry():
    from megatron_spava.arguments import add_spava_args, spava_config_from_args
    from megatron_spava.config import SWITCHES
    with registered(TOY):
        parser = add_spava_args(argparse.ArgumentParser())
        assert "gathered" in parser.format_help()
        assert parser.parse_args(["--context-parallel-algo", "gathered"]).context_parallel_algo == "gathered"
    # Megatron-LM's own (patched) option gets the registry's choices instead of a second one
    mlm = argparse.ArgumentParser()
    mlm.add_argument("--context-parallel-algo", default=None)
    add_spava_args(mlm)
    assert list(mlm._option_string_actions["--context-parallel-algo"].choices) == list(names())
    flags = [f"--spava-no-{s.replace('_', '-')}" for s in SWITCHES]
    cfg = spava_config_from_args(add_spava_args(argparse.ArgumentParser()).parse_args(flags))
    assert not any(getattr(cfg, s) for s in SWITCHES)


def test_benchmark_variants_parse_into_switches():
    assert parse_variant("spava") == ("spava", {})
    assert parse_variant("spava-no-overlap-no-fuse-query") == (
        "spava", {"overlap": False, "fuse_query": False})
    algo, cfg = variant_config("apb-no-frame-parallel")
    assert algo == "apb" and cfg.frame_parallel is False
    chain = ablation_chain()
    assert chain[0] == "spava-no-overlap" and len(chain) == 5
    assert parse_variant(chain[-1])[1] == {s: False for s in (
        "overlap", "shard_anchor", "fuse_query", "zigzag", "frame_parallel")}
    assert {"full", "ring", "star", "apb", "spava", "spava-no-fuse-query",
            "spava-no-frame-parallel", "spava-selection-mean"} <= set(benchmark_variants())
    assert "spava-selection-lse" not in benchmark_variants()  # the default is plain "spava"
    assert parse_variant("spava-selection-mean-no-overlap") == (
        "spava", {"selection": "mean", "overlap": False})
    assert variant_config("apb-selection-mean")[1].selection == "mean"
    for bad, match in (("spava-no-speed", "unknown switch 'speed'"),
                       ("spava-selection-best", "unknown selection score 'best'"),
                       ("ulysses-no-overlap", "unknown context-parallel algorithm")):
        with pytest.raises(ValueError, match=match):
            parse_variant(bad)


def test_benchmark_and_fit_read_one_rank_options_and_prompt_multiple_from_the_entry():
    """What the benchmark (tools/bench_prefill.py, tools/tp_cp_check.py) and the fit decide per
    algorithm comes from its registry entry, not its name: a toy that runs on one rank is run
    apart at CP 1 like `full`; a toy with options has `<name>-<option>` variants, each its own
    model, the default ones in the default list, and pads every prompt to its multiple of CP."""
    from dataclasses import replace
    from megatron_spava.algos.registry import options, prompt_multiple, runs_on_one_rank, split_option
    from megatron_spava.perf import bench_prefill as bp
    assert runs_on_one_rank("full") and not runs_on_one_rank("ring") and not runs_on_one_rank("spava-no-zigzag")
    # Megatron's options are known where Transformer Engine does not import (its module's OPTIONS)
    assert options()["megatron"] == ("p2p", "a2a", "all_gather", "a2a+p2p")
    assert bp.algo_and_config("megatron-all_gather")[0] == "megatron" and prompt_multiple(["ring", "megatron-a2a"]) == 2
    with registered(replace(TOY, one_rank=True)):
        assert bp.one_rank("gathered") and bp.one_rank("gathered-no-overlap") and "gathered" in bp._default_algos()
    with registered(TOY):
        assert not bp.one_rank("gathered") and bp.variant_option("gathered") is None
        assert prompt_multiple(["gathered", "spava"]) == 1
    with registered(replace(TOY, options=("x", "y+z"), bench_options=("x",), prompt_multiple=3)):
        assert split_option("gathered-y+z") == ("gathered", "y+z") and split_option("gathered-w") == ("gathered-w", None)
        assert bp.variant_option("gathered-x") == "x" and bp.algo_and_config("gathered-y+z")[0] == "gathered"
        assert "gathered-x" in bp._default_algos() and "gathered-y+z" not in bp._default_algos()
        assert prompt_multiple(["spava", "gathered-x"]) == 3
    assert "gathered-x" not in bp._default_algos() and split_option("gathered-x") == ("gathered-x", None)
    for bad, match in ((dict(options="xy"), "tuple of non-empty strings"), (dict(options=("a",), bench_options=("b",)),
                       "not all among its options"), (dict(prompt_multiple=0), "prompt_multiple")):
        with pytest.raises(ValueError, match=match):
            replace(TOY, **bad)
