import os
import sys

import pytest
import torch

# The tools (tools/*.py, scripts rather than a package) import each other by name; tests
# import them the same way.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

if torch.cuda.is_available():
    # Where Transformer Engine is installed, megatron.core imports it, and TE loads its cuDNN
    # libraries when first imported. Imported after torch has run a cuDNN kernel, that load
    # fails on the GPU machines ("libcudnn_cnn.so.9: undefined symbol ...", 2026-12-01), so
    # import it before any test runs a kernel, as every program of ours does at start-up.
    try:
        import megatron.core  # noqa: F401
    except Exception:
        pass



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
