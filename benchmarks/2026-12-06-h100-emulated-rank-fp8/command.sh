#!/usr/bin/env bash
# Device call 3+4 (stop 28), issue 25 in one call: (a) the table (emulated W=4 spava 128K/256K + full 128K,
# bf16 and FP8 delayed); (b) FP8 needle accuracy, full and spava, bf16 vs FP8, same samples, same TE layers;
# (c) if time is left: the emulate CUDA tests and the tensorwise needle run.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 9
export MEGATRON_SPAVA_COMMIT=$(cat .devrun/lead/commit)
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/r/device.txt; date -u >> $OUT/r/device.txt
finish() { cd $OUT && tar czf r.tgz r && rm -rf r; }
trap finish EXIT
# (a) stage 3 (full at 256K) off: bf16 alone ran out of an H100's 79 GiB in call 1
OUT=$OUT/r/emu BUDGET_S=100 STAGE1_S=${STAGE1_S:-240} bash tools/gpu_emulated_rank.sh
echo "(a) done after $(el) s"
# (b)
E="python3 tools/eval_needles.py --device cuda --nproc 4 --bf16 --transformer-impl transformer_engine --cp-sizes 2 4 --tokens 4096 16384 --samples 12 --algos full spava --max-minutes ${MINUTES:-1.2}"
for run in bf16 delayed tensorwise; do
  [ $run = tensorwise ] && [ $(el) -gt 400 ] && { echo "tensorwise skipped at $(el) s"; continue; }
  extra=""; [ $run != bf16 ] && extra="--fp8-format e4m3 --fp8-recipe $run"
  timeout 160 $E $extra --json $OUT/r/n_$run.json --markdown $OUT/r/n_$run.md > $OUT/r/n_$run.log 2>&1
  echo "(b) $run rc $? after $(el) s"; grep -A7 "^\*\*all\*\*" $OUT/r/n_$run.md | head -8
done
# (c)
if [ $(el) -lt 480 ]; then
  timeout $(( 560 - $(el) )) python3 -m pytest -q -m cuda tests/test_emulate.py -p no:cacheprovider > $OUT/r/pytest_cuda.log 2>&1
  echo "(c) pytest rc $? after $(el) s"; tail -2 $OUT/r/pytest_cuda.log
fi
