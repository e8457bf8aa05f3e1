#!/usr/bin/env bash
# Spava prefill-attention demo under torchrun.
#   CPU (gloo):  NPROC=2 examples/spava_attention_demo.sh
#   GPUs (NCCL): NPROC=2 examples/spava_attention_demo.sh --device cuda --dtype bfloat16 --context-len 131072
# Extra arguments go to the demo; see `megatron-spava-demo --help`.
set -euo pipefail
NPROC=${NPROC:-2}
# NVLink multicast stays off (it can take shared GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_spava.attention_demo "$@"
