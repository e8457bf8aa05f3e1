"""Synthetic long-video needle tasks (VNBench-style) and the small model trained on them."""

from .needles import (ANSWER_WORDS, LABELS, QUESTIONS, TASKS, NeedleSample, eval_set,
                      groups_for_tokens, make_sample, render_frames, score)

__all__ = ["ANSWER_WORDS", "LABELS", "QUESTIONS", "TASKS", "NeedleSample", "eval_set",
           "groups_for_tokens", "make_sample", "render_frames", "score"]
