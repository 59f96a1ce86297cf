#!/bin/bash
# A short check of the GPU path on a host with an NVIDIA GPU: the gpu-marked tests, then the
# time to first step of both backends. Needs .venv from `make install` and a CUDA build of
# jaxlib (pip install "jax[cuda12]" into .venv); prints what nvidia-smi and JAX see first.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=index,name,memory.total --format=csv
.venv/bin/python -c 'import jax; print("JAX devices:", jax.devices())'
# An empty JAX_PLATFORMS lets JAX find the GPU; the test suite otherwise keeps JAX on the CPU.
JAX_PLATFORMS= .venv/bin/python -m pytest -m gpu -q -p no:cacheprovider tests/trainer/test_backends.py tests/trainer/test_training.py
JAX_PLATFORMS= .venv/bin/python benchmarks/time_to_first_step.py --backends jax
