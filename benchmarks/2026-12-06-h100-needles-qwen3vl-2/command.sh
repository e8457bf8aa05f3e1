#!/usr/bin/env bash
# Session 29, call B: issue 23's selection cost of rownorm / rownorm-max; issue 24's Qwen3-VL table at
# 12 samples per task for star, apb, mean, lse-max (full again, same samples) at 16K / 32K.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 9
export MEGATRON_SPAVA_COMMIT=$(cat .devrun/lead/commit)
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader > $OUT/r/device.txt; date -u >> $OUT/r/device.txt
finish() { cd $OUT && tar czf r.tgz r && rm -rf r; }
trap finish EXIT
timeout 400 python3 tools/eval_needles.py --checkpoint megatron_spava/assets/needle_qwen3 --device cuda --nproc 4 \
    --cp-sizes 2 4 --tokens 16384 32768 --samples 12 --algos full star apb spava-selection-mean spava-selection-lse-max \
    --max-minutes ${MINUTES:-6} --json $OUT/r/q3.json --markdown $OUT/r/q3.md > $OUT/r/q3.log 2>&1
echo "qwen3 eval rc $? after $(el) s"; grep -A12 "^\*\*all\*\*" $OUT/r/q3.md | head -14; tail -3 $OUT/r/q3.log
left=$(( 560 - $(el) ))
[ $left -gt 30 ] && timeout $left python3 tools/bench_selection.py --scores rownorm rownorm-max --json $OUT/r/selection.json > $OUT/r/selection.log 2>&1
echo "bench_selection rc $? after $(el) s"; grep -v -i warn $OUT/r/selection.log | tail -30
