#!/usr/bin/env bash
# Long-context prefill of a megatron-core GPTModel with TP=2 x CP=2 and Spava.
#   CPU (gloo, 4 processes):  examples/gpt_prefill_tp2_cp2.sh
#   4 GPUs (NCCL):            examples/gpt_prefill_tp2_cp2.sh --device cuda --bf16 --seq-length 131072
# Extra arguments go to examples/gpt_prefill.py (see its --help); e.g. --compare-full,
# --context-parallel-algo ring (the last flag given wins).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
exec torchrun --standalone --nproc-per-node 4 examples/gpt_prefill.py \
    --tensor-model-parallel-size 2 --context-parallel-size 2 --context-parallel-algo spava \
    --num-layers 2 --hidden-size 256 --num-attention-heads 8 --num-query-groups 2 \
    --seq-length 8192 --spava-query-len 64 "$@"
