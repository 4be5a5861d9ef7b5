#!/usr/bin/env bash
# The GPU run, in one command, on a machine with one NVIDIA GPU and a Python that already has jax (CUDA),
# flax, optax, orbax, safetensors, hypothesis, pytest-xdist, and for the PyTorch rows torch, transformers and
# peft: nothing is installed (GPU machines are often offline). The project runs from this tree (PYTHONPATH).
#
#   bash bench/gpu.sh            # bench (JAX and PyTorch/PEFT rows) then the numeric tests on the GPU
#   bash bench/gpu.sh --tiny     # the same script at a toy size, on any machine, tests left out
#
# Each part has its own time limit (BENCH_TIMEOUT, TEST_TIMEOUT seconds); a part that runs out is reported and
# the next one still runs. Results: bench/results/gpu.json and bench/results/README.md; logs in $LOGS
# (default: a temporary folder; $OUT when set). PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${LOGS:-${OUT:-$(mktemp -d)}}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The bench's memory probes and PyTorch share the card with the main process: no preallocation.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
TINY=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY=1; done
# The numeric test files (the rest of the suite is host-side: files, CLI, docs).
TESTS=(tests/test_core.py tests/test_layers.py tests/test_transformer.py tests/test_hf_llama.py tests/test_peft_io.py
       tests/test_multi.py tests/test_nnx.py tests/test_dora.py tests/test_quant.py tests/test_fast_paths.py)

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

timeout "${BENCH_TIMEOUT:-480}" "$PY" -m bench.gpu "$@" 2>&1 | tee "$LOGS/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench exit code: $bench_rc"
[ "$TINY" = 1 ] && exit "$bench_rc"

{ echo "test files: ${TESTS[*]}"
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -n "${TEST_WORKERS:-8}" -p no:cacheprovider -rfE --tb=short \
      "${TESTS[@]}"; } 2>&1 | tee "$LOGS/tests.log"
echo "tests exit code: ${PIPESTATUS[0]}"
if [ "$bench_rc" = 0 ]; then
    "$PY" -m bench.gpu --record-tests "$LOGS/tests.log"
fi
exit "$bench_rc"
