#!/usr/bin/env bash
# Issue 14's runs on one nvidia-h200-x4 machine, one stage per device call (each fits the
# 10-minute call limit; the session's 30 device minutes hold about three of them, so pick):
#
#   correctness  the CUDA tests on 4 GPUs (tests/test_gpu.py: spava full budget and ring exact
#                over NCCL at 2 and 4 GPUs; tests/test_te.py: TE x TP x CP incl. megatron p2p /
#                a2a at TP=2 x CP=2), then the Megatron-LM launch at TP=2 x CP=2 (eval loss
#                without CP vs spava at full budget vs ring) when MEGATRON_LM_PATH is set
#   tpcp         tools/tp_cp_check.py: 3B shape, bf16, TE layers, TP=2 x CP=2, TP=1 x CP=4 and
#                TP=4 x CP=1 against TP=1 x CP=1 for spava at full budget, ring, megatron p2p
#                and a2a (11 model builds with CPU initialisation: its time is a guess)
#   bench        tools/bench_prefill.py, 7B shape, TE layers, every default algorithm (full on
#                one GPU, megatron-p2p / -a2a / -all_gather, ring, star, apb, spava and each
#                ablation), 32K-128K, exposed communication profiled; roofline floors printed
#   bench256     the same at 256K (about 400 s: full alone is ~150 s of it)
#   long         bench_prefill at 512K (spava, apb, ring) and 1M (spava), TE layers
#   internvl     bench_prefill --shape internvl3-2b, 32K-128K, the main algorithms
#   needles      tools/eval_needles.py on 4 GPUs over NCCL: CP=4 at 64K, 128K, 256K
#
# On the device, from the repository root, with the wheels (../shared/te/README.md) carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   MEGATRON_SPAVA_COMMIT=<commit> [MEGATRON_LM_PATH=.megatron_lm] bash tools/four_gpu_session.sh bench
# Logs and JSON go to $OUT/<stage>/ (and $OUT/<stage>.tgz: the device returns few files);
# `python tools/bench_prefill.py --replot a.json b.json --json merged.json --plot merged.png`
# merges the bench stages into one table. Written 2026-12-01 without a 4-GPU machine to run
# it on: each command here ran before only on CPU ranks or one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: tools/four_gpu_session.sh correctness|tpcp|bench|bench256|long|internvl|needles}
OUT=${OUT:-/tmp/four_gpu}
dir="$OUT/$stage"
mkdir -p "$dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 4 ]; then
  echo "tools/four_gpu_session.sh: needs 4 GPUs, found $gpus" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$dir/device.txt"
RUN4="torchrun --standalone --nproc-per-node 4"
BENCH="tools/bench_prefill.py --shape 7b --transformer-impl transformer_engine --repeats 3 --warmup 1"
rc=0
case "$stage" in
  correctness)
    timeout 300 python3 -m pytest -q -s -m cuda -p no:cacheprovider tests/test_gpu.py tests/test_te.py \
        > "$dir/pytest.log" 2>&1 || rc=$?
    tail -25 "$dir/pytest.log"
    if [ -n "${MEGATRON_LM_PATH:-}" ]; then
      timeout 120 python3 examples/megatron_lm/compare_eval_loss.py --megatron-lm "$MEGATRON_LM_PATH" \
          --tp 2 --cp 2 --timeout 110 --work /tmp/megatron_lm_work --json "$dir/megatron_lm.json" \
          > "$dir/megatron_lm.log" 2>&1 || rc=$?
      tail -12 "$dir/megatron_lm.log"
    fi ;;
  tpcp)
    # issue 14 run 1: Qwen2.5-VL-3B-shaped prefill + 16 tokens, bf16, TE layers, against TP=1 x CP=1
    timeout 570 $RUN4 tools/tp_cp_check.py --device cuda --bf16 --shape 3b --tokens 16384 \
        --transformer-impl transformer_engine --grids 2x2 1x4 4x1 \
        --algos spava ring megatron-p2p megatron-a2a --json "$dir/tp_cp_check.json" \
        > "$dir/tp_cp_check.log" 2>&1 || rc=$? ;;
  bench)
    timeout 570 $RUN4 $BENCH --tokens 32768 65536 131072 --profile-comm \
        --json "$dir/prefill.json" --plot "$dir/prefill.png" > "$dir/prefill.log" 2>&1 || rc=$? ;;
  bench256)
    timeout 570 $RUN4 $BENCH --tokens 262144 --profile-comm \
        --json "$dir/prefill_256k.json" > "$dir/prefill_256k.log" 2>&1 || rc=$? ;;
  long)
    timeout 570 $RUN4 $BENCH --repeats 1 --tokens 524288 --algos spava apb ring \
        --json "$dir/prefill_512k.json" > "$dir/prefill_512k.log" 2>&1 || rc=$?
    timeout 300 $RUN4 $BENCH --repeats 1 --tokens 1048576 --algos spava \
        --json "$dir/prefill_1m.json" > "$dir/prefill_1m.log" 2>&1 || rc=$? ;;
  internvl)
    timeout 570 $RUN4 tools/bench_prefill.py --shape internvl3-2b --transformer-impl transformer_engine \
        --tokens 32768 65536 131072 --algos full ring apb spava megatron-p2p \
        --json "$dir/prefill_internvl.json" > "$dir/prefill_internvl.log" 2>&1 || rc=$? ;;
  needles)
    timeout 570 $RUN4 tools/eval_needles.py --device cuda --cp-sizes 4 --tokens 65536 131072 262144 \
        --samples 8 --max-minutes 8.5 --algos full ring star apb spava \
        --json "$dir/needles.json" --plot "$dir/needles.png" --markdown "$dir/needles.md" \
        > "$dir/needles.log" 2>&1 || rc=$? ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
for log in "$dir"/*.log; do echo "== $log"; tr '\r' '\n' < "$log" | grep -v -i "warn" | tail -30; done
(cd "$OUT" && tar czf "$stage.tgz" "$stage")
echo "stage $stage: exit $rc"
exit $rc
