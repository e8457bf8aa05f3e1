#!/usr/bin/env python3
"""Apply, check or revert megatron_spava's patch to a Megatron-LM checkout: the same
command as `megatron-spava-patch-megatron-lm` (megatron_spava/megatron_lm_patch.py).

    python tools/megatron_lm_patch.py {check,apply,revert,status} /path/to/Megatron-LM
"""

import importlib.util
import os
import sys

# The module alone (it imports nothing from the package): no torch import, so the tool
# runs in a second, and also where megatron_spava's dependencies are not installed.
_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "megatron_spava",
                     "megatron_lm_patch.py")
_spec = importlib.util.spec_from_file_location("megatron_spava_megatron_lm_patch", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

if __name__ == "__main__":
    sys.exit(_module.main())
