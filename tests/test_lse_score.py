"""ops.lse_score.lse_scores (SPAVA.md section 2 step 1, `lse`): the torch path, the Triton kernel
on a GPU and in triton's interpreter, each against an independent float64 reference (einsum over
the GQA group + logsumexp) on fresh random shapes: GQA ratios 1, 2 and 7, head dims 64, 80 and
128, odd lengths, batches and strided views of a fused QKV tensor."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from megatron_spava.ops.lse_score import lse_scores, triton_available
from megatron_spava.testing.tools import run_tool

# (head-dim tolerance per dtype) METHOD.md: fp32 arithmetic far under 1e-3, tf32-class dots near
# 3e-4, bf16 operands 1e-3 to 1e-2. Here the reference sees the same (rounded) operands, so
# these are loose; the error is measured on scores centred per head (the log-sum-exp's offset,
# log(l_q * G), would otherwise hide errors in the relative norm) and as a max abs error.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ABS_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 s[t, h] = logsumexp_{j, g} scale * q[j, h*G+g] . k[t, h]; q [lq, hq, d], k [l, hk, d]."""
    lq, hq, d = q.shape
    l, hk, _ = k.shape
    x = torch.einsum("jhgd,thd->thjg", q.double().reshape(lq, hk, hq // hk, d), k.double()) * scale
    return torch.logsumexp(x.reshape(l, hk, -1), dim=-1)


def errors(s: torch.Tensor, ref: torch.Tensor):
    """(relative error of the per-head centred scores, max abs error); NaN counts as a failure."""
    s, ref = s.double().cpu(), ref.double().cpu()
    if not torch.isfinite(s).all():
        return float("inf"), float("inf")
    cs, cr = s - s.mean(0, keepdim=True), ref - ref.mean(0, keepdim=True)
    # (a single key has no spread: centred scores are 0 there, and the abs error decides)
    return float((cs - cr).norm() / cr.norm().clamp_min(1e-9)), float((s - ref).abs().max())


def random_case(seed: int, device="cpu", max_len=300, max_lq=40):
    """Fresh random shapes and inputs: GQA 1/2/7, d 64/80/128, odd lengths, dtype."""
    rng = random.Random(seed)
    hk = rng.choice([1, 2, 4])
    group = rng.choice([1, 2, 7])
    d = rng.choice([64, 80, 128])
    lq = rng.randrange(1, max_lq)
    lb = rng.randrange(1, max_len)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(lq, hk * group, d, generator=gen).to(device, dtype)
    # keys with a spread of norms, so that scores differ per key
    k = (torch.randn(lb, hk, d, generator=gen) * torch.rand(lb, hk, 1, generator=gen) * 2).to(device, dtype)
    return q, k, d ** -0.5 * rng.uniform(0.5, 2.0), dtype


def check(q, k, scale, dtype, impl, **kw):
    s = lse_scores(q, k, scale, impl=impl, **kw)
    assert s.shape == (k.shape[0], k.shape[1]) and s.dtype == torch.float32
    rel, err = errors(s, reference(q.cpu(), k.cpu(), scale))
    assert rel < REL_TOL[dtype] and err < ABS_TOL[dtype], (tuple(q.shape), tuple(k.shape), dtype, rel, err)
    return rel, err


@pytest.mark.parametrize("seed", range(12))
def test_torch_path_matches_float64(seed):
    q, k, scale, dtype = random_case(1000 + seed)
    check(q, k, scale, dtype, "torch")


def test_torch_path_chunks_keys(monkeypatch):
    """Blocks longer than one chunk of logits give the same scores (chunk edges at odd places)."""
    import megatron_spava.ops.lse_score as mod
    monkeypatch.setattr(mod, "_LOGITS_PER_CHUNK", 7 * 2 * 5 * 7 + 3)  # 7 keys (2 heads x 35 rows) a chunk
    q, k = torch.randn(5, 14, 64), torch.randn(61, 2, 64)
    check(q, k, 0.125, torch.float32, "torch")


def strided_views(lq_lo, lq_hi, lo, hi, b=2, hk=2, group=7, d=80, seed=0, device="cpu",
                  dtype=torch.float32):
    """Non-contiguous inputs as an attention may see them, sliced along s as core_attention
    does: q [s, b, hq, d] a transposed view of a [b, s, hq, d] tensor, k [s, b, hk, d] the key
    half of a packed [s, b, hk, 2d] K|V tensor."""
    gen = torch.Generator().manual_seed(seed)
    s = max(lq_hi, hi)
    q = torch.randn(b, s, hk * group, d, generator=gen).to(device, dtype).transpose(0, 1)
    k = torch.randn(s, b, hk, 2 * d, generator=gen).to(device, dtype)[..., :d]
    return q[lq_lo:lq_hi], k[lo:hi]


def check_batched_views(impl, device="cpu", dtype=torch.float32, **kw):
    q, k = strided_views(200, 213, 17, 170, device=device, dtype=dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    s = lse_scores(q, k, 0.1, impl=impl, **kw)
    assert s.shape == (153, 2, 2)
    for bi in range(2):
        rel, err = errors(s[:, bi], reference(q[:, bi].cpu(), k[:, bi].cpu(), 0.1))
        assert rel < REL_TOL[dtype] and err < ABS_TOL[dtype], (bi, rel, err)
    # the documented no-copy view back to [b, hk, l_b]
    assert s.permute(1, 2, 0).is_contiguous()


def test_torch_path_batched_strided_views():
    check_batched_views("torch")


def test_empty_and_bad_inputs():
    q, k = torch.randn(4, 6, 64), torch.randn(9, 2, 64)
    assert torch.isneginf(lse_scores(q[:0], k, 0.1, impl="torch")).all()
    assert lse_scores(q, k[:0], 0.1, impl="torch").shape == (0, 2)
    bad = [((q, torch.randn(9, 4, 64)), "not a multiple"),
           ((q, k.double()), "dtype"),
           ((q, k.half()), "share a dtype"),
           ((q, torch.randn(9, 2, 32)), "head dim"),
           ((q, k[:, None]), "both be")]
    for (qq, kk), msg in bad:
        with pytest.raises(ValueError, match=msg):
            lse_scores(qq, kk, 0.1)
    with pytest.raises(ValueError, match="scale must be > 0"):
        lse_scores(q, k, 0.0)
    with pytest.raises(ValueError, match="impl"):
        lse_scores(q, k, 0.1, impl="cuda")


# ---- the Triton kernel on a GPU ---------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_matches_float64_on_gpu(dtype):
    if not triton_available():
        pytest.skip("triton is not installed")
    # random shapes at one fixed tile config (no autotuning: it would tune every size anew)
    for seed in range(8):
        q, k, scale, _ = random_case(2000 + seed, device="cuda", max_len=3000)
        q, k = q.to(dtype), k.to(dtype)
        check(q, k, scale, dtype, "triton", config=(64, 32, 4, 2))
    # the 7B shape, a full block tile and odd tails, through the autotuner
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(77, 28, 128, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(4099, 4, 128, device="cuda", dtype=dtype, generator=gen)
    # poison: the caching allocator hands this NaN block to the output; every element must be written
    poison = torch.full((4 * 4099,), float("nan"), device="cuda")
    del poison
    s = lse_scores(q, k, 128 ** -0.5)
    assert s.is_cuda and torch.isfinite(s).all()
    rel, err = errors(s, reference(q.cpu(), k.cpu(), 128 ** -0.5))
    assert rel < REL_TOL[dtype] and err < ABS_TOL[dtype], (rel, err)
    check_batched_views("triton", device="cuda", dtype=dtype, config=(64, 32, 4, 2))


@pytest.mark.cuda
def test_triton_kernel_agrees_with_torch_path_on_gpu():
    """Same inputs, both paths (the torch path is what CPU runs use)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(64, 28, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(8191, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    a, b = lse_scores(q, k, 128 ** -0.5, impl="triton"), lse_scores(q, k, 128 ** -0.5, impl="torch")
    assert float((a - b).abs().max()) < 1e-3


# ---- the same kernel in triton's interpreter, on CPU tensors ------------------------------------

def _interpreter_skip_reason():
    try:
        import importlib.metadata as md
        tv = md.version("triton")
    except Exception:
        return "triton is not installed"
    import numpy
    major_minor = tuple(int(x) for x in tv.split(".")[:2])
    if major_minor < (3, 7) and tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        return (f"triton {tv}'s interpreter cannot run under numpy {numpy.__version__} "
                "(triton-lang/triton#9171, fixed in 3.7)")
    return None


def interpreter_cases():
    """Run in a process with TRITON_INTERPRET=1 (see the test below); prints one line per case."""
    cases = [random_case(3000 + i, max_len=70, max_lq=12) for i in range(5)]
    cases.append((torch.randn(3, 7, 128).bfloat16(), torch.randn(33, 1, 128).bfloat16(), 0.09, torch.bfloat16))
    cases.append((torch.randn(16, 4, 64), torch.randn(40, 4, 64), 0.2, torch.float32))  # rows fill whole tiles
    for q, k, scale, dtype in cases:
        print(tuple(q.shape), tuple(k.shape), dtype, check(q, k, scale, dtype, "triton"))
    check_batched_views("triton")
    check_batched_views("triton", dtype=torch.bfloat16)
    print("interpreter ok")


def test_triton_kernel_in_interpreter():
    """The kernel itself (masks, tiles, GQA indexing, strides) on CPU tensors, where triton is
    installed (CI's CUDA-torch leg has it as torch's dependency). A subprocess, because
    TRITON_INTERPRET must be set before triton is first imported."""
    run_interpreter_cases("test_lse_score", timeout=300)


def run_interpreter_cases(module: str, timeout: int):
    """Run tests/<module>.py's interpreter_cases() in a subprocess with TRITON_INTERPRET=1
    (it must be set before triton is first imported) and no GPU; skip where triton or its
    interpreter is missing; fail unless it printed "interpreter ok"."""
    reason = _interpreter_skip_reason()
    if reason:
        pytest.skip(reason)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", f"import {module} as t; t.interpreter_cases()"],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "interpreter ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_bench_selection_runs_on_cpu(tmp_path):
    """tools/bench_selection.py's smoke mode: every column, and its check of the fused path
    against algos.spava.selection's torch path, at toy sizes (times on the CPU mean nothing)."""
    import json

    out = tmp_path / "sel.json"
    assert run_tool("tools/bench_selection.py", ["--device", "cpu", "--block-len", "301", "--query-len", "3", "17", "--q-heads", "14",
                          "--kv-heads", "2", "--head-dim", "64", "--repeats", "1", "--warmup", "0",
                          "--scores", "rownorm", "mean", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(set(r["scores_ms"]) == {"rownorm", "mean"} and min(r["scores_ms"].values()) > 0 for r in rows)
    assert [(r["block_len"], r["query_len"]) for r in rows] == [(301, 3), (301, 17)]
    for r in rows:
        assert r["max_abs_diff"] < 1e-4 and r["topk_overlap"] > 0.99
        assert all(r[c] > 0 for c in ("mean_ms", "lse_torch_ms", "lse_fused_ms", "fused_score_ms", "attention_ms"))
