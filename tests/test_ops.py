"""The attention primitive, the LSE merge and passing-block selection, against plain
float64 PyTorch computed in the test."""

import pytest
import torch
import torch.nn.functional as F

from megatron_spava.algos.spava.selection import select_passing, selection_scores
from megatron_spava.ops import attend, merge_partials
from megatron_spava.ops.attention import attend_many, resolve_kernel

CPU_KERNELS = ["cpu_flash", "math"]


def _ref(q, k, v, causal, scale=None):
    """float64 out and lse by explicit softmax. q [sq,b,hq,d], k/v [sk,b,hk,d]."""
    group = q.shape[2] // k.shape[2]
    qd = q.double().permute(1, 2, 0, 3)
    kd = k.double().repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
    vd = v.double().repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = qd @ kd.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    out = torch.softmax(s, -1) @ vd
    return out.permute(2, 0, 1, 3), lse.permute(2, 0, 1)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)])
def test_attend_matches_float64_softmax(kernel, causal, hq, hk):
    torch.manual_seed(0)
    sq, sk = 37, 37 if causal else 53
    q, k, v = torch.randn(sq, 2, hq, 16), torch.randn(sk, 2, hk, 16), torch.randn(sk, 2, hk, 16)
    out, lse = attend(q, k, v, causal=causal, scale=0.3, kernel=kernel)
    ref_out, ref_lse = _ref(q, k, v, causal, scale=0.3)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (sq, 2, hq) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_attend_accepts_strided_views():
    torch.manual_seed(1)
    packed = torch.randn(40, 1, 2, 32)  # K|V packed along the last dim, as Spava's buffer
    q = torch.randn(10, 1, 4, 16)
    out, _ = attend(q, packed[..., :16], packed[..., 16:])
    ref, _ = _ref(q, packed[..., :16].contiguous(), packed[..., 16:].contiguous(), False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_attend_empty_keys_is_neutral():
    q = torch.randn(5, 1, 2, 8)
    out, lse = attend(q, torch.randn(0, 1, 2, 8), torch.randn(0, 1, 2, 8))
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    k, v = torch.randn(7, 1, 2, 8), torch.randn(7, 1, 2, 8)
    merged, _ = merge_partials([attend(q, k, v), (out, lse)])
    torch.testing.assert_close(merged, attend(q, k, v)[0])


def test_attend_rejects_rectangular_causal():
    with pytest.raises(ValueError, match="causal needs as many keys"):
        attend(torch.randn(3, 1, 1, 4), torch.randn(5, 1, 1, 4), torch.randn(5, 1, 1, 4), causal=True)


@pytest.mark.parametrize("splits", [[10, 30, 24], [1, 63], [64]])
def test_merge_of_key_splits_equals_attention_over_union(splits):
    torch.manual_seed(2)
    q, k, v = torch.randn(9, 2, 6, 8), torch.randn(64, 2, 3, 8), torch.randn(64, 2, 3, 8)
    parts, lo = [], 0
    for size in splits:
        parts.append(attend(q, k[lo:lo + size], v[lo:lo + size]))
        lo += size
    out, lse = merge_partials(parts)
    ref_out, ref_lse = _ref(q, k, v, False)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_attend_many_bottom_right_causal():
    """[prefix fully visible | own block causal] == bottom-right causal over the concat."""
    torch.manual_seed(3)
    q = torch.randn(12, 1, 4, 8)
    pk, pv = torch.randn(20, 1, 2, 8), torch.randn(20, 1, 2, 8)
    bk, bv = torch.randn(12, 1, 2, 8), torch.randn(12, 1, 2, 8)
    out, _ = attend_many(q, [(pk, pv, False), (bk, bv, True)], scale=None, kernel="auto")
    k, v = torch.cat([pk, bk]), torch.cat([pv, bv])
    mask = torch.ones(12, 32, dtype=torch.bool).tril(diagonal=20)
    ref = F.scaled_dot_product_attention(q.double().permute(1, 2, 0, 3), k.double().permute(1, 2, 0, 3),
                                         v.double().permute(1, 2, 0, 3), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref.permute(2, 0, 1, 3), rtol=1e-5, atol=1e-5)


def test_auto_kernel_choice():
    assert resolve_kernel("auto", torch.device("cpu"), torch.float32) == "cpu_flash"
    assert resolve_kernel("auto", torch.device("cuda"), torch.bfloat16) in {"flash", "cudnn", "flex", "efficient"}
    with pytest.raises(ValueError):
        resolve_kernel("nope", torch.device("cpu"), torch.float32)


def test_mean_scores_equal_mean_of_per_token_dot_products():
    """selection "mean" (the reference's): s[t, h] = k[t, h] . (mean over the query tokens
    and the GQA group of q), no scaling, checked in float64, then pooled."""
    torch.manual_seed(4)
    lq, b, hq, hk, d = 6, 2, 8, 2, 16
    qq, kb = torch.randn(lq, b, hq, d), torch.randn(30, b, hk, d)
    raw = selection_scores(kb, qq, 1, 0.3, "mean")
    assert raw.shape == (b, hk, 30) and raw.dtype == torch.float32
    # independent: average of k_t . q_i over the query tokens and the GQA group
    group = hq // hk
    expected = torch.einsum("tbhd,ibhgd->bht", kb.double(),
                            qq.double().reshape(lq, b, hk, group, d)) / (lq * group)
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-5)
    pooled = selection_scores(kb, qq, 5, 0.3, "mean")
    padded = F.pad(expected, (2, 2), value=float("-inf"))
    expected_pool = torch.stack([padded[..., t:t + 5].amax(-1) for t in range(30)], dim=-1)
    torch.testing.assert_close(pooled.double(), expected_pool, rtol=1e-5, atol=1e-5)


def test_selection_keeps_top_scored_tokens_per_head():
    torch.manual_seed(5)
    l, b, hk, d = 40, 2, 3, 8
    k, v = torch.randn(l, b, hk, d), torch.randn(l, b, hk, d)
    probe = torch.randn(1, b, hk, d)  # one probe token, one query head per KV head
    sel = select_passing(k, v, probe, budget=7, pool_kernel=1, scale=1.0, selection="mean")
    assert sel.shape == (7, b, hk, 2 * d)
    scores = torch.einsum("tbhd,bhd->bht", k.double(), probe[0].double())
    heads_differ = False
    for bi in range(b):
        chosen_per_head = []
        for h in range(hk):
            top = set(scores[bi, h].topk(7).indices.tolist())
            rows = {int(torch.nonzero((k[:, bi, h] == sel[j, bi, h, :d]).all(-1))[0])
                    for j in range(7)}
            assert rows == top
            for j in range(7):  # values travel with their keys
                t = int(torch.nonzero((k[:, bi, h] == sel[j, bi, h, :d]).all(-1))[0])
                assert torch.equal(sel[j, bi, h, d:], v[t, bi, h])
            chosen_per_head.append(rows)
        heads_differ |= len({frozenset(c) for c in chosen_per_head}) > 1
    assert heads_differ


def test_selection_pools_within_block_only():
    """A high score just outside the block must not leak in through the max-pool."""
    d = 4
    k = torch.zeros(10, 1, 1, d)
    probe = torch.zeros(1, 1, 1, d)
    probe[..., 0] = 1.0
    k[:, 0, 0, 0] = torch.arange(10.0)  # increasing scores, max at the last token
    pooled = selection_scores(k, probe, 5, 1.0, "mean")
    # last two tokens pool only over in-block neighbours (padding is -inf, not data)
    assert pooled[0, 0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 9, 9]


def test_log_sum_exp_scores_equal_the_attention_mass_of_every_query_token_and_head():
    """selection "lse" (the default): s[t, h] = log sum_{i, g} exp(scale * q[i, g] . k[t, h]),
    checked in float64 against an einsum over every query token and every head of the GQA
    group, then pooled; the chunked evaluation matches too."""
    torch.manual_seed(6)
    lq, b, hq, hk, d, l = 5, 2, 6, 2, 8, 37
    qq, kb = torch.randn(lq, b, hq, d), torch.randn(l, b, hk, d)
    scale = 0.3
    logits = torch.einsum("tbhd,ibhgd->bhtig", kb.double(), qq.double().reshape(lq, b, hk, hq // hk, d))
    expected = torch.logsumexp(scale * logits.flatten(-2), dim=-1)  # [b, hk, l]
    torch.testing.assert_close(selection_scores(kb, qq, 1, scale).double(), expected, rtol=1e-5, atol=1e-5)
    padded = F.pad(expected, (2, 2), value=float("-inf"))
    pooled = torch.stack([padded[..., t:t + 5].amax(-1) for t in range(l)], dim=-1)
    torch.testing.assert_close(selection_scores(kb, qq, 5, scale, "lse").double(), pooled, rtol=1e-5, atol=1e-5)
    import megatron_spava.ops.lse_score as lse_score  # where lse's torch path chunks its logits
    chunk, lse_score._LOGITS_PER_CHUNK = lse_score._LOGITS_PER_CHUNK, 50  # several key chunks
    try:
        torch.testing.assert_close(selection_scores(kb, qq, 5, scale).double(), pooled, rtol=1e-5, atol=1e-5)
    finally:
        lse_score._LOGITS_PER_CHUNK = chunk


def test_lse_max_is_each_heads_log_share_maximised_over_the_kv_heads():
    """selection "lse-max": s[t] = max over KV heads h of (lse[t, h] - log sum over the
    block's t' of exp(lse[t', h])), the same for every head, from a float64 einsum; so every
    head keeps the same keys."""
    torch.manual_seed(8)
    lq, b, hq, hk, d, l = 4, 1, 6, 3, 8, 41
    qq, kb, vb = torch.randn(lq, b, hq, d), torch.randn(l, b, hk, d), torch.randn(l, b, hk, d)
    logits = torch.einsum("tbhd,ibhgd->bhtig", kb.double(), qq.double().reshape(lq, b, hk, hq // hk, d))
    lse = torch.logsumexp(0.4 * logits.flatten(-2), dim=-1)  # [b, hk, l]
    share = lse - torch.logsumexp(lse, dim=-1, keepdim=True)
    expected = share.amax(dim=1, keepdim=True).expand(b, hk, l)
    torch.testing.assert_close(selection_scores(kb, qq, 1, 0.4, "lse-max").double(), expected, rtol=1e-5, atol=1e-5)
    sel = select_passing(kb, vb, qq, 9, 1, 0.4, "lse-max")
    top = set(expected[0, 0].topk(9).indices.tolist())
    for h in range(hk):
        rows = {int(torch.nonzero((kb[:, 0, h] == sel[j, 0, h, :d]).all(-1))[0]) for j in range(9)}
        assert rows == top


def test_unknown_or_misshapen_scores_are_refused():
    import megatron_spava.algos.spava.selection as selection
    kb, qq = torch.randn(9, 1, 2, 4), torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown selection score 'nope'; choose from"):
        selection_scores(kb, qq, 1, 1.0, "nope")
    with selection.registered_scorer("flat", lambda k, p, s: torch.zeros(k.shape[0])):
        with pytest.raises(ValueError, match=r"returned shape \(9,\), expected \[b, hk, l\]"):
            selection_scores(kb, qq, 1, 1.0, "flat")
    assert "flat" not in selection.SCORERS
    with pytest.raises(ValueError, match="already registered"):
        selection.register_scorer("mean", lambda k, p, s: k)
    with pytest.raises(ValueError, match="cannot be removed"):
        selection.unregister_scorer("lse")


def test_log_sum_exp_finds_a_key_that_the_mean_probe_misses():
    """Two query tokens that point opposite ways (as RoPE can turn the same content at two
    positions) cancel in the mean probe; one of them attends strongly to a key that the
    mean scores at zero, below every mildly aligned distractor. The log-sum-exp score keeps it."""
    d, l = 4, 12
    e = torch.eye(d)
    qq = torch.stack([4 * e[0] + 0.5 * e[1], -4 * e[0] + 0.5 * e[1]]).reshape(2, 1, 1, d)
    k = e[1].repeat(l, 1).reshape(l, 1, 1, d).clone()  # distractors: k . mean = 0.5
    k[7, 0, 0] = 3 * e[0]  # the key the first query token wants (k . mean = 0)
    v = torch.randn(l, 1, 1, d)
    budget = 3
    for score, hit in (("mean", False), ("lse", True)):
        sel = select_passing(k, v, qq, budget, pool_kernel=1, scale=0.5, selection=score)
        assert bool((sel[:, 0, 0, :d] == k[7, 0, 0]).all(-1).any()) is hit, score
