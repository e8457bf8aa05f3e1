#!/usr/bin/env python3
"""Convert checkpoints between Hugging Face and megatron-core: the command of
`megatron_spava.convert` (also the console script megatron-spava-convert; see --help).

    python tools/convert_checkpoint.py hf-to-megatron --hf-path Qwen2.5-VL-7B-Instruct --out ckpt/
    python tools/convert_checkpoint.py megatron-to-hf --megatron-path ckpt/ --out hf_again/
"""

import sys

from megatron_spava.convert import main

if __name__ == "__main__":  # the dist checkpoint saver forks: keep the body under this guard
    from megatron_spava.launch import quiet_known_warnings
    quiet_known_warnings("--verbose" in sys.argv[1:], announce=False)
    sys.exit(main())
