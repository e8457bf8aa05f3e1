#!/usr/bin/env python3
"""Needle-task accuracy of every context-parallel algorithm through the project's Megatron
path: the same program as `python -m megatron_spava.tasks.evaluate` (see --help)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_spava.tasks.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
