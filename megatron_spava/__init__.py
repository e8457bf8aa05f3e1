"""megatron_spava: Spava sequence-parallel approximate attention for Megatron-Core.

Public API::

    from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
"""

from .compat import silence_no_cuda_runtime_warning

silence_no_cuda_runtime_warning()  # before anything imports megatron.core

from .config import SpavaConfig  # noqa: E402
from .algos.spava import SpavaLayout, spava_attn_func  # noqa: E402

__all__ = ["SpavaConfig", "SpavaLayout", "spava_attn_func"]
__version__ = "0.1.0"
