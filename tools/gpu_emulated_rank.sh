#!/usr/bin/env bash
# Issue 25 on ONE GPU, in one device call: the busiest rank of a W = 4 Spava layout, emulated
# (megatron-spava-bench-prefill --emulate-cp 4), its time per part against its floor, bf16
# and FP8, at 128K and 256K tokens, 7B shape on Transformer Engine layers; and `full` on the
# same GPU in bf16 and FP8.
#
#   1. versions (GPU, torch, TE, megatron-core);
#   2. the table: spava emulated at 128K and 256K + full at 128K, bf16 and FP8 (--fp8-compare),
#      one process (at most $STAGE1_S s, default 300);
#   3. if at least 150 s of $BUDGET_S (default 450) are left: full at 256K, bf16 and FP8, one
#      run each without warm-up (38 s per run on an H200 in bf16, BENCHMARKS.md section 5;
#      peak 69.7 GiB: it may not fit an H100's 79 GiB with FP8's extra buffers; a failure
#      here leaves stage 2's results intact).
# FP8: --fp8-format $FP8_FORMAT (default e4m3) --fp8-recipe $FP8_RECIPE (default delayed,
# Megatron's default; tensorwise is the other Hopper recipe). The language model's fusions:
# --lm-fusions $LM_FUSIONS (default megatron, Megatron-LM's; "megatron te-ops" times both).
#
# On the device, from the repository root, after installing the wheels (../shared/te/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   OUT=$OUT bash tools/gpu_emulated_rank.sh
# Results (emulated.json / .log, full_256k.json / .log, versions.log) go to $OUT
# (default /tmp/gpu_emulated_rank).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_emulated_rank}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export MEGATRON_SPAVA_COMMIT=${MEGATRON_SPAVA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
FP8_FORMAT=${FP8_FORMAT:-e4m3}
FP8_RECIPE=${FP8_RECIPE:-delayed}
BUDGET_S=${BUDGET_S:-450}
LM_FUSIONS=${LM_FUSIONS:-megatron}  # several ("megatron te-ops"): one model each, same process
t0=$(date +%s)

python3 - > "$OUT/versions.log" 2>&1 <<'EOF'
import torch, transformer_engine, transformer_engine.pytorch, megatron.core
print(f"GPU {torch.cuda.get_device_name()} x{torch.cuda.device_count()} (capability "
      f"{torch.cuda.get_device_capability()}), torch {torch.__version__}, TE {transformer_engine.__version__}, "
      f"megatron-core {megatron.core.__version__}")
EOF
echo "rc=$? commit $MEGATRON_SPAVA_COMMIT"; cat "$OUT/versions.log"

timeout "${STAGE1_S:-300}" python3 -m megatron_spava.perf.bench_prefill --shape 7b --tokens 131072 262144 \
    --algos spava full --emulate-cp 4 --transformer-impl transformer_engine --lm-fusions $LM_FUSIONS \
    --fp8-format "$FP8_FORMAT" --fp8-recipe "$FP8_RECIPE" --fp8-compare \
    --full-max-tokens 131072 --repeats 2 --warmup 1 --json "$OUT/emulated.json" > "$OUT/emulated.log" 2>&1
echo "stage 2 (emulated spava + full 128K) rc=$? after $(( $(date +%s) - t0 )) s"
grep -v -i "warn" "$OUT/emulated.log" | tail -40

left=$(( BUDGET_S - ($(date +%s) - t0) ))
if [ "$left" -ge 150 ]; then
  timeout "$(( left - 10 ))" python3 -m megatron_spava.perf.bench_prefill --shape 7b --tokens 262144 \
      --algos full --transformer-impl transformer_engine \
      --fp8-format "$FP8_FORMAT" --fp8-recipe "$FP8_RECIPE" --fp8-compare \
      --repeats 1 --warmup 0 --rate-tokens 16384 --json "$OUT/full_256k.json" > "$OUT/full_256k.log" 2>&1
  echo "stage 3 (full 256K) rc=$? after $(( $(date +%s) - t0 )) s"
  grep -v -i "warn" "$OUT/full_256k.log" | tail -12
else
  echo "stage 3 (full 256K) skipped: $left s left of $BUDGET_S"
fi
