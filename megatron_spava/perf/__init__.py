"""Performance models and benchmarks of the prefill, split by job:

  work.py           the types a layer's cost is made of (Shape, Hardware, Call, Comm, Op, Plan,
                    LayerRequest, LayerWork); each algorithm's cost (algos/) returns them
  inputs.py         synthetic video prompts of about n tokens per family (`prompt_lengths`)
  kernels.py        kernel floors and GPU timing at a model's shapes
  layer.py          one layer of an algorithm on each rank, through the registry's costs:
                    ops, traffic by link, per-rank FLOPs (the roofline's)
  rates.py          measured kernel rates against call size; what a call or op costs
  simulate.py       the time model: compute and NCCL streams per rank, predicted TTFT
  fit.py            fitting the model to the 1-2 GPU runs, validating on the 4-GPU runs
  scaling_model.py  predictions, findings, tables, plot and the command (`tools/scaling_model.py`)
  bench_prefill.py  the prefill benchmark and its roofline floor (`megatron-spava-bench-prefill`,
                    `tools/bench_prefill.py`)

Nothing here is imported by the model path.
"""
