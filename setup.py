"""Installs lmforge's packages and the `lmforge` command.

torch is declared loosely on purpose: `make` installs torch==2.13.0 first (the CPU wheel on these
machines); a plain `torch` requirement with nothing installed would pull a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="lmforge",
    version="0.1.0",
    description="A DeepSpeed pipeline from raw text to a trained, aligned, exported language model.",
    python_requires=">=3.10",
    packages=find_packages(include=["lmforge*", "data_prep*", "parallel*", "numerics*", "pretrain*", "posttrain*", "run_tools*", "launch*", "bench*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "zstandard>=0.22",
        "pyarrow>=14",
        "matplotlib>=3.7",
        "transformers>=4.45",
        "peft>=0.10",  # LoRA for post-training (posttrain/lora.py)
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "fp8": ["torchao>=0.17"],  # train.float8 (numerics/float8.py)
        "test": ["pytest>=8", "hypothesis>=6", "import-linter>=2.1"],
        # lm-evaluation-harness on an exported model (docs/interop.md); the tests use it too.
        "eval": ["lm-eval[hf]>=0.4.13"],
    },
    entry_points={"console_scripts": ["lmforge=lmforge.cli:main"]},
)
