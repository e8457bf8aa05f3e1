"""megatron_spava: Spava sequence-parallel approximate attention for Megatron-Core.

Public API::

    from megatron_spava import SpavaConfig, SpavaLayout, spava_attn_func
"""

from .config import SpavaConfig
from .core_attention import spava_attn_func
from .layout import SpavaLayout

__all__ = ["SpavaConfig", "SpavaLayout", "spava_attn_func"]
__version__ = "0.1.0"
