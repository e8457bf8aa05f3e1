"""Which tokens live on which rank under Spava (SPAVA.md section 1).

The layout lives with its algorithm in `megatron_spava.algos.spava`; this module keeps
the public import path `from megatron_spava.layout import SpavaLayout`.
"""

from .algos.spava import LocalSegments, SpavaLayout

__all__ = ["LocalSegments", "SpavaLayout"]
