#!/usr/bin/env python3
"""Ring attention micro-benchmark: the command of `megatron_spava.perf.bench_ring` (see --help).

    torchrun --standalone --nproc-per-node 4 tools/bench_ring.py --tokens 131072
"""

import sys

from megatron_spava.perf.bench_ring import main

if __name__ == "__main__":
    sys.exit(main())
