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
  mkdir -p "${OUT:-/tmp}" build
  export LORA_KERNELS_BUILD_LOG="${OUT:-/tmp}/gpu_check_build.log"
  export LORA_KERNELS_BUILD_STATUS="${OUT:-/tmp}/gpu_check_build.status"
  # The build runs in the background while the Triton kernels, which need no extension, are
  # checked; benchmarks/gpu_check.py waits for the status file before the cuda backend's checks.
  # No stale extension may be imported meanwhile, and the new one is linked elsewhere and renamed
  # into place (same file system: atomic), so the check never maps a half-written file.
  rm -f "$LORA_KERNELS_BUILD_STATUS" lora_kernels/_C.*.so
  (
    if LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" setup.py build_ext --build-lib build/gpu_check_lib -q >"$LORA_KERNELS_BUILD_LOG" 2>&1 \
        && mv -f build/gpu_check_lib/lora_kernels/_C.*.so lora_kernels/; then
      echo ok >"$LORA_KERNELS_BUILD_STATUS.part"
    else
      echo failed >"$LORA_KERNELS_BUILD_STATUS.part"
    fi
    mv "$LORA_KERNELS_BUILD_STATUS.part" "$LORA_KERNELS_BUILD_STATUS"
  ) &
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_check "$@"
