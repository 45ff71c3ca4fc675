"""GPU properties checked without a GPU: Triton compiles the kernels for sm_90 on this machine.

The whole matrix (every kernel × config × dtype × flag, sm_90 and sm_80) is
benchmarks/gpu_compile_check.py, which CI runs; here, the checks that must never regress
(the merge kernel has no FMA; the check itself can see one) and the autotuner's pruning.
They run in a subprocess: compiling needs TRITON_INTERPRET off, and the tests set it on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_merge_kernels_compile_for_sm90_without_fma_contraction():
    result = _run("""
        import sys
        from benchmarks.gpu_compile_check import main
        sys.exit(main(["--arch", "90", "--dtypes", "bfloat16,float32", "--only", "merge"]))
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 compiles" in result.stdout, result.stdout


def test_the_fma_check_sees_a_contracted_merge():
    """With fusion on (Triton's default), the merge's s·d − s'·d' becomes an FMA: what the flag prevents."""
    result = _run("""
        import torch
        from triton.runtime import driver
        from benchmarks.gpu_compile_check import StandInDriver
        driver.set_active(StandInDriver(90))
        from lora_kernels.ops import triton_merge
        w, A, B = torch.empty(256, 256), torch.empty(16, 256), torch.empty(256, 16)
        kernel, _, args, flags = triton_merge.merge_launch_args(w, A, B, 2.0, A, B, 0.5, False,
                                                                torch.zeros(1, dtype=torch.int32))
        fused = kernel.warmup(*args, grid=(1,), **dict(flags, enable_fp_fusion=True)).asm["ptx"]
        plain = kernel.warmup(*args, grid=(1,), **flags).asm["ptx"]
        print("fused:", "fma.rn" in fused, "plain:", "fma.rn" in plain)
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused: True plain: False" in result.stdout, result.stdout


def test_autotune_pruning_keeps_configs_that_fit():
    import triton

    from lora_kernels.ops import triton_common
    from lora_kernels.ops.triton_common import fitting_configs, shared_memory_estimate

    configs = [triton.Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), num_warps=8, num_stages=3),
               triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), num_warps=4, num_stages=3)]
    x16, x32 = torch.empty(8, 8, dtype=torch.bfloat16), torch.empty(8, 8)
    flags = dict(BLOCK_R=64, SHRINK_IN_LOOP=False)
    assert shared_memory_estimate(configs[0], 2, 64, False) == 3 * (128 * 64 + 64 * 256) * 2
    # decoding with float32 adapters on a bf16 x: the shrink's d tile is counted at 4 bytes per element
    assert shared_memory_estimate(configs[0], 2, 64, True, 4) == 3 * ((128 * 64 + 64 * 256) * 2 + 64 * 64 * 4)
    # sm_80's limit (the CPU default): the big bf16 tile fits, its fp32 twin does not
    assert fitting_configs(configs, {"x_ptr": x16, "d_ptr": x16}, **flags) == configs
    assert fitting_configs(configs, {"x_ptr": x32, "d_ptr": x32}, **flags) == configs[1:]
    # nothing fits: the smallest config with two stages, never an empty list
    original = triton_common.shared_memory_limit
    try:
        triton_common.shared_memory_limit = lambda device: 1024
        (fallback,) = fitting_configs(configs, {"x_ptr": x32, "d_ptr": x32}, **flags)
        assert fallback.kwargs["BLOCK_N"] == 64 and fallback.num_stages == 2
    finally:
        triton_common.shared_memory_limit = original
