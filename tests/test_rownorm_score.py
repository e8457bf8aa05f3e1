"""ops.lse_score's row offset (`lse_scores(..., row_offset=)`) and `rownorm_scores` (the
selection score "rownorm": each probe row's softmax over the block's keys, summed over the rows,
in log), on the torch path and through the Triton kernel in triton's interpreter, against
independent float64 references written out here (plain matmul + logsumexp): GQA ratios 7, 2
and 1, odd block lengths (not a multiple of the interpreter's 16-key tile), l_q = 1, 3 and 65,
bf16 and fp32 operands, batches 1 and 2, strided views. The GPU comparison is in
tests/test_selection.py."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_spava.ops.lse_score import lse_scores, rownorm_scores
from test_lse_score import ABS_TOL, REL_TOL, errors, run_interpreter_cases, strided_views


def logits64(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 [b, hk, l_b, R]: scale * q[j, b, h * G + g] . k[t, b, h] at row r = j * G + g;
    q [l_q, b, hq, d], k [l_b, b, hk, d]."""
    lq, b, hq, d = q.shape
    lb, _, hk, _ = k.shape
    group = hq // hk
    # rows in (j, g) order, g fastest: [b, hk, d, R]
    rows = q.double().reshape(lq, b, hk, group, d).permute(1, 2, 4, 0, 3).reshape(b, hk, d, lq * group)
    return torch.matmul(k.double().permute(1, 2, 0, 3), rows) * scale


def offset_reference(q, k, scale, offset):
    """float64 [l_b, b, hk]: logsumexp_r (scale * q_r . k_t - offset[b, h, r])."""
    return torch.logsumexp(logits64(q, k, scale) - offset.double().unsqueeze(2), dim=-1).permute(2, 0, 1)


def rownorm_reference(q, k, scale):
    """float64 [l_b, b, hk]: log sum_r softmax over the block's keys t' of (scale * q_r . k_t')."""
    x = logits64(q, k, scale)  # [b, hk, l_b, R]
    row_lse = torch.logsumexp(x, dim=2, keepdim=True)  # [b, hk, 1, R]
    return torch.logsumexp(x - row_lse, dim=-1).permute(2, 0, 1)


def assert_close(s, ref, dtype, what):
    assert s.shape == ref.shape and s.dtype == torch.float32, (what, tuple(s.shape), tuple(ref.shape))
    for bi in range(s.shape[1]):
        rel, err = errors(s[:, bi], ref[:, bi])
        assert rel < REL_TOL[dtype] and err < ABS_TOL[dtype], (what, bi, dtype, rel, err)


def case(seed: int, lq: int, group: int, b: int, dtype, lb=None, hk=None):
    """Random q [lq, b, hk * group, d], k [lb, b, hk, d] (keys of a spread of norms, probe heads
    of unequal scale, so rows differ in logit range) and a scale."""
    rng = random.Random(seed)
    hk = hk or rng.choice([1, 2])
    d = rng.choice([64, 80])
    lb = lb or rng.choice([17, 33, 45, 61])  # never a multiple of the interpreter's 16-key tile
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(lq, b, hk * group, d, generator=gen)
         * (0.5 + 3 * torch.rand(1, 1, hk * group, 1, generator=gen))).to(dtype)
    k = (torch.randn(lb, b, hk, d, generator=gen) * torch.rand(lb, b, hk, 1, generator=gen) * 2).to(dtype)
    return q, k, d ** -0.5 * rng.uniform(0.5, 2.0)


#: (l_q, GQA group, batch, dtype): every l_q, group, batch and dtype of the brief, mixed
CASES = [(1, 7, 1, torch.bfloat16), (3, 2, 2, torch.float32), (65, 1, 1, torch.bfloat16),
         (3, 7, 2, torch.float32), (1, 1, 2, torch.float32), (65, 2, 1, torch.float32)]


def random_offset(q, k, seed):
    """float32 [b, hk, R] offsets of a realistic range (a row's log-sum-exp is around its max
    logit plus log l_b), as a strided view (every other element of a [b, hk, 2 R] tensor)."""
    lq, b, hq, _ = q.shape
    hk = k.shape[2]
    gen = torch.Generator().manual_seed(seed)
    off = torch.randn(b, hk, 2 * lq * (hq // hk), generator=gen) * 4 + 3
    return off[..., ::2]


def check_cases(impl: str):
    for i, (lq, group, b, dtype) in enumerate(CASES):
        q, k, scale = case(4000 + i, lq, group, b, dtype)
        off = random_offset(q, k, 5000 + i)
        assert off.stride(-1) == 2
        assert_close(lse_scores(q, k, scale, row_offset=off, impl=impl),
                     offset_reference(q, k, scale, off), dtype, ("offset", impl, tuple(q.shape), tuple(k.shape)))
        s = rownorm_scores(q, k, scale, impl=impl)
        assert_close(s, rownorm_reference(q, k, scale), dtype, ("rownorm", impl, tuple(q.shape), tuple(k.shape)))
        # every probe row's softmax sums to one over the block: sum_t exp(s) = R per KV head
        mass = s.double().exp().sum(0)
        assert torch.allclose(mass, torch.full_like(mass, lq * group), rtol=1e-3), (impl, mass)
        print(impl, tuple(q.shape), tuple(k.shape), dtype, "ok")
    # 3-D inputs (no batch dim), the offset as [hk, R]
    q, k, scale = case(4100, 3, 7, 1, torch.float32)
    off = random_offset(q, k, 5100)[0]
    got = lse_scores(q[:, 0], k[:, 0], scale, row_offset=off, impl=impl)
    assert_close(got[:, None], offset_reference(q, k, scale, off[None]), torch.float32, ("offset 3-D", impl))
    assert_close(rownorm_scores(q[:, 0], k[:, 0], scale, impl=impl)[:, None],
                 rownorm_reference(q, k, scale), torch.float32, ("rownorm 3-D", impl))
    # strided views as the attention passes them (q a transposed view, k half of a packed K|V)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = strided_views(200, 203, 17, 62, dtype=dtype)
        assert not q.is_contiguous() and not k.is_contiguous()
        assert_close(rownorm_scores(q, k, 0.1, impl=impl), rownorm_reference(q, k, 0.1), dtype, ("views", impl))


def test_torch_path_matches_float64():
    check_cases("torch")


def test_torch_path_chunks_keys(monkeypatch):
    """Blocks longer than one chunk of logits (both passes; chunk edges at odd places)."""
    import megatron_spava.ops.lse_score as mod
    monkeypatch.setattr(mod, "_LOGITS_PER_CHUNK", 2 * 2 * 15 * 7 + 5)  # 7 keys (b 2 x 2 heads x 15 rows) a chunk
    q, k, scale = case(4200, 5, 3, 2, torch.float32, lb=61, hk=2)
    assert_close(rownorm_scores(q, k, scale, impl="torch"), rownorm_reference(q, k, scale), torch.float32, "chunks")
    off = random_offset(q, k, 4201)
    assert_close(lse_scores(q, k, scale, row_offset=off, impl="torch"), offset_reference(q, k, scale, off),
                 torch.float32, "offset chunks")


def test_empty_and_bad_inputs():
    q, k = torch.randn(4, 6, 64), torch.randn(9, 2, 64)
    assert torch.isneginf(rownorm_scores(q[:0], k, 0.1, impl="torch")).all()
    assert rownorm_scores(q, k[:0], 0.1, impl="torch").shape == (0, 2)
    off = torch.zeros(2, 12)
    torch.testing.assert_close(lse_scores(q, k, 0.1, row_offset=off, impl="torch"), lse_scores(q, k, 0.1, impl="torch"))
    for bad in (torch.zeros(2, 11), torch.zeros(1, 2, 12), off.double()):
        with pytest.raises(ValueError, match="row_offset must be float32"):
            lse_scores(q, k, 0.1, row_offset=bad)
    with pytest.raises(ValueError, match="rownorm_scores: 6 query heads are not a multiple of 4"):
        rownorm_scores(q, torch.randn(9, 4, 64), 0.1)
    with pytest.raises(ValueError, match="rownorm_scores: impl"):
        rownorm_scores(q, k, 0.1, impl="cuda")


# ---- the kernel in triton's interpreter, on CPU tensors -----------------------------------------

def interpreter_cases():
    """Run in a process with TRITON_INTERPRET=1 (see the test below); prints one line per case."""
    check_cases("triton")
    print("interpreter ok")


def test_triton_kernel_in_interpreter():
    """The offset switch of the kernel (masked and full row tiles, GQA indexing, the offset's
    strides) and rownorm's two launches (the swapped first pass, G = 1) on CPU tensors."""
    run_interpreter_cases("test_rownorm_score", timeout=300)
