"""Checkpoint conversion that cannot lose or mix data (issue 21): the shipped model
round-trips through the CLI bit-exactly, --out is refused when it is not new/empty or
overlaps the input, damaged inputs are one line naming the file, the read-back check
catches a bad write, and Ctrl-C / SIGTERM / SIGKILL leave no output and no process."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_spava.models.common import checkpoint_io
from megatron_spava.models.common.checkpoint_io import iter_hf_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
SHIPPED = os.path.join(ROOT, "megatron_spava", "assets", "needle_qwen")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _tool(*args, env=ENV):
    return subprocess.run([sys.executable, TOOL, *args, "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=300)


def _error_line(out):
    """The one line an error prints (stderr, besides the transformer-impl note)."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("transformer impl")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def _assert_same_tensors(a_dir, b_dir):
    a, b = dict(iter_hf_tensors(a_dir)), dict(iter_hf_tensors(b_dir))
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert b[name].dtype == t.dtype and b[name].shape == t.shape and torch.equal(b[name], t), name
    return len(a)


@pytest.fixture(scope="module")
def shipped_mg(tmp_path_factory):
    """The shipped model converted to a dist checkpoint through the CLI."""
    mg = str(tmp_path_factory.mktemp("conv") / "mg")
    out = _tool("hf-to-megatron", "--hf-path", SHIPPED, "--out", mg)
    assert out.returncode == 0, out.stderr[-2000:]
    return mg


@pytest.mark.slow
def test_shipped_model_round_trips_bit_exactly_through_the_cli(shipped_mg, tmp_path):
    back = str(tmp_path / "hf")
    out = _tool("megatron-to-hf", "--megatron-path", shipped_mg, "--out", back)
    assert out.returncode == 0, out.stderr[-2000:]
    # every tensor of the original (model.language_model.* names, 93 of them), same names,
    # dtypes and bits
    assert _assert_same_tensors(SHIPPED, back) == 93
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        with open(os.path.join(SHIPPED, name)) as f, open(os.path.join(back, name)) as g:
            assert f.read() == g.read(), name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left


@pytest.mark.slow  # several CLI processes end to end (15-21 s)
def test_out_must_be_new_or_empty_and_force_replaces_it_whole(shipped_mg, tmp_path):
    out_dir = tmp_path / "hf"
    out_dir.mkdir()
    # an earlier sharded conversion: its index would win over a new model.safetensors
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "old.safetensors"}}))
    (out_dir / "old.safetensors").write_text("old")
    out = _tool("megatron-to-hf", "--megatron-path", shipped_mg, "--out", str(out_dir))
    assert out.returncode == 2 and "is not empty; pass --force" in _error_line(out)
    assert sorted(os.listdir(out_dir)) == ["model.safetensors.index.json", "old.safetensors"]  # untouched
    out = _tool("megatron-to-hf", "--megatron-path", shipped_mg, "--out", str(out_dir), "--force")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model.safetensors.index.json" not in os.listdir(out_dir)
    assert "old.safetensors" not in os.listdir(out_dir)
    _assert_same_tensors(SHIPPED, str(out_dir))
    # an empty folder is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _tool("megatron-to-hf", "--megatron-path", shipped_mg, "--out", str(empty)).returncode == 0
    # a user's files in a megatron --out are not overwritten either
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    out = _tool("hf-to-megatron", "--hf-path", SHIPPED, "--out", str(mine))
    assert out.returncode == 2 and "not empty" in _error_line(out)
    assert (mine / "config.json").read_text() == "{}"


@pytest.mark.slow  # several CLI processes end to end (15-21 s)
def test_out_overlapping_the_input_is_refused(shipped_mg, tmp_path):
    import shutil
    hf = str(tmp_path / "hf")
    shutil.copytree(SHIPPED, hf)
    before = sorted(os.listdir(hf))
    for args in (("hf-to-megatron", "--hf-path", hf, "--out", hf, "--force"),
                 ("hf-to-megatron", "--hf-path", hf, "--out", os.path.join(hf, "sub")),
                 ("hf-to-megatron", "--hf-path", os.path.join(hf, "."), "--out", hf + "/../hf", "--force"),
                 ("megatron-to-hf", "--megatron-path", shipped_mg, "--out", shipped_mg, "--force"),
                 ("hf-to-megatron", "--hf-path", hf, "--out", str(tmp_path), "--force")):  # input inside out
        out = _tool(*args)
        assert out.returncode == 2, args
        assert "inside" in _error_line(out), out.stderr
    assert sorted(os.listdir(hf)) == before


@pytest.mark.parametrize("damage", ["no-meta", "bad-meta", "truncated-distcp", "no-.metadata", "no-common.pt",
                                    "bad-common.pt", "truncated-safetensors"])
def test_damaged_input_is_one_line_naming_the_file(shipped_mg, tmp_path, damage):
    import shutil
    if damage == "truncated-safetensors":
        src = str(tmp_path / "hf")
        shutil.copytree(SHIPPED, src)
        path = os.path.join(src, "model.safetensors")
        os.truncate(path, 100_000)
        args = ("hf-to-megatron", "--hf-path", src)
    else:
        src = str(tmp_path / "mg")
        shutil.copytree(shipped_mg, src)
        if "common.pt" in damage and not os.path.exists(os.path.join(src, "common.pt")):
            # megatron-core 0.19+ keeps the common state inside the .distcp files
            # (compat.dist_checkpoint_common_state): truncated-distcp damages it there
            pytest.skip("this megatron-core writes no common.pt (common state inside the torch_dist files)")
        # the largest .distcp file (megatron-core 0.16.1 names it __0_1.distcp, 0.19 __0_0.distcp)
        distcp = max((n for n in os.listdir(src) if n.endswith(".distcp")),
                     key=lambda n: os.path.getsize(os.path.join(src, n)))
        name = {"no-meta": "megatron_spava_meta.json", "bad-meta": "megatron_spava_meta.json",
                "truncated-distcp": distcp, "no-.metadata": ".metadata", "no-common.pt": "common.pt",
                "bad-common.pt": "common.pt"}[damage]
        path = os.path.join(src, name)
        if damage.startswith("no-"):
            os.remove(path)
        elif damage == "truncated-distcp":
            os.truncate(path, 1000)
        else:
            with open(path, "w") as f:
                f.write("{not json")
        args = ("megatron-to-hf", "--megatron-path", src)
    out = _tool(*args, "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    line = _error_line(out)
    assert path in line and ("missing" in line or "damaged" in line or "truncated" in line), line
    assert not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_read_back_check_catches_a_bad_write(tmp_path, monkeypatch):
    """A writer that corrupts one tensor (stands in for a disk or library fault) is caught by
    the read-back comparison, in both directions, and nothing lands at the output."""
    import safetensors.torch
    from megatron_spava.models.qwen2_5_vl.convert import CONVERSION

    real_save = checkpoint_io.save_dist

    def corrupting_save(state, out_dir):
        key = next(k for k in state if k.endswith("final_layernorm.weight"))
        with torch.no_grad():
            state[key].data.add_(1.0)
        real_save(state, out_dir)

    monkeypatch.setattr(checkpoint_io, "save_dist", corrupting_save)
    with pytest.raises(ValueError, match="read-back check failed: model.language_model.norm.weight"):
        checkpoint_io.hf_to_dist(CONVERSION, SHIPPED, str(tmp_path / "mg"), progress=False)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(checkpoint_io, "save_dist", real_save)
    mg = checkpoint_io.hf_to_dist(CONVERSION, SHIPPED, str(tmp_path / "mg"), progress=False)

    real_save_file = safetensors.torch.save_file

    def corrupting_save_file(tensors, path, metadata=None):
        name = sorted(tensors)[0]
        tensors = {**tensors, name: tensors[name] + 1}
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", corrupting_save_file)
    with pytest.raises(ValueError, match="read-back check failed"):
        checkpoint_io.dist_to_hf(CONVERSION, mg, str(tmp_path / "hf"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["mg"]


def _start_stalled_conversion(out_dir):
    """hf-to-megatron of the shipped model, its dist checkpoint writers stalled mid-write;
    returns the process once a writer says it stalls, and its descendants then."""
    p = subprocess.Popen([sys.executable, TOOL, "hf-to-megatron", "--hf-path", SHIPPED, "--out", out_dir,
                          "--no-progress"], stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**ENV, checkpoint_io.STALL_ENV: "dist-save"})
    for line in p.stderr:
        if "stalls" in line:
            break
    else:
        raise AssertionError(f"the converter ended before stalling: rc {p.wait()}")
    time.sleep(0.3)
    children = psutil.Process(p.pid).children(recursive=True)
    from megatron_spava.compat import dist_save_forks_writers
    if dist_save_forks_writers():  # megatron-core 0.16.1; from 0.17 the writers are threads
        assert children  # the writer processes
    return p, children


def _gone(procs, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [c for c in procs if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    for c in alive:
        c.kill()
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_interrupted_conversion_leaves_no_output_and_no_process(tmp_path, how):
    out_dir = str(tmp_path / "mg")
    p, children = _start_stalled_conversion(out_dir)
    start = time.time()
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    else:
        p.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    try:
        rest = p.stderr.read()
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert time.time() - start < 10
    assert _gone(children), "helper processes outlived the converter"
    assert not os.path.exists(out_dir)
    if how == "sigkill":
        assert rc == -signal.SIGKILL
        # the next conversion into the same --out removes the dead one's temporary folder
        assert [n for n in os.listdir(tmp_path) if ".partial-" in n]
        out = _tool("hf-to-megatron", "--hf-path", SHIPPED, "--out", out_dir)
        assert out.returncode == 0, out.stderr[-2000:]
        assert sorted(os.listdir(tmp_path)) == ["mg"]
    else:
        assert rc == (130 if how == "ctrl-c" else 143)
        assert "interrupted (SIG" in rest and "Traceback" not in rest
        assert os.listdir(tmp_path) == []
