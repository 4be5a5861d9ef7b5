#!/usr/bin/env bash
# The benchmark suite at accelerator size (~1.1B Llama, bfloat16) on one NVIDIA GPU; about 2-4 minutes.
# Makes its own virtual environment with JAX's CUDA 12 build on first use. Extra arguments go to
# `python -m bench.gpu` (e.g. --tiny to check the script on a CPU-only machine in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-gpu/bin/python ]; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q -e '.[cuda12]'
fi
exec .venv-gpu/bin/python -m bench.gpu "$@"
