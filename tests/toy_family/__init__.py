"""A toy model family, registered from its own folder (tests/test_toy_family.py): the
registry and the conformance suite (tests/conformance.py) take it with no other file edited.

It is Qwen2.5-VL's architecture under a model_type of its own ("toy_vl"), with one LLM
layer: its own config class (`config.py`), conversion binding (`convert.py`), tiny
checkpoint (`tiny.py`) and HF loader (`hf.py`); the model, the prompt, the synthetic inputs
and the HF input mapping are Qwen2.5-VL's parts, named in `family.py`."""
