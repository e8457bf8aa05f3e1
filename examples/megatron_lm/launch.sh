#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py, evaluation only, on mock data, with TE layers and
# megatron_spava's context-parallel attention:
#
#   MEGATRON_LM_PATH=/path/to/patched/Megatron-LM bash examples/megatron_lm/launch.sh TP CP [ALGO] [extra args]
#
# TP, CP: tensor- and context-parallel sizes (torchrun starts TP x CP ranks, one GPU each).
# ALGO: full | ring | star | apb | spava (megatron_spava's --context-parallel-algo), or
#   none (default): Megatron's own path, i.e. TE's context parallelism when CP > 1.
# spava/star/apb run at full budget (--spava-passing-len = the sequence length), where
# Spava is exact: the evaluation loss then equals the run without CP.
# Extra arguments go to pretrain_gpt.py. Model size via the environment: SEQ (4096),
# LAYERS (4), HIDDEN (512), HEADS (8), KV_GROUPS (4; not GROUPS, which bash sets to the user's group ids), FFN (1408), VOCAB (8192), EVAL_ITERS (4).
# The checkout must be Megatron-LM at a supported tag (core_v0.16.1 ... core_v0.19.0) patched
# with `python tools/megatron_lm_patch.py apply "$MEGATRON_LM_PATH"` (it picks the patch for
# the tag); megatron/core may come from the megatron-core wheel of the same minor version
# (0.16.1 for core_v0.16.1, 0.19.x for core_v0.19.0) instead of the checkout. The flags
# below are accepted by every supported tag.
set -euo pipefail
TP=${1:?usage: launch.sh TP CP [ALGO] [extra pretrain_gpt.py args]}
CP=${2:?usage: launch.sh TP CP [ALGO] [extra pretrain_gpt.py args]}
ALGO=${3:-none}
shift $(( $# < 3 ? $# : 3 ))
: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a patched Megatron-LM checkout (core_v0.16.1 ... core_v0.19.0)}"
root=$(cd "$(dirname "$0")/../.." && pwd)
SEQ=${SEQ:-4096}
algo_args=()
if [ "$ALGO" != none ]; then
  algo_args=(--context-parallel-algo "$ALGO" --spava-query-len 128 --spava-passing-len "$SEQ")
fi
export PYTHONPATH="$MEGATRON_LM_PATH:$root${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$MEGATRON_LM_PATH"
exec torchrun --standalone --nproc-per-node $((TP * CP)) pretrain_gpt.py \
  --tensor-model-parallel-size "$TP" --context-parallel-size "$CP" \
  --num-layers "${LAYERS:-4}" --hidden-size "${HIDDEN:-512}" --num-attention-heads "${HEADS:-8}" \
  --group-query-attention --num-query-groups "${KV_GROUPS:-4}" --ffn-hidden-size "${FFN:-1408}" \
  --swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights \
  --position-embedding-type rope --rotary-base 10000 \
  --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
  --attention-dropout 0 --hidden-dropout 0 \
  --micro-batch-size 1 --global-batch-size 1 \
  --train-iters 1 --skip-train --eval-iters "${EVAL_ITERS:-4}" --eval-interval 1 \
  --mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB:-8192}" \
  --bf16 --transformer-impl transformer_engine --no-gradient-accumulation-fusion \
  --seed 1234 --log-interval 1 --distributed-backend nccl \
  "${algo_args[@]}" "$@"
