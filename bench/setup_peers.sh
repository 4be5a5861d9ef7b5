#!/usr/bin/env bash
# Makes bench/.peers-venv, the PyTorch environment that `python -m bench` uses for
# the PEFT peer (bench/peers.py). Never needed by lora_jax itself or its tests.
# torch is pinned to 2.13.0, the CPU build this project benchmarks against.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .peers-venv
.peers-venv/bin/pip install -q "torch==2.13.0" transformers peft safetensors
.peers-venv/bin/python -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
