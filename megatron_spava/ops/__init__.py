"""Generic tensor operations the CP algorithms are built from: the attention primitive and
its LSE merge (kernel choice included), and fused kernels (`lse_score`). An algorithm's
own logic (Spava's passing-block selection) lives with the algorithm in `algos/`."""

from .attention import attend, merge_partials

__all__ = ["attend", "merge_partials"]
