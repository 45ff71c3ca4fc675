#!/usr/bin/env bash
# The prepared GPU check (one command, no network): build lora_kernels._C with its
# CUDA kernels against the machine's torch, validate every GPU kernel against the
# reference, time them; results under $OUT (or benchmarks/results/gpu_check).
#   bash benchmarks/gpu_check.sh             # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU, Triton interpreter, tiny shapes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py build_ext --inplace -q 2>&1 | tail -5
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_check "$@"
