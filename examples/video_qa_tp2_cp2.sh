#!/usr/bin/env bash
# Video QA with Qwen2.5-VL (or InternVL3: --model internvl3), TP=2 x CP=2, Spava, compared
# with exact attention.
#   tiny offline model on CPU:   examples/video_qa_tp2_cp2.sh   (InternVL3: ... --model internvl3)
#   a real checkpoint on 4 GPUs: examples/video_qa_tp2_cp2.sh --hf-path /ckpt/Qwen2.5-VL-7B-Instruct \
#                                  --video clip.mp4 --question "..." --device cuda --bf16
# Extra arguments go to megatron_spava.video_qa (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
exec torchrun --standalone --nproc-per-node 4 examples/video_qa.py \
    --tensor-model-parallel-size 2 --context-parallel-size 2 --context-parallel-algo spava "$@"
