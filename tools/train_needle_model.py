#!/usr/bin/env python3
"""Train the needle model (megatron_spava.tasks.train; see --help for the recipe).

    python tools/train_needle_model.py                         # the GPU recipe (one H200, ~8 min)
    python tools/train_needle_model.py --device cpu --max-minutes 20 \\
        --curriculum 512:0.6,1024:0.4 --tokens-per-step 4096 --eval-tokens 1024 --out /tmp/needle
"""

import sys

from megatron_spava.tasks.train import main

if __name__ == "__main__":
    sys.exit(main())
