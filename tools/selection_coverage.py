#!/usr/bin/env python3
"""How many needle tokens Spava's passing-block selection keeps, per layer and KV head
(the needle model, through the selection hook): the command of `megatron_spava.tasks.selection_coverage` (see --help).

    python tools/selection_coverage.py
"""

import sys

from megatron_spava.tasks.selection_coverage import main

if __name__ == "__main__":
    sys.exit(main())
