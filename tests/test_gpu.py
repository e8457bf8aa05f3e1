"""GPU checks (skipped without CUDA): every CUDA kernel against float32 math, and Spava's
exactness invariant over NCCL in bf16 on 2 and 4 GPUs.

Run on the device with:  python -m pytest -q -m cuda tests/test_gpu.py
"""

import pytest
import torch
import torch.distributed as dist

from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
from megatron_spava.algos import cp_attn_func, plan_layout
from megatron_spava.config import round_up
from megatron_spava.ops import attend
from megatron_spava.testing import run_ranks
from megatron_spava.testing.reference import full_attention, random_qkv, relative_error

pytestmark = pytest.mark.cuda
CUDA_KERNELS = ["cudnn", "flash", "flex", "efficient"]


def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hk", [(28, 4), (8, 8)])
def test_cuda_kernel_matches_float32_math(kernel, causal, hq, hk):
    sq, sk = (1000, 1000) if causal else (333, 1500)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 1, hq, 128, generator=gen).cuda().bfloat16()
    k = torch.randn(sk, 1, hk, 128, generator=gen).cuda().bfloat16()
    v = torch.randn(sk, 1, hk, 128, generator=gen).cuda().bfloat16()
    out, lse = attend(q, k, v, causal=causal, kernel=kernel)
    ref_out, ref_lse = attend(q.float(), k.float(), v.float(), causal=causal, kernel="math")
    assert out.dtype == torch.bfloat16 and lse.shape == (sq, 1, hq)
    assert relative_error(out, ref_out) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def _spava_nccl(n, lq, hq, hk, d, kernel, seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, 1, hq, hk, d, seed=seed, dtype=torch.bfloat16, device="cuda")
    cfg = SpavaConfig(anchor_len=256, passing_len=round_up(n, 128), kernel=kernel)  # >= block length
    layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world, config=cfg)
    idx = layout.local_indices(rank)
    out = spava_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    torch.cuda.synchronize()
    return idx, out.cpu()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kernel", ["auto"] + CUDA_KERNELS)
def test_spava_full_budget_exact_over_nccl_bf16(world, kernel):
    if _gpus() < world:
        pytest.skip(f"needs {world} GPUs, found {_gpus()}")
    n, lq, hq, hk, d = 8000, 40, 28, 4, 128  # 8000 - 256 does not divide by 2W: short last block
    results = run_ranks(_spava_nccl, world, n, lq, hq, hk, d, kernel, 5, backend="nccl", timeout=300)
    q, k, v = random_qkv(n + lq, 1, hq, hk, d, seed=5, dtype=torch.bfloat16, device="cuda")
    ref = full_attention(q, k, v, dtype=torch.float32).cpu()
    noise = relative_error(full_attention(q, k, v, dtype=torch.bfloat16).cpu(), ref)
    for idx, out in results:
        err = relative_error(out, ref[idx])
        assert err < 2 * noise, (err, noise)
    assert all(torch.equal(results[0][1][-lq:], out[-lq:]) for _, out in results)


def _ring_nccl(n, lq, hq, hk, d, seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, 1, hq, hk, d, seed=seed, dtype=torch.bfloat16, device="cuda")
    layout = plan_layout("ring", context_len=n, query_len=lq, cp_size=world)
    idx = layout.local_indices(rank)
    out = cp_attn_func(q[idx], k[idx], v[idx], layout=layout, cp_group=dist.group.WORLD)
    torch.cuda.synchronize()
    return idx, out.cpu()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_exact_over_nccl_bf16(world):
    if _gpus() < world:
        pytest.skip(f"needs {world} GPUs, found {_gpus()}")
    n, lq, hq, hk, d = 8000, 37, 28, 4, 128  # 8037 tokens: the last chunk is short
    results = run_ranks(_ring_nccl, world, n, lq, hq, hk, d, 6, backend="nccl", timeout=300)
    q, k, v = random_qkv(n + lq, 1, hq, hk, d, seed=6, dtype=torch.bfloat16, device="cuda")
    ref = full_attention(q, k, v, dtype=torch.float32).cpu()
    noise = relative_error(full_attention(q, k, v, dtype=torch.bfloat16).cpu(), ref)
    for idx, out in results:
        assert relative_error(out, ref[idx]) < 2 * noise


def _no_sync_rank(n, lq):
    """One Spava layer and one decode step under torch's sync debug mode "error": any
    host-device synchronisation in the per-layer path raises."""
    from megatron_spava.inference import DistributedKVCache
    from megatron_spava.inference.decode import decode_attn_func
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = random_qkv(n + lq, 1, 28, 4, 128, seed=9, dtype=torch.bfloat16, device="cuda")
    layout = SpavaLayout.plan(context_len=n, query_len=lq, cp_size=world)  # default budgets
    idx = layout.local_indices(rank).cuda()
    ql, kl, vl = q[idx], k[idx], v[idx]
    group = dist.group.WORLD
    cache = DistributedKVCache(layout, rank, world, max_new_tokens=2)
    spava_attn_func(ql, kl, vl, layout=layout, cp_group=group)  # warm-up: kernels, plans
    cache.store_prefill(1, kl, vl)
    cache.begin_token()
    decode_attn_func(q[-1:], k[-1:], v[-1:], cache=cache, layer=1, cp_group=group)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        spava_attn_func(ql, kl, vl, layout=layout, cp_group=group)
        cache.store_prefill(1, kl, vl)
        cache.begin_token()
        decode_attn_func(q[-1:], k[-1:], v[-1:], cache=cache, layer=1, cp_group=group)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_no_host_sync_in_the_per_layer_path(world):
    if _gpus() < world:
        pytest.skip(f"needs {world} GPUs, found {_gpus()}")
    assert all(run_ranks(_no_sync_rank, world, 16384, 64, backend="nccl", timeout=300))


@pytest.mark.parametrize("grid", [(4, 8, 8), (3, 6, 10)])  # uniform windows (slab path); ragged
def test_vision_encoder_compiled_matches_hf_on_cuda(grid):
    """The vision encoder with torch.compile'd elementwise stages (the CUDA default) against
    HF transformers' own vision model, float32 on the GPU; also fed from pinned host pixels."""
    if not _gpus():
        pytest.skip("needs a GPU")
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_spava.models.common.checkpoint_io import single_process_parallel_state
    from megatron_spava.models.qwen2_5_vl.convert import load_hf_into_model
    from megatron_spava.models.qwen2_5_vl.model import Qwen25VLModel, encode_video_frame_parallel
    from megatron_spava.models.qwen2_5_vl.tiny import tiny_hf_config, tiny_hf_model
    from megatron_spava.video.inputs import VideoQAInputs, pin_pixels
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    torch.backends.cudnn.allow_tf32 = False  # HF's Conv3d patch embedding would run in TF32 (~3e-4)
    hf_cfg = tiny_hf_config(vision_depth=4)
    hf = tiny_hf_model(hf_cfg)
    t, h, w = grid
    grid_thw = torch.tensor([list(grid)])
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.model.visual.cuda()(pixels.cuda(), grid_thw=grid_thw.cuda()).pooler_output
    with single_process_parallel_state():
        initialize_rng_tracker(inference_rng_tracker=True)
        model = Qwen25VLModel(Qwen25VLConfig.from_hf(hf_cfg)).eval()
        load_hf_into_model(model, hf.state_dict().items(), tp_rank=0, tp_size=1, progress=False)
        assert model.visual.compile_elementwise
        with torch.no_grad():
            out = model.visual.cuda()(pixels.cuda(), grid_thw)
            # the same from page-locked host pixels, copied without blocking (video.inputs.pin_pixels)
            inputs = pin_pixels(VideoQAInputs(torch.zeros(1, 1, dtype=torch.long), pixels, grid_thw))
            assert inputs.pixel_values_videos.is_pinned() and not pixels.is_pinned()
            pinned = encode_video_frame_parallel(model.visual, inputs.pixel_values_videos, grid_thw)
    err = relative_error(out, ref)
    assert err < 1e-5, err
    assert relative_error(pinned, ref) < 1e-5


@pytest.mark.parametrize("n", [4096, 3000])  # two row counts: the second recompiles with N symbolic
def test_vision_add_rms_norm_compiled_matches_eager_on_cuda(n):
    """The vision encoder's fused residual add + RMSNorm, torch.compile'd (the CUDA default),
    against its eager form in bf16 at the 7B vision width: the stored sum is the eager bf16 sum
    bit for bit, and the norm reads that rounded sum (outputs differ from eager in under 1% of
    elements, by at most one bf16 step: reduction order; a norm of the unrounded sum, or one
    skipping the round before the scale, differs in about a quarter of them)."""
    if not _gpus():
        pytest.skip("needs a GPU")
    from megatron_spava.models.qwen2_5_vl.vision import fused
    gen = torch.Generator().manual_seed(n)
    x, y = (torch.randn(n, 1280, generator=gen).cuda().bfloat16() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(1280, generator=gen)).cuda().bfloat16()
    s, h = fused("add_rms_norm", x, 3 * y, weight, 1e-6, compile=True)
    s_ref, h_ref = fused("add_rms_norm", x, 3 * y, weight, 1e-6, compile=False)
    assert torch.equal(s, s_ref)
    assert (h != h_ref).float().mean().item() < 0.01
    torch.testing.assert_close(h, h_ref, rtol=2 ** -7, atol=1e-6)


def test_vision_encoder_compiled_matches_eager_in_bf16_on_cuda():
    """The whole tiny encoder in bf16 on the GPU, compiled elementwise stages against eager."""
    if not _gpus():
        pytest.skip("needs a GPU")
    from megatron_spava.models.common.checkpoint_io import single_process_parallel_state
    from tests.test_qwen2_5_vl import _tiny_vision_encoder
    grid_thw = torch.tensor([[4, 8, 8]])
    pixels = torch.randn(4 * 8 * 8, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3)).cuda()
    with single_process_parallel_state(), torch.no_grad():
        visual = _tiny_vision_encoder(torch.bfloat16).cuda()
        assert visual.compile_elementwise
        out = visual(pixels, grid_thw)
        visual.compile_elementwise = False
        ref = visual(pixels, grid_thw)
    assert relative_error(out, ref) < 2e-2
