#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine (Python 3.10+, a C++ compiler):
#
#   ./run.sh bench [args]   the benchmark: prints the comparison table (default: --quick)
#   ./run.sh test [args]    the test suite (pytest args pass through)
#   ./run.sh setup          only create .venv, install requirements-dev.txt, build lora_kernels._C
#
# The virtual environment lives in $LORA_KERNELS_VENV (default .venv). The
# extension is rebuilt only when csrc/ or setup.py change. CUDA kernels are
# compiled when nvcc is found (LORA_KERNELS_SKIP_CUDA_BUILD=1 to skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="${LORA_KERNELS_VENV:-.venv}"
PY="$VENV/bin/python"

stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

setup() {
  if [ ! -x "$PY" ]; then
    echo "[run.sh] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local req_stamp build_stamp
  req_stamp=$(stamp_of requirements-dev.txt)
  if [ "$(cat "$VENV/.requirements-stamp" 2>/dev/null)" != "$req_stamp" ]; then
    echo "[run.sh] installing requirements-dev.txt (first time: a few minutes)"
    "$PY" -m pip install --disable-pip-version-check -q -r requirements-dev.txt
    echo "$req_stamp" > "$VENV/.requirements-stamp"
    rm -f "$VENV/.build-stamp"
  fi
  build_stamp=$(stamp_of setup.py pyproject.toml csrc/*)
  if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$build_stamp" ] || ! "$PY" -c "import lora_kernels._C" 2>/dev/null; then
    echo "[run.sh] building lora_kernels._C (C++ always, CUDA when nvcc is found)"
    MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation -e .
    echo "$build_stamp" > "$VENV/.build-stamp"
  fi
}

command="${1:-}"
shift || true
case "$command" in
  setup) setup ;;
  test) setup; exec "$PY" -m pytest tests "$@" ;;
  bench) setup; if [ $# -eq 0 ]; then set -- --quick; fi; exec "$PY" -m benchmarks "$@" ;;
  *) echo "usage: ./run.sh {bench|test|setup} [args]" >&2; exit 2 ;;
esac
