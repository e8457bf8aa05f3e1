"""megatron-core GPTModel under TP x CP on gloo ranks, against megatron-core's stock
TP=1 x CP=1 model (its own DotProductAttention and RoPE) with the same weights."""

import argparse

import pytest
import torch

from megatron_spava import SpavaConfig
from megatron_spava.testing import run_ranks

N, LQ, BATCH, VOCAB = 300, 8, 2, 128
FULL_BUDGET = dict(budget_align=1, anchor_len=10, passing_len=N)  # passing >= block length


def _tokens(n, lq):
    return torch.randint(0, VOCAB, (BATCH, n + lq), generator=torch.Generator().manual_seed(0))


def _gpt_rank(tp, cp, algo, n, lq, cfg, num_layers):
    """One rank of a TP x CP model. Returns (local global-indices, logits [b, s_local, V])
    and this rank's (tp, cp) coordinates."""
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import plan_layout
    from megatron_spava.models.gpt import build_gpt_model, cp_prefill, gpt_config

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    config = gpt_config(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=128, tensor_parallel=tp,
                        context_parallel=cp)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=4096, algo=algo)
    tokens = _tokens(n, lq)
    if algo is None:  # megatron-core's stock model: positions 0..S-1, its own causal mask
        with torch.no_grad():
            logits = model(tokens, torch.arange(n + lq).expand(BATCH, -1), None)
        return torch.arange(n + lq), logits, (0, 0)
    config = SpavaConfig(**cfg)
    if not config.fuse_query:
        idx, logits = _two_pass_prefill(model, tokens, algo, n, lq, cp, config)
    else:
        layout = plan_layout(algo, context_len=n, query_len=lq, cp_size=cp, config=config)
        logits, idx = cp_prefill(model, tokens, layout)
    return idx, logits, (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank())


def _two_pass_prefill(model, tokens, algo, n, lq, cp, config):
    """fuse_query=False: the context alone into the distributed KV cache, then the query
    (replicated on every rank) over the cache. Returns (global indices, logits)."""
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import plan_layout
    from megatron_spava.batch import get_batch_on_this_cp_rank
    from megatron_spava.context import cp_request
    from megatron_spava.inference import DistributedKVCache
    rank = ps.get_context_parallel_rank()
    layout = plan_layout(algo, context_len=n, query_len=0, cp_size=cp, config=config)
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
    idx = torch.cat([layout.local_indices(rank), torch.arange(n, n + lq)])
    return idx, torch.cat([context, query], dim=1)


def _reference(n=N, lq=LQ, num_layers=2):
    return run_ranks(_gpt_rank, 1, 1, 1, None, n, lq, {}, num_layers, timeout=120)[0][1]


def _run(tp, cp, algo, n=N, lq=LQ, num_layers=2, **cfg):
    results = run_ranks(_gpt_rank, tp * cp, tp, cp, algo, n, lq, cfg, num_layers, timeout=180)
    by_tp = {}
    for idx, logits, (t, c) in results:  # TP ranks of one CP rank hold the same logits
        if (0, c) in by_tp:
            assert torch.equal(by_tp[(0, c)][1], logits)
        by_tp.setdefault((0, c), (idx, logits))
    return [by_tp[(0, c)] for c in range(cp)]


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("tp,cp", [(2, 2), (1, 4), (2, 1), (1, 2)])
def test_spava_full_budget_matches_stock_megatron(reference, tp, cp):
    for idx, logits in _run(tp, cp, "spava", **FULL_BUDGET):
        torch.testing.assert_close(logits, reference[:, idx], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,switches", [(1, 2, ("overlap", "shard_anchor")), (1, 2, ("zigzag",)),
                                             (1, 3, ("fuse_query",)), (2, 2, ("fuse_query",))])
def test_ablation_switches_at_full_budget_match_stock_megatron(reference, tp, cp, switches):
    """The attention ablations off keep the exactness invariant on the whole model (one at
    a time at the attention level: test_spava.py; frame_parallel is the vision encoder's:
    test_qwen2_5_vl.py). Without fuse_query the query runs in a second pass over the
    distributed KV cache."""
    covered = []
    for idx, logits in _run(tp, cp, "spava", **FULL_BUDGET, **{s: False for s in switches}):
        torch.testing.assert_close(logits, reference[:, idx], rtol=1e-5, atol=1e-5)
        covered.append(idx)
    assert set(torch.cat(covered).tolist()) == set(range(N + LQ))


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp", [(1, 2), (1, 3), (1, 4), (2, 2)])
def test_ring_matches_stock_megatron(reference, tp, cp):
    covered = []
    for idx, logits in _run(tp, cp, "ring"):
        torch.testing.assert_close(logits, reference[:, idx], rtol=1e-5, atol=1e-5)
        covered.append(idx)
    assert torch.equal(torch.cat(covered).sort().values, torch.arange(N + LQ))


def test_full_algo_matches_stock_megatron(reference):
    (idx, logits), = _run(2, 1, "full")
    torch.testing.assert_close(logits, reference[:, idx], rtol=1e-5, atol=1e-5)


LONG = 2048  # long enough that the default budgets are approximate


@pytest.mark.parametrize("algo", ["star", "apb", "spava"])
def test_default_budgets_one_layer_anchor_and_query_exact(algo):
    """One layer: every row's input is exact, so the anchor rows and the query rows (exact
    given their inputs, SPAVA.md 2.8) give exact logits; rank 0's first block too."""
    ref = _reference(LONG, LQ, num_layers=1)
    results = _run(2, 2, algo, LONG, LQ, num_layers=1)
    approx = []
    for rank, (idx, logits) in enumerate(results):
        exact = (idx < _first_exact_end(algo, rank)) | (idx >= LONG)
        torch.testing.assert_close(logits[:, exact], ref[:, idx[exact]], rtol=1e-5, atol=1e-5)
        if (~exact).any():
            approx.append(float((logits[:, ~exact] - ref[:, idx[~exact]]).abs().max()))
    assert max(approx) > 1e-4  # the other rows really are approximate


def _first_exact_end(algo, rank):
    """End of the rows that are exact on `rank`: the anchor, plus B_0 on rank 0."""
    from megatron_spava.algos import plan_layout
    layout = plan_layout(algo, context_len=LONG, query_len=LQ, cp_size=2)
    return layout.block_range(0)[1] if rank == 0 else layout.anchor_len


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["star", "apb", "spava"])
def test_default_budgets_two_layers_anchor_exact_query_replicated(algo):
    """Two layers: the anchor rows stay exact (A is the true prefix at every layer); the
    query rows are the same on every CP rank and close to the reference."""
    ref = _reference(LONG, LQ, num_layers=2)
    results = _run(1, 2, algo, LONG, LQ, num_layers=2)
    query = [logits[:, -LQ:] for _, logits in results]
    assert torch.equal(query[0], query[1])
    for rank, (idx, logits) in enumerate(results):
        exact = idx < _first_exact_end(algo, rank)
        torch.testing.assert_close(logits[:, exact], ref[:, idx[exact]], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(logits).all()
    rel = float((query[0] - ref[:, -LQ:]).norm() / ref[:, -LQ:].norm())
    assert rel < 0.5, rel


# ---- specs, module contract, arguments ------------------------------------------------

def test_local_spec_swaps_in_spava_core_attention():
    from megatron_spava.modules import SpavaCoreAttention
    from megatron_spava.specs import get_gpt_layer_spec
    spec = get_gpt_layer_spec("local", normalization="RMSNorm")
    assert spec.submodules.self_attention.submodules.core_attention is SpavaCoreAttention


def test_te_spec_without_te_names_the_package(monkeypatch):
    from megatron_spava import specs
    monkeypatch.setattr(specs, "te_available", lambda: False)
    with pytest.raises(ImportError, match="transformer_engine"):
        specs.get_gpt_layer_spec("te")
    with pytest.raises(ValueError, match="unknown layer-spec backend"):
        specs.get_gpt_layer_spec("apex")


def _no_request_rank():
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron_spava.models.gpt import build_gpt_model, gpt_config
    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=2)
    model = build_gpt_model(gpt_config(num_layers=1, hidden_size=32, num_attention_heads=2,
                                       context_parallel=2), vocab_size=64, max_sequence_length=64)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 16, dtype=torch.long), torch.arange(16)[None], None)
    except RuntimeError as err:
        return str(err)
    return None


def test_core_attention_without_request_under_cp_raises_everywhere():
    messages = run_ranks(_no_request_rank, 2, timeout=120)
    assert all(m and "no context-parallel request is active" in m for m in messages)


def _parse(*argv):
    from megatron_spava.arguments import add_spava_args
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=4096)
    return add_spava_args(parser).parse_args(list(argv))


def test_arguments_build_the_config():
    from megatron_spava.arguments import validate_spava_args
    args = _parse("--context-parallel-algo", "spava", "--context-parallel-size", "2",
                  "--spava-no-overlap", "--spava-passing-len", "256", "--spava-anchor-len", "block")
    cfg = validate_spava_args(args)
    assert (cfg.overlap, cfg.passing_len, cfg.anchor_len, cfg.zigzag) == (False, 256, "block", True)


@pytest.mark.parametrize("argv,match", [
    (["--context-parallel-algo", "spava", "--context-parallel-size", "4", "--seq-length", "200"],
     "context too short"),
    (["--context-parallel-algo", "ring", "--context-parallel-size", "4", "--seq-length", "6",
      "--spava-query-len", "1"], "non-empty chunks"),
    (["--context-parallel-algo", "full", "--context-parallel-size", "2"], "without context parallelism"),
    (["--context-parallel-algo", "spava", "--tensor-model-parallel-size", "3"], "not divisible"),
    (["--context-parallel-algo", "spava", "--tensor-model-parallel-size", "4",
      "--num-query-groups", "3", "--num-attention-heads", "12"], "one must divide the other"),
    (["--context-parallel-algo", "spava", "--spava-passing-len", "100"], "multiple of budget_align"),
    (["--context-parallel-algo", "spava", "--spava-pool-kernel", "4"], "must be odd"),
    (["--context-parallel-algo", "spava", "--spava-anchor-len", "-128"], "integer >= 0"),
    (["--context-parallel-algo", "spava", "--spava-query-len", "5000"], r"must be in \[1, seq_length"),
])
def test_argument_validation(argv, match):
    from megatron_spava.arguments import validate_spava_args
    with pytest.raises(ValueError, match=match):
        validate_spava_args(_parse(*argv))


def test_unknown_algo_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse("--context-parallel-algo", "ulysses")
    assert "invalid choice: 'ulysses'" in capsys.readouterr().err
