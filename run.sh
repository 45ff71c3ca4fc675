#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine (Python 3.10+, a C++ compiler):
#
#   ./run.sh bench [args]   the benchmark: prints the comparison table (default: --quick)
#   ./run.sh test [args]    the test suite (pytest args pass through; paths replace the default tests/)
#   ./run.sh setup          only create .venv, install requirements-dev.txt, build lora_kernels._C
#
# The virtual environment lives in $LORA_KERNELS_VENV (default .venv). The
# extension is rebuilt only when csrc/, setup.py or the CUDA choice change.
# CUDA kernels are compiled when nvcc is found AND this machine has an NVIDIA GPU,
# or when LORA_KERNELS_BUILD_CUDA=1 asks for them (CI does, so the .cu keeps
# compiling); LORA_KERNELS_SKIP_CUDA_BUILD=1 never builds them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="${LORA_KERNELS_VENV:-.venv}"
PY="$VENV/bin/python"
START=$SECONDS

say() { echo "[run.sh +$((SECONDS - START))s] $*"; }

# A line every 20 s while a long silent step runs (pip's downloads, the C++/CUDA build), so that a first run
# shows it is alive: heartbeat "what"; ...; stop_heartbeat.
HEARTBEAT=""
heartbeat() {
  local what=$1 began=$SECONDS
  ( while sleep 20; do say "still $what ($((SECONDS - began)) s so far)"; done ) &
  HEARTBEAT=$!
}
stop_heartbeat() {
  if [ -n "$HEARTBEAT" ]; then kill "$HEARTBEAT" 2>/dev/null || true; wait "$HEARTBEAT" 2>/dev/null || true; fi
  HEARTBEAT=""
}
trap stop_heartbeat EXIT
stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
have_gpu() { [ -e /dev/nvidia0 ] || nvidia-smi -L >/dev/null 2>&1; }

# pip's own progress, one line per package it fetches or installs (its warnings about
# ignored index locations, which this kind of machine's pip config prints, are dropped).
pip_install() {
  "$PY" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 |
    { grep --line-buffered -E '^(Collecting|Successfully installed|ERROR|error)' || true; }
}

cuda_choice() {
  if [ "${LORA_KERNELS_SKIP_CUDA_BUILD:-0}" = 1 ]; then echo "skip (LORA_KERNELS_SKIP_CUDA_BUILD=1)"
  elif [ "${LORA_KERNELS_BUILD_CUDA:-0}" = 1 ]; then echo "build (LORA_KERNELS_BUILD_CUDA=1)"
  elif have_gpu; then echo "build (an NVIDIA GPU is present)"
  else echo "skip (no GPU here; LORA_KERNELS_BUILD_CUDA=1 builds them anyway)"
  fi
}

setup() {
  if [ ! -x "$PY" ]; then
    say "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local req_stamp build_stamp cuda
  req_stamp=$(stamp_of requirements-dev.txt)
  if [ "$(cat "$VENV/.requirements-stamp" 2>/dev/null)" != "$req_stamp" ]; then
    say "installing requirements-dev.txt into $VENV (first time: several minutes; torch alone is ~1-5 GB)"
    heartbeat "installing requirements"
    pip_install -r requirements-dev.txt
    stop_heartbeat
    echo "$req_stamp" > "$VENV/.requirements-stamp"
    rm -f "$VENV/.build-stamp"
    say "requirements installed"
  fi
  cuda=$(cuda_choice)
  build_stamp=$(printf '%s\n%s' "$(stamp_of setup.py pyproject.toml $(find csrc -type f | sort))" "${cuda%% *}" |
    sha256sum | cut -c1-16)
  if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$build_stamp" ] || ! "$PY" -c "import lora_kernels._C" 2>/dev/null; then
    say "building lora_kernels._C: C++ CPU kernels; CUDA kernels: $cuda"
    local skip=1
    [ "${cuda%% *}" = build ] && skip=0
    heartbeat "building lora_kernels._C"
    LORA_KERNELS_SKIP_CUDA_BUILD=$skip MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . 2>&1 |
      { grep -v "^WARNING: Location" || true; }
    stop_heartbeat
    say "built lora_kernels._C"
    echo "$build_stamp" > "$VENV/.build-stamp"
  fi
  "$PY" - <<'PY'
import os, torch, lora_kernels
C = lora_kernels.compiled_extension()
built = "none (the reference backend only)" if C is None else "cpu" + (
    f", cuda (archs {os.environ.get('LORA_KERNELS_CUDA_ARCHS', '8.0;8.6;8.9;9.0')})" if C.with_cuda else "")
import importlib.util
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU here"
backends = lora_kernels.available_backends()
if "triton" not in backends and importlib.util.find_spec("triton") is not None:
    backends.append("triton (interpreter: TRITON_INTERPRET=1, as the tests run it)")
print(f"[run.sh] ready: torch {torch.__version__}; compiled: {built}; {gpu}; backends: {', '.join(backends)}")
PY
}

command="${1:-}"
shift || true
case "$command" in
  setup) setup ;;
  test)
    setup
    # the default tests/ only when no test path was given (./run.sh test tests/test_errors.py)
    for arg in "$@"; do
      if [ -e "${arg%%::*}" ]; then exec "$PY" -m pytest "$@"; fi
    done
    exec "$PY" -m pytest tests "$@" ;;
  bench) setup; if [ $# -eq 0 ]; then set -- --quick; fi; exec "$PY" -m benchmarks "$@" ;;
  *) echo "usage: ./run.sh {bench|test|setup} [args]" >&2; exit 2 ;;
esac
