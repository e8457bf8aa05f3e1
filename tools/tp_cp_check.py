#!/usr/bin/env python3
"""Correctness of TP x CP grids against TP=1 x CP=1 (prefill + greedy decode of one synthetic
video prompt under every grid and algorithm): the command of `megatron_spava.perf.tp_cp_check` (see --help).

    python tools/tp_cp_check.py --nproc 4
"""

import sys

from megatron_spava.perf.tp_cp_check import main

if __name__ == "__main__":
    sys.exit(main())
