"""megatron_spava: Spava sequence-parallel approximate attention for Megatron-Core.

Public API::

    from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
"""

from .config import SpavaConfig
from .algos.spava import SpavaLayout, spava_attn_func

__all__ = ["SpavaConfig", "SpavaLayout", "spava_attn_func"]
__version__ = "0.1.0"
