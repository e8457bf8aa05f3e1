"""ops.attention.merge_partials, the LSE merge of attention partials: the torch path and the
fused Triton kernel (on a GPU, and in triton's interpreter on CPU tensors), each against an
independent float64 reference (the plain log-sum-exp formula, written below) on fresh random
shapes: 1 to 5 partials, rows with no keys (lse -inf everywhere) and rows where only some
partials are empty, bf16 and fp32 partials (mixed too), strided views as `attend` and
`gather_partials` give them, and a destination written in its own dtype. Then the switch
(SpavaConfig.merge_kernel, --spava-merge-kernel, the `-merge-<kernel>` variants) and Spava
at CP 2 with either merge."""

from __future__ import annotations

import argparse
import os
import random

import pytest
import torch

from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
from megatron_spava.ops.attention import MERGE_IMPLS, merge_partials, resolve_merge
from megatron_spava.ops.lse_score import triton_available

NEG_INF = float("-inf")


def reference(parts):
    """float64 (out [s, b, h, d], lse [s, b, h]): lse = m + log sum_i exp(lse_i - m) with
    m = max_i lse_i, out = sum_i out_i exp(lse_i - lse); rows with every lse_i = -inf: 0, -inf."""
    lses = [l.double().cpu() for _, l in parts]
    m = lses[0].clone()
    for l in lses[1:]:
        m = torch.maximum(m, l)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    lse = m + torch.log(sum(torch.exp(l - m) for l in lses))
    lse = torch.where(empty, torch.full_like(lse, NEG_INF), lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    out = sum(o.double().cpu() * torch.exp(l - safe)[..., None] for (o, _), l in zip(parts, lses))
    return out, lse


def random_parts(seed: int, device="cpu", k=None, max_s=40):
    """k partials (1..5) of one fresh random shape, as `attend` returns them: out an [s, b, h, d]
    view of a [b, h, s, d] or [b, s, h, d] buffer, lse a view of [b, h, s]; bf16 or fp32 outs
    (some cases mixed: a float32 running result beside bf16 partials, as the ring's), lse of
    spread magnitudes, a few rows empty in every partial and some rows empty in some."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    k = k or rng.randint(1, 5)
    s, b, h, d = rng.randint(1, max_s), rng.choice([1, 2]), rng.choice([1, 3, 4]), rng.choice([16, 64, 80, 128])
    dtype = rng.choice([torch.bfloat16, torch.float32])
    empty_rows = torch.rand(s, b, h, generator=gen) < 0.15
    parts = []
    for i in range(k):
        dt = torch.float32 if (i == 0 and rng.random() < 0.3) else dtype
        if rng.random() < 0.5:
            o = torch.randn(b, h, s, d, generator=gen).permute(2, 0, 1, 3)
        else:
            o = torch.randn(b, s, h, d, generator=gen).permute(1, 0, 2, 3)
        lse = (torch.randn(b, h, s, generator=gen) * rng.choice([1.0, 5.0, 30.0]) + 10).permute(2, 0, 1)
        some = (torch.rand(s, b, h, generator=gen) < 0.2) if k > 1 else torch.zeros(s, b, h, dtype=torch.bool)
        gone = empty_rows | some
        lse = lse.masked_fill(gone, NEG_INF)
        o = o.masked_fill(gone[..., None], 0.0)  # an empty partial's out is 0 (`attend`)
        parts.append((o.to(device, dt), lse.to(device)))
    return parts


def check(parts, impl, out_dtype=None, **kw):
    """merge_partials against the float64 reference; out_dtype: write into a new tensor of
    that dtype (a strided slice) instead of returning float32."""
    out = None
    if out_dtype is not None:
        s, b, h, d = parts[0][0].shape
        out = torch.full((s + 3, b, h, d), float("nan"), dtype=out_dtype, device=parts[0][0].device)[2:s + 2]
    got, lse = merge_partials(parts, out=out, impl=impl, **kw)
    if out is not None:
        assert got.data_ptr() == out.data_ptr() and got.dtype == out_dtype
    else:
        assert got.dtype == torch.float32
    assert lse.dtype == torch.float32 and lse.shape == parts[0][1].shape
    ref, ref_lse = reference(parts)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    torch.testing.assert_close(lse.cpu().double()[~empty], ref_lse[~empty], rtol=1e-6, atol=1e-5)
    if len(parts) > 1 or impl == "triton":  # the torch path returns a single partial as it is
        assert (got.cpu()[empty] == 0).all()
    # bf16 destination: its rounding (2^-8 relative) and nothing more
    rtol = 8e-3 if got.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.cpu().double(), ref, rtol=rtol, atol=1e-5)
    return got, lse


@pytest.mark.parametrize("seed", range(16))
def test_torch_path_matches_float64(seed):
    parts = random_parts(100 + seed)
    check(parts, "torch")
    check(parts, "torch", out_dtype=torch.bfloat16)
    check(parts, "torch", out_dtype=torch.float32)


def _before(parts):
    """The torch path as it was before (float copies, exp per partial, mul, add, cast on the
    assignment), kept here to check that the leaner path computes the same bits."""
    if len(parts) == 1:
        return parts[0][0].float(), parts[0][1].float()
    lses = torch.stack([lse.float() for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    out = None
    for (o, _), lse_i in zip(parts, lses):
        term = o.float() * torch.exp(lse_i - safe).unsqueeze(-1)
        out = term if out is None else out.add_(term)
    return out, lse


@pytest.mark.parametrize("seed", range(8))
def test_torch_path_is_bitwise_what_it_was(seed):
    parts = random_parts(200 + seed)
    old, old_lse = _before(parts)
    new, new_lse = merge_partials(parts)
    assert torch.equal(new, old) and torch.equal(new_lse, old_lse)
    into = torch.empty(old.shape, dtype=torch.bfloat16)
    merge_partials(parts, out=into)
    assert torch.equal(into, old.to(torch.bfloat16))


def test_gathered_partials_merge_into_a_slice():
    """The query rows' merge: W partials packed with their lse in one float32 buffer
    (`gather_partials`: rows of d + 1), written into a slice of a bf16 output."""
    from megatron_spava.distributed import merge_gathered
    parts = random_parts(7, k=4)
    packed = torch.cat([torch.cat([o.float(), l[..., None]], dim=-1) for o, l in parts])
    out = torch.zeros(parts[0][0].shape[0] + 4, *parts[0][0].shape[1:], dtype=torch.bfloat16)
    dest = out[4:]
    merged, lse = merge_gathered(packed, 4, with_lse=True, out=dest)
    ref, ref_lse = reference([(o.float(), l) for o, l in parts])
    torch.testing.assert_close(dest.double(), ref, rtol=8e-3, atol=1e-5)
    assert (out[:4] == 0).all() and merged.data_ptr() == dest.data_ptr()


def test_bench_merge_smoke_run_on_cpu(tmp_path, interpreted=False):
    """tools/bench_attention.py --merge at toy sizes on the CPU (times mean nothing): every
    row, the torch path always, the kernel (checked against the torch path) where it runs."""
    import json
    import tempfile
    from megatron_spava.testing.tools import run_tool
    out = os.path.join(tmp_path or tempfile.mkdtemp(), "merge.json")
    assert run_tool("tools/bench_attention.py", ["--merge", "--device", "cpu", "--merge-rows", "24", "--merge-query-rows",
                                                 "5", "--cp", "3", "--q-heads", "2", "--head-dim", "64", "--repeats", "1",
                                                 "--warmup", "0", "--json", out]) == 0
    rows = json.load(open(out))["merges"]
    assert [(r["kind"], r["rows"], r["parts"]) for r in rows] == [("block", 24, 2), ("query", 5, 3)]
    for r in rows:
        assert r["torch"] > 0 and r["floor_ms"] > 0
        assert (r["triton"] is not None) == interpreted, r
        if interpreted:
            assert r["max_rel_diff"] <= 2 ** -6


# ---- the switch ---------------------------------------------------------------------------

def test_switch_config_flag_and_variant():
    from megatron_spava.algos.registry import parse_variant, variant_config
    from megatron_spava.arguments import add_spava_args, spava_config_from_args
    assert SpavaConfig().merge_kernel == "auto"
    assert set(MERGE_IMPLS) == {"torch", "triton", "auto"}
    with pytest.raises(ValueError, match="merge_kernel must be one of"):
        SpavaConfig(merge_kernel="cuda")
    assert parse_variant("spava-merge-triton") == ("spava", {"merge_kernel": "triton"})
    assert parse_variant("spava-selection-mean-merge-auto-no-overlap") == (
        "spava", {"selection": "mean", "merge_kernel": "auto", "overlap": False})
    assert variant_config("spava-merge-triton")[1] == SpavaConfig(merge_kernel="triton")
    with pytest.raises(ValueError, match="unknown merge kernel 'fast'"):
        parse_variant("spava-merge-fast")
    parser = argparse.ArgumentParser()
    add_spava_args(parser)
    assert spava_config_from_args(parser.parse_args([])).merge_kernel == "auto"
    assert spava_config_from_args(parser.parse_args(["--spava-merge-kernel", "triton"])).merge_kernel == "triton"
    # auto: torch on CPU tensors; an unknown name: one line
    assert resolve_merge("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_merge("fused", torch.device("cpu"))


def _triton_on_cpu_rank():
    import torch.distributed as dist
    from megatron_spava.testing.reference import random_qkv
    q, k, v = random_qkv(60, 1, 4, 2, 16, seed=1)
    layout = SpavaLayout.plan(context_len=55, query_len=5, cp_size=dist.get_world_size(),
                              config=SpavaConfig(merge_kernel="triton", budget_align=1))
    idx = layout.local_indices(dist.get_rank())
    spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="triton runs on CPU tensors here")
def test_triton_merge_on_cpu_raises_on_every_rank_before_any_collective():
    """merge_kernel="triton" where it cannot run (CPU tensors outside triton's interpreter, or
    no triton): a one-line ValueError on every rank, no hang."""
    from megatron_spava.testing import run_ranks
    from megatron_spava.testing.multiprocess import RankFailure
    with pytest.raises(RankFailure) as err:
        # grace: every rank raises at once, but a loaded machine may start one much later
        run_ranks(_triton_on_cpu_rank, 2, timeout=60, grace=60)
    text = str(err.value)
    assert text.count("ValueError: merge_partials: impl='triton'") == 2, text[-2000:]


# ---- the Triton kernel on a GPU ---------------------------------------------------------------

@pytest.mark.cuda
def test_triton_kernel_matches_float64_on_gpu():
    if not triton_available():
        pytest.skip("triton is not installed")
    for seed in range(12):
        parts = random_parts(300 + seed, device="cuda", max_s=300)
        check(parts, "triton")
        check(parts, "triton", out_dtype=torch.bfloat16)
    for k in (6, 9):  # more partials than one launch takes
        check(random_parts(400 + k, device="cuda", k=k), "triton", out_dtype=torch.bfloat16)
    # a 7B block merge (28 heads, d 128, two bf16 partials) at each benchmark config
    from megatron_spava.ops import _merge_triton
    gen = torch.Generator(device="cuda").manual_seed(3)
    parts = [(torch.randn(777, 1, 28, 128, device="cuda", generator=gen).bfloat16(),
              torch.randn(777, 1, 28, device="cuda", generator=gen) * 4) for _ in range(2)]
    for config in _merge_triton.CONFIGS:
        check(parts, "triton", out_dtype=torch.bfloat16, config=config)


@pytest.mark.cuda
def test_triton_kernel_agrees_with_torch_path_on_gpu():
    if not triton_available():
        pytest.skip("triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(4)
    parts = [(torch.randn(4099, 1, 28, 128, device="cuda", generator=gen).bfloat16(),
              torch.randn(4099, 1, 28, device="cuda", generator=gen) * 4) for _ in range(2)]
    a = merge_partials(parts, impl="triton", out=torch.empty(4099, 1, 28, 128, device="cuda", dtype=torch.bfloat16))[0]
    b = merge_partials(parts, impl="torch", out=torch.empty_like(a))[0]
    diff = (a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)
    assert float(diff.max()) <= 2 ** -7  # at most one bf16 rounding apart
    assert float((a != b).float().mean()) < 0.01


@pytest.mark.cuda
def test_layer_with_either_merge_on_gpu():
    """Rank 1 of a 4-rank Spava layout (emulated: `distributed.EmulatedGroup`), bf16, 7B heads,
    with either merge: the same output up to the last bf16 rounding of some elements."""
    if not triton_available():
        pytest.skip("triton is not installed")
    from megatron_spava.distributed import EmulatedGroup
    from megatron_spava.testing.reference import random_qkv, relative_error
    n, lq = 8192, 64
    q, k, v = random_qkv(n + lq, 1, 28, 4, 128, seed=6, dtype=torch.bfloat16, device="cuda")
    outs = {}
    for merge in ("torch", "triton"):
        layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=4, config=SpavaConfig(merge_kernel=merge))
        idx = layout.local_indices(1).cuda()
        outs[merge] = spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=EmulatedGroup(1, 4))
    a, b = outs["triton"], outs["torch"]
    assert a.dtype == torch.bfloat16 and torch.isfinite(a.float()).all()
    assert relative_error(a, b) < 1e-3
    assert float((a != b).float().mean()) < 0.01


# ---- the same kernel in triton's interpreter, on CPU tensors; Spava at CP 2 with either merge ----

def _spava_rank(n, lq, dtype, merge_kernel):
    import torch.distributed as dist
    from megatron_spava.testing.reference import random_qkv
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, 2, 6, 2, 16, seed=5, dtype=dtype)
    cfg = SpavaConfig(anchor_len=8, passing_len=16, budget_align=1, merge_kernel=merge_kernel)
    layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=cfg)
    idx = layout.local_indices(rank)
    return idx, spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)


def interpreter_cases():
    """Run in a process with TRITON_INTERPRET=1 (see the test below); prints one line per case."""
    from megatron_spava.testing import run_ranks
    from megatron_spava.testing.reference import relative_error
    for seed in range(10):
        parts = random_parts(500 + seed, max_s=12)
        check(parts, "triton")
        check(parts, "triton", out_dtype=torch.bfloat16)
        print("case", seed, len(parts), tuple(parts[0][0].shape), parts[-1][0].dtype)
    for k in (5, 9):  # more partials than one launch takes: merged in groups
        check(random_parts(600 + k, k=k, max_s=12), "triton", out_dtype=torch.float32)
    assert resolve_merge("triton", torch.device("cpu")) == "triton"
    test_bench_merge_smoke_run_on_cpu(None, interpreted=True)
    test_gathered_partials_merge_into_a_slice_triton()
    # Spava at CP 2 (block rows: two partials; query rows: the gathered W partials and the
    # rank's own three), small budgets, either merge: the same outputs within the dtype's rounding
    # (triton's interpreter stores bf16 by truncation, compiled kernels round to nearest even:
    # here about half the bf16 outputs are one unit apart, on a GPU under 1%)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
        a = run_ranks(_spava_rank, 2, 60, 5, dtype, "torch", timeout=120)
        b = run_ranks(_spava_rank, 2, 60, 5, dtype, "triton", timeout=120)
        for (ia, oa), (ib, ob) in zip(a, b):
            assert torch.equal(ia, ib) and ob.dtype == dtype
            err = relative_error(ob, oa)
            assert err < tol, (dtype, err)
            print("spava CP 2", dtype, "triton vs torch merge: relative error", err)
    print("interpreter ok")


def test_gathered_partials_merge_into_a_slice_triton():
    """As test_gathered_partials_merge_into_a_slice, through the kernel (interpreter only)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs inside interpreter_cases")
    from megatron_spava.distributed import merge_gathered
    parts = random_parts(8, k=4, max_s=10)
    packed = torch.cat([torch.cat([o.float(), l[..., None]], dim=-1) for o, l in parts])
    out = torch.zeros(parts[0][0].shape[0] + 4, *parts[0][0].shape[1:], dtype=torch.bfloat16)
    merge_gathered(packed, 4, out=out[4:], impl="triton")
    ref, _ = reference([(o.float(), l) for o, l in parts])
    torch.testing.assert_close(out[4:].double(), ref, rtol=8e-3, atol=1e-5)
    assert (out[:4] == 0).all()


def test_triton_kernel_in_interpreter():
    """The kernel itself (masks, strides, -inf rows, dtypes, groups of partials) on CPU tensors,
    where triton is installed (CI's CUDA-torch leg has it as torch's dependency), and the layer
    with it. A subprocess, because TRITON_INTERPRET must be set before triton is first imported."""
    from test_lse_score import run_interpreter_cases
    run_interpreter_cases("test_merge", timeout=600)
