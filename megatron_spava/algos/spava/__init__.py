"""Spava in one place (SPAVA.md), with its presets `star` and `apb` (section 5).

  layout.py     which tokens live on which rank; the star / apb presets (section 1, 5)
  attention.py  `spava_attn_func`: one attention layer on one CP rank (sections 2-3)
  selection.py  the passing-block selection and its table of named scores (section 2)
"""

from .attention import spava_attn_func
from .layout import LocalSegments, SpavaLayout, apb_preset, star_preset

__all__ = ["LocalSegments", "SpavaLayout", "apb_preset", "spava_attn_func", "star_preset"]
