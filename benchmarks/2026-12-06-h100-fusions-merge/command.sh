#!/usr/bin/env bash
# Session 29, call A: CUDA tests of the code merged since the last call; issue 25's merges (micro-bench +
# emulated spava vs spava-merge-triton) and the dense part's fusions (--lm-fusions none / megatron / te-ops),
# bf16 and FP8, with a kernel profile; issue 23's top-k micro-bench.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 9
export MEGATRON_SPAVA_COMMIT=$(cat .devrun/lead/commit)
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader > $OUT/r/device.txt; date -u >> $OUT/r/device.txt
finish() { cd $OUT && tar czf r.tgz r && rm -rf r; }
trap finish EXIT
B="python3 -m megatron_spava.perf.bench_prefill --shape 7b --emulate-cp 4 --transformer-impl transformer_engine --fp8-format e4m3 --fp8-recipe delayed --fp8-compare --repeats 2 --warmup 1"
# 1. merges micro-bench, top-k micro-bench
timeout 60 python3 tools/bench_attention.py --merge --merge-rows 16384 32768 --merge-query-rows 64 512 --cp 4 \
    --repeats 20 --warmup 3 --json $OUT/r/merge.json > $OUT/r/merge.log 2>&1; echo "merge bench rc $? after $(el) s"; tail -12 $OUT/r/merge.log
timeout 40 python3 .devrun/lead/topk.py > $OUT/r/topk.log 2>&1; echo "topk rc $? after $(el) s"; cat $OUT/r/topk.log
# 2. emulated rank: fusions none (the old default) vs megatron (the new default), merge torch vs triton
timeout 120 $B --tokens 131072 --algos spava --lm-fusions none --json $OUT/r/emu_none.json > $OUT/r/emu_none.log 2>&1
echo "emu none rc $? after $(el) s"; grep -A12 "^per part" $OUT/r/emu_none.log | tail -8
timeout 170 $B --tokens 131072 262144 --algos spava spava-merge-triton --lm-fusions megatron --profile-kernels $OUT/r/prof \
    --json $OUT/r/emu_megatron.json > $OUT/r/emu_megatron.log 2>&1
echo "emu megatron rc $? after $(el) s"; grep -A14 "^per part" $OUT/r/emu_megatron.log | tail -12; grep -A6 "^FP8 against" $OUT/r/emu_megatron.log
# 3. CUDA tests
timeout $(( 470 - $(el) )) python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_merge.py tests/test_emulate.py tests/test_selection.py tests/test_needles.py \
    "tests/test_te.py::test_qwen_checkpoints_load_into_both_backends_and_agree" "tests/test_te.py::test_bench_prefill_runs_megatron_variants_on_one_gpu" > $OUT/r/pytest_cuda.log 2>&1
echo "pytest rc $? after $(el) s"; tail -4 $OUT/r/pytest_cuda.log
# 4. te-ops, if time is left
left=$(( 570 - $(el) ))
if [ $left -gt 60 ]; then
  timeout $left $B --tokens 131072 --algos spava --lm-fusions te-ops --json $OUT/r/emu_teops.json > $OUT/r/emu_teops.log 2>&1
  echo "emu te-ops rc $? after $(el) s"; grep -A12 "^per part" $OUT/r/emu_teops.log | tail -8; grep -A6 "^FP8 against" $OUT/r/emu_teops.log
fi
for f in $OUT/r/prof/*.json; do [ -f "$f" ] && gzip -f "$f"; done
