import pytest
import torch

if torch.cuda.is_available():
    # Where Transformer Engine is installed, megatron.core imports it, and TE loads its cuDNN
    # libraries when first imported. Imported after torch has run a cuDNN kernel, that load
    # fails on the GPU machines ("libcudnn_cnn.so.9: undefined symbol ...", 2026-12-01), so
    # import it before any test runs a kernel, as every program of ours does at start-up.
    try:
        import megatron.core  # noqa: F401
    except Exception:
        pass



@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """At the end of the session: no child process of the test run is still alive (a rank, a
    checkpoint writer, a multiprocessing manager or resource tracker left behind by a test).
    run_ranks' forkserver (and its resource tracker) is the harness's own, kept for the
    session and left out, as is torch.compile's compile-worker pool (a child of pytest that
    torch keeps for the process, and that pool's own workers, its children with torch 2.11;
    seen on the GPU after test_gpu's compiled vision encoder)."""
    import time

    import psutil
    yield
    me = psutil.Process()

    def leftovers():
        out = []
        for child in me.children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if ("forkserver" in cmd and child.ppid() == me.pid) or "resource_tracker" in cmd:
                continue
            if "_inductor/compile_worker" in cmd:
                continue  # torch.compile's worker pool (test_gpu's compiled vision) and its workers: torch's own, end with pytest

            out.append(f"{child.pid} {cmd[:120]}")
        return out

    deadline = time.time() + 10
    while leftovers() and time.time() < deadline:
        time.sleep(0.5)
    left = leftovers()
    for child in me.children(recursive=True):  # do not leave them running either way
        if any(line.startswith(f"{child.pid} ") for line in left):
            child.kill()
    assert not left, "tests left processes behind:\n" + "\n".join(left)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
