#!/usr/bin/env bash
# Everything Transformer Engine-related on one GPU machine, in one call (a few minutes):
#   1. versions: TE, megatron-core, torch, the GPU;
#   2. python -m pytest -q -m cuda $TESTS (default tests/test_te.py: TE vs local layers, checkpoints,
#                                         megatron algo, TP=2 x CP=2 on gloo ranks sharing the GPU;
#                                         TESTS="" skips this stage; at most $TESTS_TIMEOUT s, default 300)
#   3. the Megatron-LM launch, when MEGATRON_LM_PATH is set (examples/megatron_lm/compare_eval_loss.py:
#      eval loss without CP, with spava at full budget, with ring; TP=1 x CP=1 on one GPU),
#      run next to 2 (both only check correctness; one GPU holds them);
#   4. tools/bench_layers.py alone on the GPU: TE vs local layers, full and megatron, 32K and 128K
#      (BENCH_LAYERS=0 skips it).
# Then a summary table. Exit status: non-zero if any stage failed.
#
# On the device, from the repository root, after installing the wheels (../shared/te/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   [MEGATRON_LM_PATH=.megatron_lm] bash tools/gpu_check_te.sh
# Results (logs, bench_layers.json, megatron_lm.json) go to $OUT (default /tmp/gpu_check_te).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_te}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
declare -A status seconds

finish() {  # NAME RC START
  status[$1]=$([ "$2" -eq 0 ] && echo ok || echo "FAILED (exit $2)")
  seconds[$1]=$(( $(date +%s) - $3 ))
}

t0=$(date +%s)
python3 - > "$OUT/versions.log" 2>&1 <<'EOF'
import torch, transformer_engine, transformer_engine.pytorch, megatron.core
print(f"GPU {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
      f"TE {transformer_engine.__version__}, megatron-core {megatron.core.__version__}")
EOF
finish versions $? "$t0"
cat "$OUT/versions.log"

t1=$(date +%s)
TESTS=${TESTS-tests/test_te.py}
if [ -n "$TESTS" ]; then
  # shellcheck disable=SC2086
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -s -m cuda -p no:cacheprovider $TESTS > "$OUT/test_te.log" 2>&1 &
  pytest_pid=$!
fi
if [ -n "${MEGATRON_LM_PATH:-}" ]; then
  timeout 300 python3 examples/megatron_lm/compare_eval_loss.py --megatron-lm "$MEGATRON_LM_PATH" \
      --tp 1 --cp 1 --parallel --timeout 240 --work /tmp/megatron_lm_work --json "$OUT/megatron_lm.json" \
      > "$OUT/megatron_lm.log" 2>&1
  finish megatron_lm $? "$t1"
  for f in /tmp/megatron_lm_work/*.log; do [ -f "$f" ] && cp "$f" "$OUT/megatron_lm_$(basename "$f")"; done
else
  status[megatron_lm]="skipped (MEGATRON_LM_PATH unset)"; seconds[megatron_lm]=0
fi
if [ -n "$TESTS" ]; then
  wait $pytest_pid
  finish test_te $? "$t1"
else
  status[test_te]="skipped (TESTS empty)"; seconds[test_te]=0
fi

t2=$(date +%s)
if [ "${BENCH_LAYERS:-1}" != 0 ]; then
  timeout 200 python3 tools/bench_layers.py --tokens 32768 131072 --repeats 5 --warmup 2 \
      --json "$OUT/bench_layers.json" > "$OUT/bench_layers.log" 2>&1
  finish bench_layers $? "$t2"
else
  status[bench_layers]="skipped (BENCH_LAYERS=0)"; seconds[bench_layers]=0; : > "$OUT/bench_layers.log"
fi

echo
echo "== ${TESTS:-no tests} (last lines; numbers printed by the tests) =="
[ -f "$OUT/test_te.log" ] && grep -E "relative error|rel\. error|first-token|passed|failed|skipped|Error" "$OUT/test_te.log" | tail -25
if [ -f "$OUT/megatron_lm.log" ]; then
  echo; echo "== Megatron-LM launch =="; sed -n '/^Megatron-LM core_v/,$p' "$OUT/megatron_lm.log" | tail -12
  grep -q "^Megatron-LM core_v" "$OUT/megatron_lm.log" || tail -20 "$OUT/megatron_lm.log"
fi
echo; echo "== tools/bench_layers.py =="
sed -n '/^1 x \|^[0-9]* x .*layer(s)/,$p' "$OUT/bench_layers.log" | tail -14
grep -q "layer(s)" "$OUT/bench_layers.log" || tail -20 "$OUT/bench_layers.log"

echo; echo "== summary ($(( $(date +%s) - t0 )) s; logs and JSON in $OUT) =="
printf "| %-12s | %-32s | %5s |\n" stage status s
printf "|--------------|----------------------------------|-------|\n"
rc=0
for stage in versions test_te megatron_lm bench_layers; do
  printf "| %-12s | %-32s | %5s |\n" "$stage" "${status[$stage]}" "${seconds[$stage]}"
  case "${status[$stage]}" in FAILED*) rc=1 ;; esac
done
exit $rc
