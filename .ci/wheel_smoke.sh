#!/usr/bin/env bash
# Build the wheel, install it (no source tree in sight) into a fresh virtual
# environment that borrows torch from .venv, and check it works there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${LORA_KERNELS_VENV:-.venv}"
rm -rf dist
MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip wheel . --no-build-isolation --no-deps -q -w dist/
wheel=$(ls dist/lora_kernels-*.whl)
# (not `unzip -l | grep -q`: under pipefail, grep's early exit can kill unzip with SIGPIPE and fail at random)
"$VENV/bin/python" - "$wheel" <<'PY'
import sys, zipfile
import torch

wheel = zipfile.ZipFile(sys.argv[1])
names = wheel.namelist()
if not any(n.startswith("lora_kernels/_C") and n.endswith(".so") for n in names):
    sys.exit(f"wheel has no compiled extension; it holds: {names}")
# the wheel asks for the torch minor it was built against, and no other
metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
wanted = {f">={major}.{minor}", f"<{major}.{minor + 1}"}
torch_lines = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
if len(torch_lines) != 1 or not all(w in torch_lines[0] for w in wanted):
    sys.exit(f"the wheel's torch requirement is {torch_lines}, expected {sorted(wanted)}")
PY

fresh=$(mktemp -d)/venv
python3 -m venv "$fresh"
dev_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
fresh_site=$("$fresh/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# torch (and triton) from the dev environment; lora_kernels only from the wheel
echo "$dev_site" > "$fresh_site/_dev_torch.pth"
"$fresh/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$wheel"

# where nvcc and a CUDA build of torch are present, the CUDA kernels must have been compiled
expect_cuda=0
if command -v nvcc >/dev/null && "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  expect_cuda=1
fi
cd "$(dirname "$fresh")"
EXPECT_CUDA=$expect_cuda "$fresh/bin/python" - <<'PY'
import os
import torch
import lora_kernels
from lora_kernels import reference

assert "site-packages" in lora_kernels.__file__, lora_kernels.__file__
assert "cpu" in lora_kernels.available_backends(), lora_kernels.available_backends()
if os.environ["EXPECT_CUDA"] == "1":
    assert lora_kernels.compiled_extension().with_cuda, "nvcc was found but the CUDA kernels were not compiled"
torch.manual_seed(0)
x, w, b = torch.randn(9, 33), torch.randn(70, 33), torch.randn(70)
A, B = torch.randn(4, 33), torch.randn(70, 4)
y = lora_kernels.lora_linear(x, w, b, A, B, 2.0)
torch.testing.assert_close(y, reference.lora_linear(x, w, b, A, B, 2.0)[0], rtol=1e-5, atol=1e-4)
w0 = w.clone()
lora_kernels.merge_(w, A, B, 2.0, safe=True)
torch.testing.assert_close(w, reference.merge(w0, A, B, 2.0), rtol=1e-5, atol=1e-5)
print(f"wheel smoke test passed: {lora_kernels.__file__}, backends {lora_kernels.available_backends()}, "
      f"CUDA kernels compiled: {lora_kernels.compiled_extension().with_cuda}")
PY
