"""Performance models and benchmarks of the prefill, split by job:

  inputs.py         synthetic video prompts of about n tokens per family (`prompt_lengths`)
  kernels.py        kernel floors at a model's shapes (one layer's GEMMs, one attention call)
  scaling_model.py  per-rank work and traffic of one layer, measured rates, the simulator,
                    the fit, validation and reports (`python tools/scaling_model.py`)
  bench_prefill.py  the prefill benchmark and its roofline floor (`megatron-spava-bench-prefill`,
                    `python tools/bench_prefill.py`)

Nothing here is imported by the model path; the modules are imported by name.
"""
