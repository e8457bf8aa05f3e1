# Session 30 device calls (one NVIDIA H100 80GB HBM3, .whl carried: megatron-core 0.16.1 + TE 2.11), tree of main at a900a13.
# pre.sh (sourced by each call):
#   # sourced by every call: wheels, env, commit, device record, tar of $OUT/r at exit
#   export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
#   t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
#   export MEGATRON_SPAVA_COMMIT=$(cat .devrun/lead/commit)
#   mkdir -p $OUT/r
#   nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader > $OUT/r/device.txt; date -u >> $OUT/r/device.txt
#   cat $OUT/r/device.txt; echo "commit $MEGATRON_SPAVA_COMMIT; setup $(el) s"
#   finish() { cd $OUT && tar czf r.tgz r && rm -rf r; }
#   trap finish EXIT

# ---- call 1
# Session 30, call 1: issue 25's table of record: the busiest rank of W=4 emulated at 128K and 256K and full
# at 128K, bf16 and FP8 (e4m3, delayed), 7B shape, TE layers, with the default fusions (megatron) and te-ops
# in one process (one set of measured rates).
STAGE1_S=480 BUDGET_S=0 LM_FUSIONS="megatron te-ops" OUT=$OUT/r/emu bash tools/gpu_emulated_rank.sh
echo "table done after $(el) s"

# ---- call 2
# Session 30, call 2: FP8 needle accuracy with this commit's defaults (megatron fusions, fused merge) and with
# te-ops, the shipped Qwen2.5-VL needle model on TE layers, 4 gloo ranks on one GPU, bf16 vs FP8 (delayed,
# tensorwise), same samples (BENCHMARKS.md section 13 command (b)).
N="python3 tools/eval_needles.py --device cuda --nproc 4 --bf16 --transformer-impl transformer_engine --cp-sizes 2 4 --tokens 4096 16384 --samples 12 --algos full spava --max-minutes 1.2"
for v in bf16 delayed tensorwise bf16+te-ops delayed+te-ops; do
  r=${v%%+*}; extra=""; [ $r != bf16 ] && extra="--fp8-format e4m3 --fp8-recipe $r"
  [ "$v" != "$r" ] && extra="$extra --lm-fusions ${v#*+}"
  timeout 115 $N $extra --json $OUT/r/n_$v.json --markdown $OUT/r/n_$v.md > $OUT/r/n_$v.log 2>&1; echo "needles $v rc $? after $(el) s"
done

# ---- call 3
# Session 30, call 3: CUDA tests of the code changed since the last device call (pinned pixels, te-ops on TE
# layers, several fusions in one process, FP8 padding per MLP, the vision encoder's fusions, the fused rownorm),
# then the fused rownorm's speed (issue 23's bench_selection).
timeout 100 python3 -m megatron_spava.perf.bench_prefill --shape 7b --tokens 131072 --algos spava --emulate-cp 4 \
    --transformer-impl transformer_engine --pin-pixels --no-pin-pixels --repeats 2 --warmup 1 --json $OUT/r/nopin.json > $OUT/r/nopin.log 2>&1
echo "nopin rc $? after $(el) s"; grep "rank 1 parts" $OUT/r/nopin.log
timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider -x tests/test_gpu.py -k vision > $OUT/r/pytest_a.log 2>&1
echo "pytest a rc $? after $(el) s"; tail -3 $OUT/r/pytest_a.log
timeout $(( 480 - $(el) )) python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_emulate.py tests/test_selection.py tests/test_lse_score.py \
    "tests/test_te.py::test_qwen_checkpoints_load_into_both_backends_and_agree" > $OUT/r/pytest_b.log 2>&1
echo "pytest b rc $? after $(el) s"; tail -4 $OUT/r/pytest_b.log
left=$(( 560 - $(el) ))
[ $left -gt 40 ] && { timeout $left python3 tools/bench_selection.py --scores rownorm rownorm-max > $OUT/r/bench_selection.log 2>&1; echo "bench_selection rc $? after $(el) s"; tail -20 $OUT/r/bench_selection.log; }
