#!/usr/bin/env python3
"""Passing-block selection micro-benchmark (scores, top-k, gather; the fused lse kernel): the command of `megatron_spava.perf.bench_selection` (see --help).

    python tools/bench_selection.py --block-len 16384 32768 65536 --query-len 64 512
"""

import sys

from megatron_spava.perf.bench_selection import main

if __name__ == "__main__":
    sys.exit(main())
