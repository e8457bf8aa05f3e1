"""megatron_spava: Spava context-parallel approximate attention for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_spava",
    version="0.1.0",
    description="Spava sequence-parallel approximate attention for long-video prefill in Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # patches/ (the Megatron-LM patches) ships inside the package as megatron_spava/patches,
    # where megatron_spava.megatron_lm_patch looks first (a source checkout: next to it).
    packages=find_packages(include=["megatron_spava", "megatron_spava.*"]) + ["megatron_spava.patches"],
    package_dir={"megatron_spava.patches": "patches"},
    # The needle model trained by tools/train_needle_model.py (fp16 safetensors, < 10 MB),
    # the main job's default checkpoint.
    package_data={"megatron_spava": ["assets/needle_qwen/*"],
                  "megatron_spava.patches": ["*.patch", "README.md"]},
    python_requires=">=3.10",
    # torch is not pinned here: install it first (the README says how) so that pip never
    # pulls a CUDA build onto a CPU machine. constraints.txt pins what CI installs.
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.16.1,<0.20",  # tested range (README); differences: megatron_spava/compat.py
        "transformers>=5.0",   # Qwen2.5-VL reference model, tokenizer and processors
        "safetensors",         # checkpoint I/O
        "sentencepiece",
        "av",                  # PyAV: video decoding (bundles FFmpeg)
        "pillow",              # frame directories, HF image processor
        "tqdm",                # progress bars
        "psutil",              # undeclared need of megatron-core's dist-checkpoint writer
    ],
    extras_require={
        "test": ["pytest"],
        "te": ["transformer-engine[pytorch]"],  # optional, detected at runtime
    },
    entry_points={
        "console_scripts": [
            "megatron-spava-demo=megatron_spava.video_qa:main",
            "megatron-spava-attention-demo=megatron_spava.attention_demo:main",
            "megatron-spava-patch-megatron-lm=megatron_spava.megatron_lm_patch:main",
            "megatron-spava-convert=megatron_spava.convert:main",
            "megatron-spava-eval-needles=megatron_spava.tasks.evaluate:main",
            "megatron-spava-bench-prefill=megatron_spava.perf.bench_prefill:main",
        ],
    },
)
