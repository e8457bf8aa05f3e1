"""Tensor operations Spava is built from: the attention primitive and passing-block selection."""

from .attention import attend, merge_partials
from .selection import SCORERS, record_selection, register_scorer, select_passing, selection_scores

__all__ = ["attend", "merge_partials", "SCORERS", "record_selection", "register_scorer",
           "select_passing", "selection_scores"]
