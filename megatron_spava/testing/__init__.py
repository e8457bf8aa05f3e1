"""Test utilities: a multi-rank launcher for CPU (gloo) and GPU (NCCL) tests."""

from .multiprocess import RankFailure, run_ranks

__all__ = ["RankFailure", "run_ranks"]
