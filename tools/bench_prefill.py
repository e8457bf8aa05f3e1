#!/usr/bin/env python3
"""Video prefill time to first token, every algorithm in one run: the command of
`megatron_spava.perf.bench_prefill` (also the console script megatron-spava-bench-prefill).

    torchrun --standalone --nproc-per-node 4 tools/bench_prefill.py --shape 7b --tokens 131072
    python tools/bench_prefill.py --help
"""

import os
import sys

from megatron_spava.perf.bench_prefill import main, parse_args  # noqa: F401  (parse_args: tests load it)

if __name__ == "__main__":
    from megatron_spava.launch import quiet_known_warnings
    quiet_known_warnings("--verbose" in sys.argv[1:], announce="RANK" not in os.environ)
    sys.exit(main())
