"""The emulated rank (megatron_spava.perf.emulate, `--emulate-rank R --emulate-cp W`) does
the work of the real rank: PyTorch's own FLOP counter (`torch.utils.flop_counter`, as
tests/test_roofline.py uses it) inside `generate` counts, per aten op, the same FLOPs on
rank R of a W-rank gloo run and on rank R emulated alone in one process (every collective a
local stand-in, `distributed.EmulatedGroup`), with the LLM weights sharded over the CP
group in both, for several algorithms at a tiny shape; every core-attention call returns
the same shape, and so do the vision embeddings and the first-token logits. The comparison can fail: a
stand-in that skips the vision encoder's compute, or the wrong rank, counts other FLOPs."""

import pytest
import torch
import torch.distributed as dist

from megatron_spava.testing import run_ranks

TOKENS = 1200
W = 2
ALGOS = ["spava", "ring", "apb"]


def _cpu_attention_flops(q, k, v, dropout=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    b, h, sq, d = q
    return int(4 * b * h * sq * k[2] * d / (2 if is_causal else 1))


def _count(algos, emulate_ranks=None, skip_vision=False):
    """On this process: {(algo, rank): {"flops": {op: count}, "shapes": [...]}} of a tiny
    Qwen2.5-VL prefill. emulate_ranks None: this is a real rank of a W-rank gloo run;
    else: each rank listed is emulated in this one process (world of 1). skip_vision: a
    broken stand-in for the check that the comparison can fail (the video embeddings come
    back in their true shape, but no encoder runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_spava import cpu_compat
    from megatron_spava.distributed import EmulatedGroup
    from megatron_spava.inference.generate import generate
    from megatron_spava.modules import SpavaCoreAttention
    from megatron_spava.perf import bench_prefill as bp
    from megatron_spava.perf import emulate as em
    from megatron_spava.perf import inputs as prompts
    cpu_compat.apply()
    device = torch.device("cpu")
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    emulated = emulate_ranks is not None
    out = {}
    for algo in algos:
        for me in (emulate_ranks if emulated else [dist.get_rank()]):
            model, ps = bp.build("tiny", 1 if emulated else W, 0, device)
            group = EmulatedGroup(me, W) if emulated else ps.get_context_parallel_group()
            if emulated:
                em.emulate(model, group)
            model.shard_weights(group)
            shapes = []
            for m in model.modules():
                if isinstance(m, SpavaCoreAttention):
                    m.register_forward_hook(lambda mod, a, o: shapes.append(("attention", tuple(o.shape))))
            encode = model.encode_video

            def encode_video(inputs, cp_group):
                if skip_vision:  # the broken stand-in: the true shape, no encoder work
                    rows = int(model.vision_ordinals(inputs.input_ids).max()) + 1
                    e = torch.zeros(rows, model.cfg.hidden_size)
                else:
                    e = encode(inputs, cp_group)
                shapes.append(("vision", tuple(e.shape)))
                return e
            model.encode_video = encode_video
            inputs = prompts.synthetic_inputs(model.cfg, TOKENS, 0)
            name, config = bp.algo_and_config(algo)
            with FlopCounterMode(display=False, custom_mapping=mapping, depth=None) as fc:
                result = generate(model, inputs, algo=name, config=config, cp_group=group,
                                  group=group if emulated else None, max_new_tokens=1, eos_token_ids=[],
                                  device=device)
            shapes.append(("logits", tuple(result.first_logits.shape)))
            out[(algo, me)] = dict(flops={str(k): v for k, v in fc.get_flop_counts()["Global"].items()},
                                   shapes=shapes)
    return out


def _real():
    per_rank = run_ranks(_count, W, ALGOS, timeout=300)
    return {k: v for r in per_rank for k, v in r.items()}


def test_emulated_rank_does_the_real_ranks_flops():
    real = _real()
    emulated = run_ranks(_count, 1, ALGOS, list(range(W)), timeout=300)[0]
    for algo in ALGOS:
        for me in range(W):
            got, want = emulated[(algo, me)], real[(algo, me)]
            assert sum(want["flops"].values()) > 0
            assert got["flops"] == want["flops"], (algo, me, got["flops"], want["flops"])
            assert got["shapes"] == want["shapes"], (algo, me)
    # apb's ranks differ in work (the passing prefix grows with the rank): the comparison
    # resolves one rank from another
    assert real[("apb", 0)]["flops"] != real[("apb", 1)]["flops"]
    # and a stand-in that skips a part (the vision encoder's compute) is caught
    broken = run_ranks(_count, 1, ["spava"], [1], True, timeout=300)[0]
    assert broken[("spava", 1)]["shapes"] == real[("spava", 1)]["shapes"]
    assert broken[("spava", 1)]["flops"] != real[("spava", 1)]["flops"]


def test_emulation_arguments():
    from megatron_spava.distributed import EmulatedGroup, group_rank_world
    from megatron_spava.perf.emulate import check_args
    assert group_rank_world(EmulatedGroup(2, 4)) == (2, 4)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        EmulatedGroup(4, 4)
    assert "needs --emulate-cp" in check_args(1, None)
    assert "[0, 4)" in check_args(5, 4)
    assert "cannot be emulated" in check_args(None, 4, ["megatron-p2p"])
    assert check_args(None, 4) is None


def test_emulated_all_gather_returns_w_copies():
    from megatron_spava.distributed import EmulatedGroup, all_gather, ring_exchange
    local = torch.arange(6.0).view(2, 3)
    out = torch.empty(8, 3)
    assert all_gather(out, local, EmulatedGroup(1, 4), 4, async_op=True) is None
    assert torch.equal(out, local.repeat(4, 1))
    assert torch.equal(ring_exchange(local, EmulatedGroup(1, 4), 1, 4)(), local)


def test_fp8_errors_are_one_line_before_anything_starts():
    """--fp8-format on the CPU, without TE or with local layers: one line, exit 2, no rank
    started (the parser refuses it); mxfp8 below Blackwell and GPUs without FP8 likewise."""
    import subprocess
    import sys

    from megatron_spava.fp8 import fp8_error
    out = subprocess.run([sys.executable, "-m", "megatron_spava.perf.bench_prefill", "--shape", "tiny",
                          "--device", "cpu", "--tokens", "1200", "--fp8-format", "e4m3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "FP8 runs on a CUDA GPU" in out.stderr and "Traceback" not in out.stderr
    assert "starting" not in out.stdout
    assert fp8_error(None, "delayed", "cpu", "local") is None
    assert "on the CPU" in fp8_error("e4m3", "delayed", "cpu", None)
    from megatron_spava.specs import te_available
    if te_available():  # with TE (a GPU machine); the capability is given, not read
        assert "--transformer-impl transformer_engine" in fp8_error("e4m3", "delayed", "cuda", "local")
        assert "no FP8 tensor cores" in fp8_error("hybrid", "delayed", "cuda", None, capability=(8, 0))
        assert "Blackwell-only" in fp8_error("e4m3", "mxfp8", "cuda", None, capability=(9, 0))
        assert fp8_error("e4m3", "tensorwise", "cuda", None, capability=(9, 0)) is None
    else:
        assert "does not import" in fp8_error("e4m3", "delayed", "cuda", None, capability=(9, 0))


def test_set_fp8_sets_megatron_cores_fields_on_the_language_model_only():
    """set_fp8 is megatron-core's mechanism: TransformerConfig.fp8 / fp8_recipe on every
    config of the language model (its TransformerBlock enters get_fp8_context from them); the
    vision encoder's configs are untouched; None switches back to the model's dtype."""
    run_ranks(_set_fp8_body, 1, timeout=120)


def _set_fp8_body():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_spava import cpu_compat
    from megatron_spava.fp8 import set_fp8
    from megatron_spava.perf import bench_prefill as bp
    cpu_compat.apply()
    model, _ = bp.build("tiny", 1, 0, torch.device("cpu"))

    def configs(module):
        return [m.config for m in module.modules() if isinstance(getattr(m, "config", None), TransformerConfig)]
    lm = configs(model.language_model)
    assert lm and all(c.fp8 is None for c in lm)
    set_fp8(model, "e4m3", "tensorwise")
    assert all(c.fp8 == "e4m3" and c.fp8_recipe == Fp8Recipe.tensorwise for c in configs(model.language_model))
    assert all(c.fp8 is None for c in configs(model.visual))
    set_fp8(model, None)
    assert all(c.fp8 is None for c in configs(model.language_model))


class _Rows(torch.nn.Module):
    """A linear that, like a Megatron TE linear, returns (output, bias) and records the row
    counts it was called with."""

    def __init__(self):
        super().__init__()
        self.proj, self.rows = torch.nn.Linear(8, 5), []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.proj(x), None


@pytest.mark.parametrize("s", [1, 15, 16, 17, 45])
def test_pad_tokens_gives_fp8_gemms_whole_tiles_and_the_caller_its_rows(s):
    """fp8.pad_tokens (megatron-core's FP8 inference padding, with torch's padding): while FP8
    is on the wrapped linear sees a multiple of 16 rows and the caller gets the unpadded
    linear's output for its s rows; with FP8 off it passes through unpadded."""
    from megatron_spava.fp8 import FP8_ROWS, pad_tokens
    m, on = _Rows(), [True]
    x = torch.randn(s, 2, 8)
    want = m.proj(x)
    wrapped = pad_tokens(m.forward, lambda: on[0])
    out, bias = wrapped(x)
    assert bias is None and out.shape == (s, 2, 5) and m.rows[-1] % FP8_ROWS == 0 and m.rows[-1] - s < FP8_ROWS
    torch.testing.assert_close(out, want)
    on[0] = False
    out, _ = wrapped(x)
    assert m.rows[-1] == s
    torch.testing.assert_close(out, want)


def test_fp8_pads_each_mlp_once_and_the_other_linears_alone():
    """fp8.padding_units: an MLP is one padding unit (fc1, activation and fc2 run on its padded
    rows, so fc2's wide input is not copied again), the attention's linears are padded alone;
    wrapping those units with pad_tokens leaves the tiny model's logits as they were (the
    linears' types stand in for TE's, which the CPU lacks)."""
    run_ranks(_padding_units_body, 1, timeout=180)


def _padding_units_body():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.mlp import MLP

    from megatron_spava import cpu_compat
    from megatron_spava.fp8 import FP8_ROWS, pad_tokens, padding_units
    from megatron_spava.inference.generate import generate
    from megatron_spava.perf import bench_prefill as bp
    from megatron_spava.perf import inputs as prompts
    cpu_compat.apply()
    device = torch.device("cpu")
    model, _ = bp.build("tiny", 1, 0, device)
    model = model.float()
    types = (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)
    lm = model.language_model
    units = padding_units(lm, types)
    mlps = [m for m in lm.modules() if isinstance(m, MLP)]
    assert mlps and all(any(u is m for u in units) for m in mlps)
    inside = {id(c) for m in mlps for c in m.modules() if c is not m}
    assert not any(id(u) in inside for u in units)
    attn_linears = [m for name, m in lm.named_modules() if name.endswith(("linear_qkv", "linear_proj"))]
    assert attn_linears and all(any(u is m for u in units) for m in attn_linears)
    assert padding_units(lm, ()) == []

    inputs = prompts.synthetic_inputs(model.cfg, 700, 0)
    run = lambda: generate(model, inputs, algo="full", max_new_tokens=1, eos_token_ids=[],  # noqa: E731
                           device=device).first_logits.float()
    want = run()
    rows, given = [], []
    for m in mlps:
        m.register_forward_pre_hook(lambda mod, args: given.append(args[0].shape[0]))  # before the padding
        m.linear_fc2.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    for u in units:
        u.forward = pad_tokens(u.forward, lambda: True)
    got = run()
    assert given and any(r % FP8_ROWS for r in given), given  # the prompt's rows need padding
    assert len(rows) == len(given) and all(r % FP8_ROWS == 0 and 0 <= r - g < FP8_ROWS for r, g in zip(rows, given))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pad_tokens_refuses_sequence_parallel_linears():
    from megatron_spava.fp8 import pad_tokens
    m = _Rows()
    m.sequence_parallel = True
    with pytest.raises(ValueError, match="sequence-parallel"):
        pad_tokens(m.forward, lambda: True)


def _te():
    from megatron_spava.specs import te_available
    return te_available()


def _fp8_logits(recipe):
    """On one GPU: the first-token logits of a tiny Qwen2.5-VL prefill on TE layers, bf16 and
    with the language model's linears in FP8 (`set_fp8`), same model and prompt."""
    from megatron_spava.fp8 import fp8_error, set_fp8
    from megatron_spava.inference.generate import generate
    from megatron_spava.perf import bench_prefill as bp
    from megatron_spava.perf import inputs as prompts
    device = torch.device("cuda", torch.cuda.current_device())
    assert fp8_error("e4m3", recipe, device, "transformer_engine") is None
    model, ps = bp.build("tiny", 1, 0, device, backend="transformer_engine")
    inputs = prompts.synthetic_inputs(model.cfg, 2048, 0)
    out = {}
    for fmt in (None, "e4m3", None):
        set_fp8(model, fmt, recipe)
        for _ in range(2):  # delayed scaling: the second forward uses the first one's amax
            logits = generate(model, inputs, algo="full", max_new_tokens=1, eos_token_ids=[],
                              device=device).first_logits
        out.setdefault(str(fmt), []).append(logits.float())
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not _te(), reason="needs Transformer Engine")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_linears_change_the_logits_a_little_and_switch_back(recipe):
    out = run_ranks(_fp8_logits, 1, recipe, backend="nccl", timeout=300)[0]
    bf16, again, fp8 = out["None"][0], out["None"][1], out["e4m3"][0]
    assert float((again - bf16).norm() / bf16.norm()) < 1e-3  # set_fp8(None): the bf16 model again
    err = float((fp8 - bf16).norm() / bf16.norm())
    print(f"FP8 ({recipe}) vs bf16 first-token logits, tiny model: relative error {err:.3g}")
    assert 0 < err < 0.25, err  # FP8 ran (the logits moved) and stayed close


@pytest.mark.cuda
@pytest.mark.skipif(not _te(), reason="needs Transformer Engine")
def test_bench_prefill_emulated_rank_with_fp8_on_one_gpu(tmp_path):
    """The device script's command at the tiny shape: spava's busiest rank of 2 emulated and
    full, bf16 and FP8, per part against floors, a predicted TTFT for the emulated rank."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "megatron_spava.perf.bench_prefill", "--shape", "tiny",
                          "--tokens", "2048", "--algos", "spava", "full", "--emulate-cp", "2",
                          "--transformer-impl", "transformer_engine", "--fp8-format", "e4m3",
                          "--fp8-recipe", "tensorwise", "--fp8-compare", "--repeats", "1", "--warmup", "1",
                          "--json", str(tmp_path / "e.json")], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    d = json.load(open(tmp_path / "e.json"))
    runs = d["runs"]["2048"]
    assert set(runs) == {"spava", "spava@fp8", "full", "full@fp8"}
    assert d["emulated"]["cp"] == 2 and "fp8_gemm_flops_per_s" in d["rates"]
    for r in runs.values():
        assert r["ttft_median_s"] > 0 and all(r["part_floors_s"][p] >= 0 for p in r["parts_median_s"])
    assert runs["spava"]["predicted"]["ttft_s"] >= runs["spava"]["ttft_median_s"]
    assert "FP8 against bf16" in out.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not _te(), reason="needs Transformer Engine")
def test_bench_prefill_times_several_fusions_in_one_process(tmp_path):
    """`--lm-fusions none megatron te-ops`: one model per choice in one process (one set of
    measured rates, so the choices compare within the run), results keyed '<algo>+<fusions>'."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "megatron_spava.perf.bench_prefill", "--shape", "tiny",
                          "--tokens", "2048", "--algos", "spava", "--emulate-cp", "2",
                          "--transformer-impl", "transformer_engine", "--lm-fusions", "none", "megatron", "te-ops",
                          "--repeats", "1", "--warmup", "1", "--json", str(tmp_path / "f.json")],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    d = json.load(open(tmp_path / "f.json"))
    runs = d["runs"]["2048"]
    assert d["lm_fusions"] == ["none", "megatron", "te-ops"]
    assert set(runs) == {"spava+none", "spava+megatron", "spava+te-ops"}
    assert all(r["lm_fusions"] == k.split("+")[1] and r["ttft_median_s"] > 0 for k, r in runs.items())
