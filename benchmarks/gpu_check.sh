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
  build_log="${OUT:-/tmp}/gpu_check_build.log"
  # A failed build must not cost the run: the Triton kernels need no extension,
  # so their validation and timing go ahead (the cuda backend is then reported missing).
  if LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" setup.py build_ext --inplace -q >"$build_log" 2>&1; then
    echo "[gpu_check] built lora_kernels._C (log: $build_log)"
  else
    tail -30 "$build_log"
    echo "[gpu_check] building lora_kernels._C FAILED (log: $build_log); continuing without the cuda backend"
  fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_check "$@"
