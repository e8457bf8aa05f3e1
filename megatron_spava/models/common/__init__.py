"""What the model families share (nothing here is one family's):

  vlm.py             VideoLanguageModel: the interface `inference.generate` runs, decoder
                     input, logits head, weight sharding; 1-D RoPE positions
  frame_parallel.py  frame-parallel vision: split the frame groups over CP, all-gather
                     variable-length slices
  checkpoint_io.py   HF safetensors streaming, dist-checkpoint load/save, the conversion
                     loops over a family's name mapping, the 1-rank parallel state
  hf_lm.py           the Qwen2 language model's HF <-> megatron-core weight mapping and
                     TP slicing
  vision.py          vision-encoder building blocks: TP linears as plain GEMMs, Container,
                     segment attention, RMSNorm, the vision TP config
  tiny.py            the tiny checkpoints' random-weight rule and the Qwen chat template
  lazy.py            a family package's names imported on first use

Submodules are imported where used (this package imports nothing on its own).
"""
