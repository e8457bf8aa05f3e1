#!/usr/bin/env bash
# Device call C: the Qwen3-VL needle model's accuracy at 16K/32K/64K video tokens on the GPU (issue 24).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 9
export MEGATRON_SPAVA_COMMIT=$(cat .devrun/lead/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/device.txt; date -u >> $OUT/device.txt
python3 tools/eval_needles.py --checkpoint megatron_spava/assets/needle_qwen3 --device cuda --nproc 4 \
    --cp-sizes 2 4 --tokens 16384 32768 65536 --samples 12 --max-minutes 3.4 \
    --algos full star apb spava spava-selection-mean spava-selection-lse-max \
    --json $OUT/needles.json --markdown $OUT/needles.md > $OUT/eval.log 2>&1
echo "eval rc $?"; tail -5 $OUT/eval.log; cat $OUT/needles.md | head -30
