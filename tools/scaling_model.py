#!/usr/bin/env python3
"""The TTFT scaling model (megatron_spava.perf.scaling_model): fitted to the measured 1- and
2-GPU prefill runs, validated on the 4-GPU ones, predicted for 8-64 GPUs.

    python tools/scaling_model.py                        # validation table + predictions
    python tools/scaling_model.py --json scaling.json --plot scaling.png
    python tools/scaling_model.py --bytes --gpus 16 --tokens 131072   # per-layer traffic table
"""

import sys

from megatron_spava.perf.scaling_model import main

if __name__ == "__main__":
    sys.exit(main())
