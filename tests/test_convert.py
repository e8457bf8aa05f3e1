"""Checkpoint conversion: HF -> megatron-core dist checkpoint -> (TP=2) -> HF is bit-exact,
and a converted model reproduces HF's logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_spava.models.common.checkpoint_io import iter_hf_tensors
from megatron_spava.models.qwen2_5_vl.tiny import tiny_hf_config, tiny_hf_model
from megatron_spava.testing import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def _tp2_reload_and_resave(src, dst, hf_dir):
    """On 2 ranks: load the dist checkpoint at TP=2, compare logits with HF, save it again."""
    from megatron_spava import cpu_compat
    cpu_compat.apply()
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron_spava.context import cp_request
    from megatron_spava.algos import plan_layout
    from megatron_spava.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLModel
    from megatron_spava.models.qwen2_5_vl.convert import load_dist_into_model

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    initialize_rng_tracker(inference_rng_tracker=True)
    cfg = Qwen25VLConfig.from_hf(src)
    model = Qwen25VLModel(cfg, tensor_parallel=2, dtype=torch.float32,
                          perform_initialization=False).eval()
    load_dist_into_model(model, src)
    ids = torch.randint(0, 240, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cp_request(plan_layout("full", context_len=40, query_len=0, cp_size=1)):
        logits = model(model.decoder_input(ids), torch.arange(40).expand(3, 1, -1))
    os.makedirs(dst, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), dst)
    if dist.get_rank() == 0:
        for name in ("config.json", "megatron_spava_meta.json"):
            with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
                g.write(f.read())
    dist.barrier()
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True])  # untied: test_families.py::test_round_trip_and_tp2_cp2_match_hf[qwen2_5_vl]
def test_hf_to_megatron_tp2_to_hf_is_bit_exact(tmp_path, tie):
    hf_dir, meg, meg2, back = (str(tmp_path / n) for n in ("hf", "meg", "meg_tp2", "back"))
    hf = tiny_hf_model(tiny_hf_config(tie=tie), dtype=torch.float32)
    hf.save_pretrained(hf_dir)
    out = _tool("hf-to-megatron", "--hf-path", hf_dir, "--out", meg, "--tensor-model-parallel-size", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loading HF weights" in out.stderr  # the progress bar
    logits = run_ranks(_tp2_reload_and_resave, 2, meg, meg2, hf_dir, timeout=300)
    ids = torch.randint(0, 240, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=torch.arange(40).expand(3, 1, -1)).logits
    for lg in logits:
        torch.testing.assert_close(lg, ref, rtol=1e-5, atol=1e-5)
    out = _tool("megatron-to-hf", "--megatron-path", meg2, "--out", back)
    assert out.returncode == 0, out.stderr[-2000:]
    original, again = dict(iter_hf_tensors(hf_dir)), dict(iter_hf_tensors(back))
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))


@pytest.mark.slow
def test_bf16_round_trip_and_sharded_output(tmp_path):
    hf_dir, meg, back = (str(tmp_path / n) for n in ("hf", "meg", "back"))
    tiny_hf_model(tiny_hf_config(), dtype=torch.bfloat16).save_pretrained(hf_dir)
    assert _tool("hf-to-megatron", "--hf-path", hf_dir, "--out", meg, "--no-progress").returncode == 0
    out = _tool("megatron-to-hf", "--megatron-path", meg, "--out", back, "--max-shard-gb", "0.0001")
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
    original, again = dict(iter_hf_tensors(hf_dir)), dict(iter_hf_tensors(back))
    assert all(torch.equal(again[k], v) and again[k].dtype == torch.bfloat16 for k, v in original.items())


@pytest.mark.slow  # several CLI processes end to end (15-21 s)
def test_conversion_errors_are_clear(tmp_path):
    out = _tool("hf-to-megatron", "--hf-path", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "not found" in out.stderr
    hf_dir = str(tmp_path / "hf")
    tiny_hf_model(tiny_hf_config()).save_pretrained(hf_dir)
    out = _tool("hf-to-megatron", "--hf-path", hf_dir, "--out", str(tmp_path / "o"),
                "--tensor-model-parallel-size", "3")
    assert out.returncode == 2 and "not divisible by tensor parallel size 3" in out.stderr
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg["text_config"]["num_key_value_heads"] = 3
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
    out = _tool("hf-to-megatron", "--hf-path", hf_dir, "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "num_key_value_heads 3" in out.stderr
