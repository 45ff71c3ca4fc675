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
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess:
    """The code in a fresh interpreter (from a file: Triton reads a @jit function's source from it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "check.py"
        script.write_text(textwrap.dedent(code))
        return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)


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
    flags = dict(BLOCK_R=64, SHRINK_IN_LOOP=False, DROPOUT_SHRINK=False, DROPOUT_EPILOGUE=False)
    assert shared_memory_estimate(configs[0], 2, 64, False) == 3 * (128 * 64 + 64 * 256) * 2
    # decoding with float32 adapters on a bf16 x: the shrink's d tile is counted at 4 bytes per element
    # (and once more for the converted copy the compiler stages: 86,016 B allocated against 81,920 without it)
    assert shared_memory_estimate(configs[0], 2, 64, True, 4) == (3 * ((128 * 64 + 64 * 256) * 2 + 64 * 64 * 4)
                                                                  + 64 * 64 * 4)
    # sm_80's limit (the CPU default): the big bf16 tile fits, its fp32 twin does not
    assert fitting_configs(configs, {"x_ptr": x16, "u_ptr": x16, "d_ptr": x16}, **flags) == configs
    assert fitting_configs(configs, {"x_ptr": x32, "u_ptr": x32, "d_ptr": x32}, **flags) == configs[1:]
    # nothing fits: the smallest config with two stages, never an empty list
    original = triton_common.shared_memory_limit
    try:
        triton_common.shared_memory_limit = lambda device: 1024
        (fallback,) = fitting_configs(configs, {"x_ptr": x32, "u_ptr": x32, "d_ptr": x32}, **flags)
        assert fallback.kwargs["BLOCK_N"] == 64 and fallback.num_stages == 2
    finally:
        triton_common.shared_memory_limit = original


def test_ptxas_sees_the_spills_that_cuobjdump_does_not():
    """A config that spills (128×256×64, 8 warps: dropped from the GEMM list for it): ptxas -v reports its stack
    frame and spill stores, while cuobjdump's LOCAL, which the check used to read, stays 0."""
    result = _run("""
        import torch, triton
        from triton.runtime import driver
        from benchmarks.gpu_compile_check import StandInDriver, ptxas_report, resource_usage
        driver.set_active(StandInDriver(90))
        from lora_kernels.ops import triton_lora_linear as lin
        e = lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt)
        kernel, _, args, flags = lin.fused_gemm_launch_args(e(4096, 4096), e(4096, 4096).t(), e(4096), e(4096, 16),
                                                            e(4096, 16).t(), None, e(4096, 4096), 2.0, 0.0, None,
                                                            shrink_in_loop=False, dropout_epilogue=False)
        compiled = kernel.fn.warmup(*args, grid=(1,), **flags, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8,
                                    num_warps=8, num_stages=3)
        report = ptxas_report(compiled.asm["ptx"])
        print("spill stores", report["spill_stores"], "stack", report["stack"],
              "local", resource_usage(compiled.asm["cubin"])["local"])
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    words = result.stdout.split()
    assert int(words[words.index("stores") + 1]) > 0 and int(words[words.index("stack") + 1]) > 0, result.stdout
    assert words[words.index("local") + 1] == "0", result.stdout


def test_the_tf32_check_tells_three_tf32_products_from_plain_tf32():
    """dot() gives a float32 operand three TF32 products (split by cvt.rna); a plain TF32 dot, Triton's default
    for float32, is what the check refuses."""
    result = _run("""
        import torch, triton, triton.language as tl
        from triton.runtime import driver
        from benchmarks.gpu_compile_check import StandInDriver, mma_kinds
        driver.set_active(StandInDriver(90))
        from lora_kernels.ops.triton_common import dot

        @triton.jit
        def product(a_ptr, b_ptr, c_ptr, PLAIN: tl.constexpr):
            i = tl.arange(0, 32)
            a = tl.load(a_ptr + i[:, None] * 32 + i[None, :])
            b = tl.load(b_ptr + i[:, None] * 32 + i[None, :]).to(tl.float32)
            acc = tl.zeros((32, 32), dtype=tl.float32)
            if PLAIN:
                acc = tl.dot(a, b, acc)
            else:
                acc = dot(a, b, acc, False)
            tl.store(c_ptr + i[:, None] * 32 + i[None, :], acc)

        a, b, c = torch.empty(32, 32), torch.empty(32, 32, dtype=torch.bfloat16), torch.empty(32, 32)
        for plain in (True, False):
            kinds = mma_kinds(product.warmup(a, b, c, PLAIN=plain, grid=(1,)).asm["ptx"])
            print("plain" if plain else "ours", kinds["plain_tf32"], kinds["tf32x3"])
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plain True False" in result.stdout and "ours False True" in result.stdout, result.stdout


def test_integers_that_change_per_call_compile_one_variant():
    """20 seeds (0, 1, 16, 2^31, 2^62 - 1, ...) and 4 dropout probabilities × 5 batch sizes: one compiled variant
    per kernel; and the probe's counting does see Triton's specialisation of an unmarked integer."""
    result = _run("""
        import torch, triton, triton.language as tl
        from triton.runtime import driver
        from benchmarks.gpu_compile_check import StandInDriver, specialization_probe
        driver.set_active(StandInDriver(90))

        @triton.jit
        def unmarked(p, n):
            tl.store(p, n)

        @triton.jit(do_not_specialize=["n"])
        def marked(p, n):
            tl.store(p, n)

        out = torch.empty(1, dtype=torch.int64)
        for kernel in (unmarked, marked):
            print(kernel.fn.__name__, len({kernel.warmup(out, n, grid=(1,)).hash for n in (1, 16, 17, 2**31)}))
        print(specialization_probe())
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unmarked 3" in result.stdout or "unmarked 4" in result.stdout, result.stdout
    assert "marked 2" in result.stdout, result.stdout  # int32 and int64: the seed is passed as a tensor
    counts = eval(result.stdout.strip().splitlines()[-1])
    assert counts and set(counts.values()) == {1}, counts


def test_the_ptxas_log_parser_reads_spills_and_serialized_wgmma():
    """No config left here makes ptxas 12.9 or 13.0 serialize wgmma, so the warning is checked on a log of the
    shape ptxas writes (with a stack frame and spills, as the removed 128×256×64 config had)."""
    from benchmarks.gpu_compile_check import parse_ptxas_log

    log = ("ptxas info    : Compiling entry function '_fused_gemm_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _fused_gemm_kernel\n"
           "    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n"
           "ptxas /tmp/k.ptx, line 1711; warning : (C7512) Potential Performance Loss: wgmma.mma_async "
           "instructions are serialized due to insufficient register resources for the wgmma pipeline\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == dict(ptxas_regs=255, stack=16, spill_stores=12, spill_loads=12,
                                        wgmma_serialized=True)
    clean = parse_ptxas_log("    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                            "ptxas info    : Used 138 registers\n")
    assert clean == dict(ptxas_regs=138, stack=0, spill_stores=0, spill_loads=0, wgmma_serialized=False)
