"""Transformer Engine on the GPU (skipped without CUDA or without TE): TE layers against
megatron-core's local layers with the same weights (GPT, Qwen2.5-VL, InternVL3),
checkpoints across backends, and the `megatron` algorithm (TE's own context parallelism)
against full attention.

Run on the device, with TE installed (../shared/te/README.md):
    python -m pytest -q -m cuda tests/test_te.py

One GPU is enough: the TP=2 x CP=2 tests run 4 ranks on that GPU over gloo, whose
all-gathers and all-reduces work on CUDA tensors but whose point-to-point ops do not. So
there: `spava` (all-gathers only) and `megatron` with --cp-comm-type all_gather run; TE's
p2p and a2a (point-to-point, all-to-all) and our `ring` (point-to-point) need NCCL, i.e.
4 GPUs, and are skipped with that reason on fewer.
"""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_spava.specs import te_available
from megatron_spava.testing import run_ranks
from megatron_spava.testing.reference import relative_error

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not te_available(),
                                 reason="Transformer Engine (transformer_engine.pytorch) does not import")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, LQ, VOCAB = 512, 16, 512
GPT = dict(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512)


def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _exact_math():
    """No TF32 anywhere (cuBLAS and cuDNN read the override at first use), so float32 runs
    are float32."""
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _tokens():
    return torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(0))


def _gpt(backend, dtype, *, algo="spava", core_attention=None, tp=1, cp=1):
    """A GPT model; local layers are initialised on the CPU from the seed (the same full
    weights at every TP size), TE layers are built on the GPU and get weights loaded."""
    from megatron_spava.models.gpt import build_gpt_model, gpt_config
    local = backend == "local"
    config = gpt_config(**GPT, tensor_parallel=tp, context_parallel=cp, dtype=dtype,
                        use_cpu_initialization=local)
    with torch.device("cpu" if local else "cuda"):
        model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=4096, algo=algo,
                                backend=backend, core_attention=core_attention)
    return model.cuda()


def _prefill(model, layout=None):
    """Logits [1, s_local, V] float32 on the CPU of this rank's rows (layout None: the whole
    prompt without a request, as megatron-core's stock model runs)."""
    from megatron_spava.models.gpt import cp_prefill
    tokens = _tokens().cuda()
    with torch.no_grad():
        if layout is None:
            logits = model(tokens, torch.arange(S, device="cuda")[None], None)
        else:
            logits, _ = cp_prefill(model, tokens, layout)
    torch.cuda.synchronize()
    return logits.float().cpu()


def _backends_rank(dtype_name):
    """Every way to run the same GPT weights on one GPU, in `dtype_name`, and the float32
    local reference."""
    _exact_math()
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import plan_layout
    from megatron_spava.algos.megatron import MegatronLayout, megatron_core_attention
    from megatron_spava.specs import load_state_dict_any_layout
    ps.initialize_model_parallel()
    dtype = getattr(torch, dtype_name)
    reference = _gpt("local", torch.float32)
    state = {k: v for k, v in reference.state_dict().items()}
    out = {"reference": _prefill(reference, plan_layout("full", context_len=S - LQ, query_len=LQ, cp_size=1))}
    full = plan_layout("full", context_len=S - LQ, query_len=LQ, cp_size=1)
    megatron = MegatronLayout.plan(context_len=S - LQ, query_len=LQ, cp_size=1)
    runs = {"local": ("local", "spava", None, full), "te": ("te", "spava", None, full),
            "te_stock": ("te", None, None, None),  # megatron-core's own TE model
            "te_megatron": ("te", "megatron", megatron_core_attention("p2p"), megatron)}
    for name, (backend, algo, core, layout) in runs.items():
        model = _gpt(backend, dtype, algo=algo, core_attention=core)
        assert {p.dtype for p in model.parameters()} == {dtype}, (name, {p.dtype for p in model.parameters()})
        load_state_dict_any_layout(model, state)
        if backend == "te":
            assert any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())
        out[name] = _prefill(model, layout)
        del model
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpt_te_layers_match_local_layers(dtype):
    """TE linears + fused norms (our core attention, megatron-core's stock TE model, and
    TE's own attention as the `megatron` algorithm at CP=1) == local layers, same weights:
    float32 to 2e-3 (TE's float32 attention is its unfused one), bf16 within 2x the local
    layers' own bf16 error."""
    out = run_ranks(_backends_rank, 1, dtype, timeout=180)[0]
    ref = out.pop("reference")
    errors = {name: relative_error(logits, ref) for name, logits in out.items()}
    bound = 2e-3 if dtype == "float32" else 2 * errors["local"] + 1e-3
    print(f"\nGPT {dtype}: relative error vs float32 local layers: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < bound for e in errors.values()), (errors, bound)


def _synthetic_inputs(cfg, n):
    from megatron_spava.perf.inputs import synthetic_inputs
    return synthetic_inputs(cfg, n, 0)


def _convert_rank(tmp):
    """The tiny HF checkpoint, and its dist checkpoint written by local and by TE layers."""
    from megatron.core import parallel_state as ps
    from megatron_spava.models.qwen2_5_vl.convert import hf_to_dist
    from megatron_spava.models.qwen2_5_vl.tiny import make_tiny_checkpoint
    ps.initialize_model_parallel()
    hf = make_tiny_checkpoint(os.path.join(tmp, "hf"))
    return dict(hf=hf, local=hf_to_dist(hf, os.path.join(tmp, "dist_local"), backend="local", progress=False),
                te=hf_to_dist(hf, os.path.join(tmp, "dist_te"), backend="te", progress=False))


@pytest.fixture(scope="module")
def qwen_checkpoints(tmp_path_factory):
    return run_ranks(_convert_rank, 1, str(tmp_path_factory.mktemp("qwen")), timeout=180)[0]


def _qwen_rank(paths, dtype_name):
    """HF / dist checkpoints (written by local and by TE layers) -> TE and local models:
    weights bit-identical, and generate() (prefill + decode) agrees, on TE layers with each
    choice of fusions (`specs.lm_fusion_settings`: the default "megatron", "none", "te-ops");
    the megatron algorithm at CP=1 agrees with full attention on TE layers."""
    _exact_math()
    from unittest import mock
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.algos import plan_layout
    from megatron_spava.algos.megatron import MegatronLayout, megatron_core_attention
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from megatron_spava.inference import generate as gen_module
    from megatron_spava.models.qwen2_5_vl.convert import load_dist_into_model, load_hf_into_model
    from megatron_spava.specs import te_to_local_key

    ps.initialize_model_parallel()
    dtype = getattr(torch, dtype_name)
    hf, ckpt_local, ckpt_te = paths["hf"], paths["local"], paths["te"]
    cfg = Qwen25VLConfig.from_hf(hf)
    initialize_rng_tracker(inference_rng_tracker=True)

    def model(backend, source, core=None, lm_fusions=None):
        m = Qwen25VLModel(cfg, dtype=dtype, backend=backend, core_attention=core,
                          use_cpu_initialization=True, perform_initialization=False, lm_fusions=lm_fusions)
        if source == "hf":
            load_hf_into_model(m, hf, tp_rank=0, tp_size=1, progress=False)
        else:
            load_dist_into_model(m, source)
        return m.cuda().eval()

    def weights(m):
        return {te_to_local_key(n): p.detach().cpu() for n, p in m.named_parameters()}

    local = model("local", ckpt_local)
    reference = weights(local)
    same = {}
    for name, (backend, source) in {"te<-local ckpt": ("te", ckpt_local), "te<-te ckpt": ("te", ckpt_te),
                                    "local<-te ckpt": ("local", ckpt_te), "te<-hf": ("te", "hf")}.items():
        m = model(backend, source)
        w = weights(m)
        same[name] = sorted(w) == sorted(reference) and all(torch.equal(w[k], reference[k]) for k in w)
        del m
    inputs = _synthetic_inputs(cfg, 600)
    real_plan = plan_layout

    def plan(algo, **kw):  # the registry line the lead adds: "megatron" -> MegatronLayout.plan
        return MegatronLayout.plan(**kw) if algo == "megatron" else real_plan(algo, **kw)

    results = {}
    with mock.patch.object(gen_module, "plan_layout", plan):
        for name, backend, algo, core, fusions in (
                ("local", "local", "full", None, None), ("te", "te", "full", None, None),  # te: "megatron" fusions
                ("te_unfused", "te", "full", None, "none"), ("te_ops", "te", "full", None, "te-ops"),
                ("te_megatron", "te", "megatron", megatron_core_attention(), None)):
            m = local if name == "local" else model(backend, ckpt_local, core, fusions)
            out = gen_module.generate(m, inputs, algo=algo, max_new_tokens=4, eos_token_ids=[],
                                      device=torch.device("cuda"))
            results[name] = (out.tokens, out.first_logits.float())
            del m
    return same, results


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_qwen_checkpoints_load_into_both_backends_and_agree(qwen_checkpoints, dtype):
    same, results = run_ranks(_qwen_rank, 1, qwen_checkpoints, dtype, timeout=180)[0]
    assert all(same.values()), same  # a checkpoint converted once loads into either backend, bit-exact
    tokens = {k: v[0] for k, v in results.items()}
    ref = results["local"][1]
    errors = {k: relative_error(v[1], ref) for k, v in results.items() if k != "local"}
    print(f"\nQwen2.5-VL {dtype}: first-token logits vs local layers: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + f"; tokens {tokens}")
    bound = 2e-3 if dtype == "float32" else 3e-2
    assert all(e < bound for e in errors.values()), errors
    if dtype == "float32":
        assert len({tuple(t) for t in tokens.values()}) == 1, tokens  # decode over the cache too


def _internvl_convert_rank(tmp):
    """The tiny InternVL3 HF checkpoint, and its dist checkpoint written by local and by TE layers."""
    from megatron.core import parallel_state as ps
    from megatron_spava.models.internvl3.convert import hf_to_dist
    from megatron_spava.models.internvl3.tiny import tiny_hf_config, tiny_hf_model
    ps.initialize_model_parallel()
    hf = os.path.join(tmp, "hf")
    tiny_hf_model(tiny_hf_config()).save_pretrained(hf)
    return dict(hf=hf, local=hf_to_dist(hf, os.path.join(tmp, "dist_local"), backend="local", progress=False),
                te=hf_to_dist(hf, os.path.join(tmp, "dist_te"), backend="te", progress=False))


@pytest.fixture(scope="module")
def internvl_checkpoints(tmp_path_factory):
    return run_ranks(_internvl_convert_rank, 1, str(tmp_path_factory.mktemp("internvl")), timeout=180)[0]


def _internvl_rank(paths, dtype_name):
    """HF / dist checkpoints (written by local and by TE layers) -> InternVL3 on TE and on
    local LLM layers: weights bit-identical, and the shared generate() (prefill + decode)
    agrees, with full attention and with Spava at CP = 1."""
    _exact_math()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava import SpavaConfig
    from megatron_spava.inference.generate import generate
    from megatron_spava.models.internvl3 import InternVL3Config, InternVL3Model
    from megatron_spava.models.internvl3.convert import load_dist_into_model, load_hf_into_model
    from megatron_spava.specs import te_to_local_key

    ps.initialize_model_parallel()
    dtype = getattr(torch, dtype_name)
    hf, ckpt_local, ckpt_te = paths["hf"], paths["local"], paths["te"]
    cfg = InternVL3Config.from_hf(hf)
    initialize_rng_tracker(inference_rng_tracker=True)

    def model(backend, source):
        m = InternVL3Model(cfg, dtype=dtype, backend=backend, use_cpu_initialization=True,
                           perform_initialization=False)
        if source == "hf":
            load_hf_into_model(m, hf, tp_rank=0, tp_size=1, progress=False)
        else:
            load_dist_into_model(m, source)
        return m.cuda().eval()

    def weights(m):
        return {te_to_local_key(n): p.detach().cpu() for n, p in m.named_parameters()}

    local = model("local", ckpt_local)
    assert not any(n.endswith("layer_norm_weight") for n, _ in local.named_parameters())
    reference = weights(local)
    same = {}
    for name, (backend, source) in {"te<-local ckpt": ("te", ckpt_local), "te<-te ckpt": ("te", ckpt_te),
                                    "local<-te ckpt": ("local", ckpt_te), "te<-hf": ("te", "hf")}.items():
        m = model(backend, source)
        if backend == "te":
            assert any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in m.named_parameters())
        w = weights(m)
        same[name] = sorted(w) == sorted(reference) and all(torch.equal(w[k], reference[k]) for k in w)
        del m
    inputs = _synthetic_inputs(cfg, 600)
    spava = SpavaConfig(budget_align=1, anchor_len=16, passing_len=1024)
    te = model("te", ckpt_local)
    results = {}
    for name, m, algo, config in (("local", local, "full", None), ("te", te, "full", None),
                                  ("te_spava", te, "spava", spava)):
        out = generate(m, inputs, algo=algo, config=config, max_new_tokens=4, eos_token_ids=[],
                       device=torch.device("cuda"))
        results[name] = (out.tokens, out.first_logits.float())
    return same, results


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_internvl_checkpoints_load_into_both_backends_and_agree(internvl_checkpoints, dtype):
    """InternVL3's language model on TE layers (--transformer-impl transformer_engine) ==
    local layers with the same converted weights: first-token logits (float32 to 2e-3,
    bf16 to 3e-2) and, in float32, the decoded tokens."""
    same, results = run_ranks(_internvl_rank, 1, internvl_checkpoints, dtype, timeout=180)[0]
    assert all(same.values()), same
    tokens = {k: v[0] for k, v in results.items()}
    ref = results["local"][1]
    errors = {k: relative_error(v[1], ref) for k, v in results.items() if k != "local"}
    print(f"\nInternVL3 {dtype}: first-token logits vs local layers: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + f"; tokens {tokens}")
    bound = 2e-3 if dtype == "float32" else 3e-2
    assert all(e < bound for e in errors.values()), errors
    if dtype == "float32":
        assert len({tuple(t) for t in tokens.values()}) == 1, tokens


# ---- TP=2 x CP=2 --------------------------------------------------------------------

def _reference_rank():
    _exact_math()
    from megatron.core import parallel_state as ps
    from megatron_spava.algos import plan_layout
    ps.initialize_model_parallel()
    return _prefill(_gpt("local", torch.float32),
                    plan_layout("full", context_len=S - LQ, query_len=LQ, cp_size=1))


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_reference_rank, 1, timeout=120)[0]


def _tp_cp_rank(algo, comm, dtype_name, tp, cp):
    """One rank of TE layers at TP x CP, weights copied from the local model at the same TP
    rank (local layers give the same full weights at every TP size)."""
    _exact_math()
    if dist.get_backend() == "gloo":
        torch.cuda.set_device(0)
    from megatron.core import parallel_state as ps
    from megatron_spava import SpavaConfig
    from megatron_spava.algos import plan_layout
    from megatron_spava.algos.megatron import MegatronLayout, megatron_core_attention
    from megatron_spava.specs import load_state_dict_any_layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    dtype = getattr(torch, dtype_name)
    state = _gpt("local", torch.float32, tp=tp, cp=cp).state_dict()
    if algo == "megatron":
        layout = MegatronLayout.plan(context_len=S - LQ, query_len=LQ, cp_size=cp)
        core = megatron_core_attention(comm)
    else:
        cfg = SpavaConfig(budget_align=1, anchor_len=16, passing_len=S)  # full budget: exact
        layout = plan_layout(algo, context_len=S - LQ, query_len=LQ, cp_size=cp, config=cfg)
        core = None
    model = _gpt("te", dtype, algo=algo, core_attention=core, tp=tp, cp=cp)
    load_state_dict_any_layout(model, state)
    rank = ps.get_context_parallel_rank()
    return ps.get_tensor_model_parallel_rank(), layout.local_indices(rank), _prefill(model, layout)


def _run_tp_cp(algo, comm, dtype, backend):
    results = run_ranks(_tp_cp_rank, 4, algo, comm, dtype, 2, 2, backend=backend, timeout=120)
    return [(idx, logits) for tp_rank, idx, logits in results if tp_rank == 0]


def _check(results, reference, dtype):
    covered = torch.cat([idx for idx, _ in results]).unique()
    assert covered.numel() == S
    errors = [relative_error(logits, reference[:, idx]) for idx, logits in results]
    bound = 2e-3 if dtype == "float32" else 2e-2
    assert max(errors) < bound, errors
    return max(errors)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spava_full_budget_on_te_layers_tp2_cp2(reference, dtype):
    backend = "nccl" if _gpus() >= 4 else "gloo"
    err = _check(_run_tp_cp("spava", None, dtype, backend), reference, dtype)
    print(f"\nspava full budget, TE layers, TP=2 x CP=2 ({backend}), {dtype}: rel. error {err:.2e}")


@pytest.mark.parametrize("comm", ["all_gather", "p2p", "a2a"])
def test_megatron_algorithm_tp2_cp2(reference, comm):
    """TE's own CP (16-bit only: its fused attention) at TP=2 x CP=2 == full attention."""
    if _gpus() >= 4:
        backend = "nccl"
    elif comm == "all_gather":
        backend = "gloo"  # all_gather_into_tensor works on CUDA tensors under gloo
    else:
        pytest.skip(f"--cp-comm-type {comm} needs point-to-point/all-to-all on CUDA tensors: NCCL "
                    f"with 4 GPUs (found {_gpus()}); gloo cannot")
    err = _check(_run_tp_cp("megatron", comm, "bfloat16", backend), reference, "bfloat16")
    print(f"\nmegatron --cp-comm-type {comm}, TP=2 x CP=2 ({backend}), bf16: rel. error {err:.2e}")


def test_ring_on_te_layers_needs_nccl(reference):
    if _gpus() < 4:
        pytest.skip("ring sends K/V point-to-point, which gloo cannot do on CUDA tensors "
                    "(host staging is not implemented); needs NCCL with 4 GPUs")
    _check(_run_tp_cp("ring", None, "bfloat16", "nccl"), reference, "bfloat16")


def test_bench_prefill_runs_megatron_variants_on_one_gpu(tmp_path):
    """tools/bench_prefill.py with Megatron's own CP variants beside ours, tiny shape, one GPU
    (CP = 1: TE's attention without communication; the 4-GPU run is issue 14's): each
    megatron-<comm> builds its own model with TE's core attention and reports a TTFT and a
    roofline floor next to full's."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "tools/bench_prefill.py", "--shape", "tiny", "--device", "cuda",
                          "--tokens", "2048", "--repeats", "1", "--warmup", "1", "--transformer-impl",
                          "transformer_engine", "--algos", "full", "spava", "megatron-p2p", "megatron-all_gather",
                          "--json", str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = json.load(open(tmp_path / "b.json"))["runs"]["2048"]
    assert set(runs) == {"full", "spava", "megatron-p2p", "megatron-all_gather"}
    for r in runs.values():
        assert r["ttft_median_s"] > 0 and r["roofline"]["floor_s"] > 0
    # at CP = 1 Megatron's floor is full's: the same FLOPs on one GPU
    assert runs["megatron-p2p"]["roofline"]["floor_s"] == pytest.approx(runs["full"]["roofline"]["floor_s"])
