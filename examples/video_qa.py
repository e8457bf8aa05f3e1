#!/usr/bin/env python3
"""Video question answering with Qwen2.5-VL or InternVL3 (--model, or detected from the
checkpoint) under --context-parallel-algo, TP and CP.

The same program as `megatron-spava-demo` (megatron_spava/video_qa.py); see --help.
    torchrun --nproc-per-node 4 examples/video_qa.py --hf-path Qwen2.5-VL-7B-Instruct \\
        --video clip.mp4 --question "What happens?" --device cuda --bf16 \\
        --tensor-model-parallel-size 2 --context-parallel-size 2 --context-parallel-algo spava
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_spava.video_qa import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
