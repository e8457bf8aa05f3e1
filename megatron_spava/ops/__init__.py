"""Generic tensor operations the CP algorithms are built from: the attention primitive and
its LSE merge (kernel choices included: `merge_partials(impl="triton")` is the fused Triton
merge of `_merge_triton`), and fused kernels (`lse_score`). An algorithm's
own logic (Spava's passing-block selection) lives with the algorithm in `algos/`."""

from .attention import attend, merge_partials

__all__ = ["attend", "merge_partials"]
