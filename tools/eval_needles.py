#!/usr/bin/env python3
"""Needle-task accuracy of every context-parallel algorithm through the project's Megatron
path: the command of `megatron_spava.tasks.evaluate` (also the console script
megatron-spava-eval-needles; see --help)."""

import sys

from megatron_spava.tasks.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
