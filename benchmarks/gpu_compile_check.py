"""Compile every Triton kernel for a GPU, without one, and check what only a GPU would show.

    python -m benchmarks.gpu_compile_check [--arch 90,80] [--dtypes bfloat16,float16,float32] [--out DIR]

Triton compiles for a stand-in target (sm_90: H100/H200; sm_80: A100) on this CPU-only machine;
the wheel's bundled cuobjdump reads registers and local memory from the cubin. For every kernel ×
autotune config the autotuner can pick (after its shared-memory pruning) × dtype × flag variant
(bias, dropout, rank tile 16/64, which covers r = 16 … 512 since larger ranks run in chunks of 64), on a 16-bit
or a 4-bit (NF4) W0:

- shared memory must fit the architecture (sm_90: 232,448 B; sm_80: 166,912 B), and the pruner's
  estimate must not be below what the compiler allocates;
- 16-bit configs must not spill: `ptxas -v` of the kernel's own PTX must report a 0-byte stack frame and
  no spill stores or loads (ptxas keeps spills in the stack frame; cuobjdump's LOCAL stays 0 even then).
  float32 ones are reported (auto sends float32 to cuBLAS);
- no config may make ptxas serialize its wgmma instructions (warning C7512);
- no PTX may hold a TF32 MMA: every float32 operand of a dot is one whose precision is promised
  (float32 x, float32 adapters, the backward's float32 gb), so those dots must run in full precision;
- the merge kernel's PTX must hold no FMA (fma.rn): a contracted s·d − s'·d' would make switching
  adapters back and forth drift;
- the 4-bit GEMMs (lora_linear_4bit: W0's tiles dequantized in the K loop) must feed tensor cores: wgmma in
  every large-M config on sm_90, mma.sync at least elsewhere;
- integers that change from call to call must not make new variants: the kernels launched with 20 seeds
  and dropout probabilities × 5 batch sizes must compile to one variant each (Triton specialises an
  integer argument that is 1 or a multiple of 16 unless told not to).

Prints one line per compile (and its time), writes gpu_compile_check.json, exits 1 on any violation.
Runs in CI (`.ci/run`); about 4–6 minutes on 2 cores with an empty Triton cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_LIMIT = {90: 232448, 80: 166912}


class StandInDriver:
    """Enough of Triton's driver for compiling: the target, device 0, stream 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _tool(name: str) -> Path:
    """One of the CUDA tools the Triton wheel bundles (cuobjdump, ptxas, ptxas-blackwell)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (bytes per thread) of the cubin's kernel, from cuobjdump."""
    tool = _tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key in ("REG", "LOCAL"):  # the stack frame comes from ptxas -v (ptxas_report)
        match = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(match.group(1)) if match else None
    return usage


def ptxas_report(ptx: str) -> dict:
    """What `ptxas -v` says of a kernel's PTX: registers, stack frame, spill stores and loads (bytes per thread),
    and whether it serialized the wgmma instructions (warning C7512). The PTX names its own target (sm_90a, ...).
    Triton 3.9's PTX (ISA 9.x) is newer than the wheel's ptxas knows: its ptxas-blackwell then assembles it."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        for tool in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([str(_tool(tool)), "-v", "-lineinfo", f"--gpu-name={target}", str(source), "-o",
                                  str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
            if run.returncode == 0:
                break
        else:
            raise RuntimeError(f"ptxas could not assemble the PTX: {run.stderr[-2000:]}")
    return parse_ptxas_log(run.stdout + run.stderr)


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame, spill stores/loads and the C7512 warning (serialized wgmma) of a `ptxas -v` log."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    return dict(ptxas_regs=int(registers.group(1)) if registers else None,
                stack=int(frame.group(1)) if frame else 0, spill_stores=int(frame.group(2)) if frame else 0,
                spill_loads=int(frame.group(3)) if frame else 0, wgmma_serialized="C7512" in log)


def mma_kinds(ptx: str) -> dict:
    """The tensor-core instructions of a PTX: async wgmma (sm_90), mma.sync, TMA, and TF32 MMAs: split ones (the
    float32 operands cut into TF32 parts, about float32's precision: Triton's tf32x3 or triton_common.dot's
    two-part split) or plain TF32 (the operands' low 13 mantissa bits dropped, no conversion)."""
    tf32 = re.search(r"mma[.\w]*\.tf32", ptx) is not None
    # Triton's tf32x3 rounds with cvt.rna; triton_common.dot's own split with the mask 0xFFFFE000 (-8192)
    split = "cvt.rna.tf32.f32" in ptx or re.search(r"and\.b32\s+%r\d+, %r\d+, -8192;", ptx) is not None
    return dict(wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx, tma="cp.async.bulk.tensor" in ptx,
                tf32x3=tf32 and split, plain_tf32=tf32 and not split)


def variants(dtypes, arch: int):
    """(name, jit function, configs or [None], args, flags, dtype, rank tile, shrink_in_loop) of every launch
    the launchers make, built by the launchers' own *_launch_args from tensors shaped as in a real call
    (CPU tensors: only their dtypes, strides and alignment matter to the compiler)."""
    import torch

    from lora_kernels.ops import triton_lora_linear as lin
    from lora_kernels.ops import triton_lora_linear_multi as multi
    from lora_kernels.ops import triton_merge as mer
    from lora_kernels.ops import triton_common
    from lora_kernels.ops.triton_common import fitting_configs

    # the pruner asks the device for its limit and capability; here the device is the stand-in target
    triton_common.shared_memory_limit = lambda device: SHARED_LIMIT[arch]
    triton_common.compute_capability = lambda device: divmod(arch, 10)
    M, N, K = 4096, 4096, 4096
    seed = torch.zeros((), dtype=torch.int64)  # the dropout seed, read in device memory
    for dtype in dtypes:
        e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
        for r in (16, 64):  # the rank tiles: r <= 16, and every r above 32 (chunks of 64)
            weight, bias, lora_A, lora_B = e(N, K), e(N), e(r, K), e(N, r)
            for p in (0.0, 0.1):
                x, xa, grad_y = e(M, K), e(M, r), e(M, N)
                gb = e(M, r, dt=torch.float32)
                launches = [
                    ("gemm y" + (" nobias" if p else ""), lin.fused_gemm_launch_args(
                        x, weight.t(), None if p else bias, xa, lora_B.t(), None, e(M, N), 2.0, p, seed,
                        shrink_in_loop=False, dropout_epilogue=False)),
                    (f"gemm dx p={p}", lin.fused_gemm_launch_args(
                        grad_y, weight, None, gb, lora_A, None, e(M, K), 2.0, p, seed,
                        shrink_in_loop=False, dropout_epilogue=True)),
                    (f"decode p={p}", lin.fused_gemm_launch_args(
                        e(16, K), weight.t(), bias, e(16, r), lora_B.t(), lora_A.t(), e(16, N), 2.0, p, seed,
                        shrink_in_loop=True, dropout_epilogue=False)),
                    (f"weight grad dA p={p}", lin.weight_grad_launch_args(
                        gb, x, e(4, r, K, dt=torch.float32), 1024, p, seed)),
                ]
                # the shrink's row tile follows M (shrink_rows): each tile the launcher can pick
                launches += [(f"shrink xa p={p} M={m}", lin.shrink_launch_args(e(m, K), lora_A.t(), e(m, r), p, seed))
                             for m in (2048, 8448, 16896)]
                if (r, p) in ((16, 0.0), (64, 0.1)):  # decode of a narrow layer (1024 columns), split over K
                    n_narrow = 1024
                    launches.append((f"split decode r={r} p={p}", lin.fused_gemm_launch_args(
                        e(16, K), weight[:n_narrow].t(), bias[:n_narrow], e(16, r), lora_B[:n_narrow].t(),
                        lora_A.t(), e(16, n_narrow), 2.0, p, seed, shrink_in_loop=True, dropout_epilogue=False,
                        part=e(4, 16, n_narrow, dt=torch.float32), part_l=e(4, 16, max(16, r), dt=torch.float32))))
                    launches.append((f"split finish r={r} p={p}", lin.split_finish_launch_args(
                        e(4, 16, n_narrow, dt=torch.float32), e(4, 16, max(16, r), dt=torch.float32), bias[:n_narrow],
                        e(16, r), lora_B[:n_narrow].t(), e(16, n_narrow), 2.0, p)))
                if p == 0.0 and r == 16:  # the CUDA-graph decode: the scaling read from device memory
                    launches.append(("decode scaling in memory", lin.fused_gemm_launch_args(
                        e(16, K), weight.t(), bias, e(16, r), lora_B.t(), lora_A.t(), e(16, N),
                        e((), dt=torch.float64), p, seed, shrink_in_loop=True, dropout_epilogue=False)))
                if p == 0.0:  # DoRA's forward: y = g ⊙ (...) + b in the epilogue, z stored beside y (training)
                    launches += _dora_gemm_variants(lin, e, x, weight, bias, xa, lora_A, lora_B, r, M, N, K, seed)
                if p == 0.0:
                    launches += [
                        ("shrink gb", lin.shrink_launch_args(grad_y, lora_B, gb, 0.0, None)),
                        ("weight grad dB", lin.weight_grad_launch_args(xa, grad_y, e(4, r, N, dt=torch.float32),
                                                                       1024, 0.0, None)),
                        ("finish dA", lin.finish_launch_args(e(4, r, K, dt=torch.float32), lora_A, 2.0, 1.25)),
                        ("finish dB in memory", lin.finish_launch_args(e(4, r, N, dt=torch.float32), lora_B.t(),
                                                                        e((), dt=torch.float64), 1.0)),
                    ]
                for name, (kernel, _, args, flags) in launches:
                    if hasattr(kernel, "configs"):  # autotuned: every config its pruner keeps on this arch
                        kept = fitting_configs(kernel.configs, {"x_ptr": args[0], "u_ptr": args[4], "d_ptr": args[5]}, **flags)
                        yield name, kernel.fn, kept, args, flags, dtype, flags["BLOCK_R"], flags["SHRINK_IN_LOOP"]
                    else:
                        yield name, kernel, [None], args, flags, dtype, flags.get("BLOCK_R", 0), None
        yield from _multi_variants(multi, e, dtype, M, N, K)
        if dtype in (torch.float16, torch.bfloat16):
            yield from _mixed_variants(lin, multi, e, dtype, M, N, K)
            yield from _weight4bit_variants(lin, e, dtype, M, N, K)
        w = e(N, K)
        A, B = e(16, K), e(N, 16)
        for sub in (False, True):
            for check_only in (False, True):
                kernel, _, args, flags = mer.merge_launch_args(w, A, B, 2.0, A if sub else None, B if sub else None,
                                                               0.5, check_only, torch.zeros(1, dtype=torch.int32))
                yield (f"merge{' switch' if sub else ''}{' check' if check_only else ''}", kernel, [None], args,
                       flags, dtype, 16, None)
        yield from _dora_variants(e, dtype, M, N)


def _dora_gemm_variants(lin, e, x, weight, bias, xa, lora_A, lora_B, r, M, N, K, seed):
    """The fused GEMM with DoRA's gain in its epilogue (GAIN, and STORE_Z when training keeps z): large M, decode,
    and at r = 16 the split decode with its finish kernel."""
    import torch

    gain = e(N, dt=torch.float32)
    launches = []
    for z in (e(M, N), None):
        keep = " z" if z is not None else ""
        launches += [
            ("dora gemm y" + keep, lin.fused_gemm_launch_args(
                x, weight.t(), bias, xa, lora_B.t(), None, e(M, N), 2.0, 0.0, seed, shrink_in_loop=False,
                dropout_epilogue=False, gain=gain, z=z)),
            ("dora decode" + keep, lin.fused_gemm_launch_args(
                e(16, K), weight.t(), bias, e(16, r), lora_B.t(), lora_A.t(), e(16, N), 2.0, 0.0, seed,
                shrink_in_loop=True, dropout_epilogue=False, gain=gain, z=None if z is None else e(16, N)))]
    if r == 16:
        n = 1024
        part, part_l = e(4, 16, n, dt=torch.float32), e(4, 16, 16, dt=torch.float32)
        launches += [
            ("dora split decode z", lin.fused_gemm_launch_args(
                e(16, K), weight[:n].t(), bias[:n], e(16, r), lora_B[:n].t(), lora_A.t(), e(16, n), 2.0, 0.0, seed,
                shrink_in_loop=True, dropout_epilogue=False, part=part, part_l=part_l, gain=gain[:n], z=e(16, n))),
            ("dora split finish z", lin.split_finish_launch_args(part, part_l, bias[:n], e(16, r), lora_B[:n].t(),
                                                                 e(16, n), 2.0, 0.0, gain[:n], e(16, n)))]
    return launches


def _dora_variants(e, dtype, M, N):
    """DoRA's gain epilogues (ops/triton_dora.py): y = g ⊙ z + b from a z of x's dtype and from a float32 z (float32
    adapters), in place; g ⊙ dy with the row sums of dy ⊙ z, and alone (the dropout term's (1 − g) ⊙ dy)."""
    import torch

    from lora_kernels.ops import triton_dora as dora

    f32 = lambda *shape: e(*shape, dt=torch.float32)  # noqa: E731
    z, gain, bias, grad_y = e(M, N), f32(N), e(N), e(M, N)
    part = f32(M // 32, N)
    launches = [("dora gain", dora.gain_launch_args(z, gain, bias, e(M, N))),
                ("dora gain in place", dora.gain_launch_args(z, gain, None, z)),
                ("dora gain float32 z", dora.gain_launch_args(f32(M, N), gain, bias, e(M, N))),
                ("dora gain grad", dora.gain_grad_launch_args(grad_y, z, gain, e(M, N), part)),
                ("dora gain grad float32", dora.gain_grad_launch_args(grad_y, f32(M, N), gain, f32(M, N), part)),
                ("dora gain grad alone", dora.gain_grad_launch_args(grad_y, None, gain, e(M, N), None))]
    for name, (kernel, _, args, flags) in launches:
        yield name, kernel, [None], args, flags, dtype, 0, None


def _mixed_variants(lin, multi, e, dtype, M, N, K, r=16, n=32):
    """float32 adapters on a 16-bit x (PEFT's default): the launches whose operands change dtype, for both ops."""
    import torch

    f32 = lambda *shape: e(*shape, dt=torch.float32)  # noqa: E731
    weight, bias, lora_A, lora_B = e(N, K), e(N), f32(r, K), f32(N, r)
    x, xa, grad_y, gb = e(M, K), f32(M, r), e(M, N), f32(M, r)
    seed = torch.zeros((), dtype=torch.int64)
    launches = [("mixed gemm y", lin.fused_gemm_launch_args(x, weight.t(), bias, xa, lora_B.t(), None, e(M, N), 2.0,
                                                             0.0, None, shrink_in_loop=False, dropout_epilogue=False)),
                ("mixed decode", lin.fused_gemm_launch_args(e(16, K), weight.t(), bias, f32(16, r), lora_B.t(),
                                                             lora_A.t(), e(16, N), 2.0, 0.1, seed, shrink_in_loop=True,
                                                             dropout_epilogue=False)),
                ("mixed gemm dx p=0.1", lin.fused_gemm_launch_args(grad_y, weight, None, gb, lora_A, None, e(M, K),
                                                                    2.0, 0.1, seed, shrink_in_loop=False,
                                                                    dropout_epilogue=True)),
                ("mixed shrink xa", lin.shrink_launch_args(x, lora_A.t(), xa, 0.1, seed)),
                ("mixed shrink gb", lin.shrink_launch_args(grad_y, lora_B, gb, 0.0, None)),
                ("mixed weight grad dA", lin.weight_grad_launch_args(gb, x, f32(4, r, K), 1024, 0.1, seed)),
                ("mixed weight grad dB", lin.weight_grad_launch_args(xa, grad_y, f32(4, r, N), 1024, 0.0, None)),
                ("mixed finish dA", lin.finish_launch_args(f32(4, r, K), lora_A, 2.0, 1.25))]
    groups = multi.Groups(torch.randint(-1, n, (M,)), n, multi._tile_rows())
    ranks, scalings = torch.full((n,), r), torch.ones(n)
    dropout = multi._dropout_tensors(torch.full((n,), 0.1, dtype=torch.float64), "cpu")
    stacked_A, stacked_B = f32(n, r, K), f32(n, N, r)
    a_t = (stacked_A.stride(0), stacked_A.stride(2), stacked_A.stride(1))
    b_t = (stacked_B.stride(0), stacked_B.stride(2), stacked_B.stride(1))
    launches += [("mixed multi shrink xa", multi.shrink_launch_args(x, stacked_A, a_t, xa, groups, ranks, scalings,
                                                                    False, dropout, seed, r)),
                 ("mixed multi expand y", multi.expand_launch_args(xa, stacked_B, b_t, e(M, N), groups, ranks,
                                                                   scalings, True, None, None, r)),
                 ("mixed multi weight grad dA", multi.weight_grad_launch_args(
                     gb, x, f32(2, n, r, K), groups, ranks, scalings, False, dropout, seed, r))]
    for name, (kernel, _, args, flags) in launches:
        if hasattr(kernel, "configs"):
            from lora_kernels.ops.triton_common import fitting_configs

            kept = fitting_configs(kernel.configs, {"x_ptr": args[0], "u_ptr": args[4], "d_ptr": args[5]}, **flags)
            yield name, kernel.fn, kept, args, flags, dtype, flags["BLOCK_R"], flags["SHRINK_IN_LOOP"]
        else:
            yield name, kernel, [None], args, flags, dtype, flags.get("BLOCK_R", 0), None


def _weight4bit_variants(lin, e, dtype, M, N, K):
    """The fused GEMMs on a 4-bit W0 (lora_linear_4bit, and lora_linear_multi_4bit's base products): y (with bias;
    y's GEMM has no dropout of its own, and its LoRA tile is 16 ranks whatever r), dx with and without its dropout
    epilogue, decode at r = 16 and r = 64 (r = 128 takes the y path), float32 adapters, bitsandbytes' float32 absmax
    (no double quantization), and the whole-weight dequantization kernel (both tile paths: a weight whose rows do
    not start a scale block is dequantized by it before the 16-bit kernels run)."""
    import torch

    from lora_kernels.weight4bit import empty_kernel_args

    f32 = lambda *shape: e(*shape, dt=torch.float32)  # noqa: E731
    w4, w4_plain = empty_kernel_args(N, K), empty_kernel_args(N, K, double_quant=False)
    w4_dx = empty_kernel_args(K, N)  # dx's GEMM: W0 [K, N] as its weight, read untransposed
    seed = torch.zeros((), dtype=torch.int64)
    x, grad_y, bias = e(M, K), e(M, N), e(N)
    launches = [("4bit gemm y", lin.fused_gemm_launch_args(x, None, bias, e(M, 16), e(16, N), None, e(M, N), 2.0,
                                                           0.0, None, False, False, w4=w4, w4_transposed=True)),
                ("4bit gemm y float32 absmax", lin.fused_gemm_launch_args(
                    x, None, bias, e(M, 16), e(16, N), None, e(M, N), 2.0, 0.0, None, False, False, w4=w4_plain,
                    w4_transposed=True))]
    for p in (0.0, 0.1):
        launches.append((f"4bit gemm dx p={p}", lin.fused_gemm_launch_args(
            grad_y, None, None, f32(M, 16), e(16, K), None, e(M, K), 2.0, p, seed, False, True, w4=w4_dx)))
    for r, p in ((16, 0.0), (64, 0.1)):
        launches.append((f"4bit decode r={r} p={p}", lin.fused_gemm_launch_args(
            e(16, K), None, bias, e(16, r), e(r, N), e(K, r), e(16, N), 2.0, p, seed, True, False, w4=w4,
            w4_transposed=True)))
    n_narrow = 1024  # a layer too narrow for the GPU: its decode split over K
    launches.append(("4bit split decode", lin.fused_gemm_launch_args(
        e(16, K), None, bias[:n_narrow], e(16, 16), e(16, n_narrow), e(K, 16), e(16, n_narrow), 2.0, 0.0, None, True,
        False, w4=empty_kernel_args(n_narrow, K), w4_transposed=True, part=f32(4, 16, n_narrow), part_l=f32(4, 16, 16))))
    for z in (e(M, N), None):  # QDoRA's forward: the gain in the (transposed) epilogue, z stored or not
        launches.append(("4bit dora gemm y" + (" z" if z is not None else ""), lin.fused_gemm_launch_args(
            x, None, bias, e(M, 16), e(16, N), None, e(M, N), 2.0, 0.0, None, False, False, w4=w4,
            w4_transposed=True, gain=f32(N), z=z)))
    launches.append(("4bit dora decode z", lin.fused_gemm_launch_args(
        e(16, K), None, bias, e(16, 16), e(16, N), e(K, 16), e(16, N), 2.0, 0.0, None, True, False, w4=w4,
        w4_transposed=True, gain=f32(N), z=e(16, N))))
    launches += [("4bit mixed decode", lin.fused_gemm_launch_args(
                     e(16, K), None, bias, f32(16, 16), f32(16, N), f32(K, 16), e(16, N), 2.0, 0.1, seed, True, False,
                     w4=w4, w4_transposed=True)),
                 ("4bit mixed gemm dx p=0.1", lin.fused_gemm_launch_args(
                     grad_y, None, None, f32(M, 16), f32(16, K), None, e(M, K), 2.0, 0.1, seed, False, True,
                     w4=w4_dx))]
    from lora_kernels.ops.triton_common import fitting_configs

    for name, (kernel, _, args, flags) in launches:
        kept = fitting_configs(kernel.configs, {"x_ptr": args[0], "u_ptr": args[4], "d_ptr": args[5]}, **flags)
        yield name, kernel.fn, kept, args, flags, dtype, flags["BLOCK_R"], flags["SHRINK_IN_LOOP"]
    for name, cols in (("4bit dequantize", K), ("4bit dequantize unaligned", K + 32)):  # rows across scale blocks
        kernel, _, args, flags = lin.dequantize_launch_args(empty_kernel_args(N, cols), cols, dtype, e(N, cols))
        yield name, kernel, [None], args, flags, dtype, 0, None


def _multi_variants(multi, e, dtype, M, N, K, n=32):
    """lora_linear_multi's Triton launches (forward and backward, with and without dropout, both rank tiles),
    from its launchers' *_launch_args; the grouping is computed on CPU ids (only its dtypes matter here)."""
    import torch

    groups = multi.Groups(torch.randint(-1, n, (M,)), n, multi._tile_rows())
    seed = torch.zeros((), dtype=torch.int64)
    scalings, x, grad_y = torch.ones(n), e(M, K), e(M, N)
    dropouts = {0.0: None, 0.1: multi._dropout_tensors(torch.full((n,), 0.1, dtype=torch.float64), "cpu")}
    for r in (16, 64):
        ranks = torch.full((n,), r)
        lora_A, lora_B, xa = e(n, r, K), e(n, N, r), e(M, r)
        gb = e(M, r, dt=torch.float32)
        a_t = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))
        b_t = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))
        d_A, d_B_t = e(2, n, r, K, dt=torch.float32), e(2, n, r, N, dt=torch.float32)  # two row slices
        launches = [("multi expand y", multi.expand_launch_args(xa, lora_B, b_t, e(M, N), groups, ranks, scalings,
                                                                 True, None, None, r)),
                    ("multi shrink gb", multi.shrink_launch_args(grad_y, lora_B, lora_B.stride(), gb, groups, ranks,
                                                                 scalings, True, None, None, r)),
                    ("multi weight grad dB", multi.weight_grad_launch_args(
                        xa, grad_y, d_B_t, groups, ranks, scalings, True, None, None, r))]
        for p in (0.0, 0.1):
            seed_p = seed if p else None
            launches += [(f"multi shrink xa p={p}", multi.shrink_launch_args(x, lora_A, a_t, xa, groups, ranks,
                                                                             scalings, False, dropouts[p], seed_p,
                                                                             r)),
                         (f"multi weight grad dA p={p}", multi.weight_grad_launch_args(
                             gb, x, d_A, groups, ranks, scalings, False, dropouts[p], seed_p, r)),
                         (f"multi expand dx p={p}", multi.expand_launch_args(gb, lora_A, lora_A.stride(), e(M, K),
                                                                             groups, ranks, scalings, False,
                                                                             dropouts[p], seed_p, r))]
        for name, (kernel, _, args, flags) in launches:
            yield name, kernel, [None], args, flags, dtype, flags["BLOCK_R"], None


def specialization_launches(M: int, seed_value: int, p: float):
    """(name, jit function, config kwargs, args, flags) of the launches whose integer arguments change from call
    to call (the batch size, the dropout seed and threshold), at batch size M: one config each."""
    import torch

    from lora_kernels.ops import triton_lora_linear as lin
    from lora_kernels.ops import triton_lora_linear_multi as multi
    from lora_kernels.weight4bit import empty_kernel_args

    e = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, dtype=dt)  # noqa: E731
    N = K = 256
    r, n = 16, 4
    seed = torch.tensor(seed_value, dtype=torch.int64)
    x, weight, lora_A, lora_B, grad_y = e(M, K), e(N, K), e(r, K), e(N, r), e(M, N)
    gb = e(M, r, dt=torch.float32)
    decode = min(M, lin.DECODE_MAX_M)
    splits, rows_per_split = lin.weight_grad_splits(M, K, 528, True)
    launches = [
        ("shrink xa", lin.shrink_launch_args(x, lora_A.t(), e(M, r), p, seed)),
        ("gemm dx", lin.fused_gemm_launch_args(grad_y, weight, None, gb, lora_A, None, e(M, K), 2.0, p, seed,
                                               shrink_in_loop=False, dropout_epilogue=True)),
        ("decode", lin.fused_gemm_launch_args(e(decode, K), weight.t(), e(N), e(decode, r), lora_B.t(), lora_A.t(),
                                              e(decode, N), 2.0, p, seed, shrink_in_loop=True,
                                              dropout_epilogue=False)),
        ("weight grad dA", lin.weight_grad_launch_args(gb, x, e(splits, r, K, dt=torch.float32), rows_per_split, p,
                                                       seed)),
        ("finish dA", lin.finish_launch_args(e(splits, r, K, dt=torch.float32), lora_A, 2.0, 1 / (1 - p))),
    ]
    w4, w4_dx = empty_kernel_args(N, K), empty_kernel_args(K, N)
    launches += [
        ("split decode", lin.fused_gemm_launch_args(e(decode, K), weight.t(), e(N), e(decode, r), lora_B.t(),
                                                    lora_A.t(), e(decode, N), 2.0, p, seed, shrink_in_loop=True,
                                                    dropout_epilogue=False, part=e(2, decode, N, dt=torch.float32),
                                                    part_l=e(2, decode, 16, dt=torch.float32))),
        ("4bit gemm dx", lin.fused_gemm_launch_args(grad_y, None, None, gb, lora_A, None, e(M, K), 2.0, p, seed,
                                                    shrink_in_loop=False, dropout_epilogue=True, w4=w4_dx)),
        ("4bit decode", lin.fused_gemm_launch_args(e(decode, K), None, e(N), e(decode, r), lora_B.t(), lora_A.t(),
                                                   e(decode, N), 2.0, p, seed, shrink_in_loop=True,
                                                   dropout_epilogue=False, w4=w4, w4_transposed=True)),
    ]
    groups = multi.Groups(torch.arange(M) % n, n, multi._tile_rows())
    ranks, scalings = torch.full((n,), r), torch.ones(n)
    dropout = multi._dropout_tensors(torch.full((n,), p, dtype=torch.float64), "cpu")
    stacked_A = e(n, r, K)
    a_t = (stacked_A.stride(0), stacked_A.stride(2), stacked_A.stride(1))
    wg_splits = multi.weight_grad_splits(M, n, K, r, 528, True)
    launches += [("multi shrink xa", multi.shrink_launch_args(x, stacked_A, a_t, e(M, r), groups, ranks, scalings,
                                                              False, dropout, seed, r)),
                 ("multi weight grad dA", multi.weight_grad_launch_args(gb, x, e(wg_splits, n, r, K, dt=torch.float32),
                                                                        groups, ranks, scalings, False, dropout,
                                                                        seed, r))]
    for name, (kernel, _, args, flags) in launches:
        config = kernel.configs[0] if hasattr(kernel, "configs") else None
        options = dict(flags)
        if config is not None:
            options.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        yield name, kernel.fn if config is not None else kernel, options, args


def specialization_probe(batch_sizes=(1, 16, 17, 1000, 2048), probabilities=(0.1, 0.25, 0.5, 0.0625),
                         seeds=20) -> dict:
    """{kernel: compiled variants} over seeds × dropout probabilities × batch sizes (the decode launch over
    its own M <= 16). Each must be 1: a new variant is a compile (and an autotuning run) in the middle of
    training, and inside a CUDA-graph capture a failure."""
    import itertools

    seen: dict[str, set] = {}
    for M, i in itertools.product(batch_sizes, range(seeds)):
        seed = [0, 1, 16, 2**31 - 1, 2**31, 2**62 - 1][i] if i < 6 else 7919 * i * i
        for name, kernel, options, args in specialization_launches(M, seed, probabilities[i % len(probabilities)]):
            compiled = kernel.warmup(*args, grid=(1,), **options)
            seen.setdefault(name, set()).add(compiled.hash)
    return {name: len(hashes) for name, hashes in seen.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_compile_check.json")
    parser.add_argument("--only", default=None, help="only kernels whose name contains this text (e.g. merge)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_compile_check: TRITON_INTERPRET=1 is set; compiling needs it off", file=sys.stderr)
        return 2
    import torch
    from triton.runtime import driver

    from lora_kernels.ops.triton_common import shared_memory_estimate

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows, problems = [], []
    start = time.time()
    from lora_kernels.ops import triton_lora_linear, triton_lora_linear_multi, triton_merge

    kernels = (triton_lora_linear._shrink_kernel, triton_lora_linear._fused_gemm_kernel,
               triton_lora_linear._weight_grad_kernel, triton_merge._merge_kernel,
               triton_lora_linear_multi._segment_shrink_kernel, triton_lora_linear_multi._segment_expand_kernel,
               triton_lora_linear_multi._segment_weight_grad_kernel, triton_lora_linear._dequantize_kernel,
               triton_lora_linear._split_finish_kernel)
    for arch in (int(a) for a in args.arch.split(",")):
        driver.set_active(StandInDriver(arch))
        for kernel in kernels:  # a JITFunction keeps its target per device: forget the previous arch's
            kernel.device_caches.clear()
        for name, kernel, configs, kargs, flags, dtype, block_r, shrink_in_loop in variants(dtypes, arch):
            if args.only and args.only not in name:
                continue
            for config in configs:
                options = dict(flags)
                if config is not None:
                    options.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                t0 = time.time()
                compiled = kernel.warmup(*kargs, grid=(1,), **options)
                seconds = time.time() - t0
                usage = resource_usage(compiled.asm["cubin"])
                row = dict(arch=arch, kernel=name, dtype=str(dtype)[6:], block_r=block_r,
                           config=None if config is None else str(config), shared=compiled.metadata.shared,
                           compile_s=round(seconds, 2), **usage, **ptxas_report(compiled.asm["ptx"]),
                           **mma_kinds(compiled.asm["ptx"]))
                sixteen_bit = dtype in (torch.float16, torch.bfloat16)
                why = []
                if row["shared"] > SHARED_LIMIT[arch]:
                    why.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[arch]} B")
                if config is not None:
                    # the fused GEMM's arguments: (x, w, bias, left, u, d, y, ...); d holds the adapters' dtype
                    estimate = shared_memory_estimate(config, torch.empty((), dtype=dtype).element_size(), block_r,
                                                      shrink_in_loop, kargs[5].element_size(),
                                                      flags.get("W4", False))
                    row["shared_estimate"] = estimate
                    if estimate < row["shared"]:
                        why.append(f"pruning estimate {estimate} B below the compiler's {row['shared']} B")
                if sixteen_bit and ((row["local"] or 0) > 0 or row["stack"] or row["spill_stores"]
                                    or row["spill_loads"]):
                    why.append(f"spills: {row['stack']} B stack frame, {row['spill_stores']} B spill stores, "
                               f"{row['spill_loads']} B spill loads, {row['local']} B local per thread")
                if row["wgmma_serialized"]:
                    why.append("ptxas serialized the wgmma instructions (C7512)")
                if row["plain_tf32"]:
                    why.append("a plain TF32 MMA: a promised float32 dot runs with 10 mantissa bits")
                if name.startswith("merge") and "fma.rn" in compiled.asm["ptx"]:
                    why.append("FMA contraction in the merge kernel")
                if name.startswith("4bit") and "dequantize" not in name:  # the dequantized tile feeds tensor cores
                    if not (row["wgmma"] or row["mma_sync"]):
                        why.append("no tensor-core instruction in a 4-bit GEMM")
                    elif arch >= 90 and "gemm" in name and not row["wgmma"]:
                        why.append("a 4-bit large-M GEMM without wgmma on sm_90")
                row["problems"] = why
                rows.append(row)
                problems += [f"sm_{arch} {name} {row['dtype']} r-tile {block_r} {row['config']}: {w}" for w in why]
                mma = "wgmma" if row["wgmma"] else "mma" if row["mma_sync"] else "fma"
                print(f"sm_{arch} {name:<18} {row['dtype']:<8} r{block_r:<3} shared {row['shared']:>6} "
                      f"regs {row['reg']} stack {row['stack']} spills {row['spill_stores']} {mma:<5} "
                      f"{seconds:5.1f}s {row['config'] or ''} {'FAIL: ' + '; '.join(why) if why else ''}", flush=True)
        for name, kernel, configs, *_ in variants(dtypes[:1], arch):
            if not configs:
                problems.append(f"sm_{arch} {name}: the pruner keeps no config")
        if args.only is None:
            t0 = time.time()
            counts = specialization_probe()
            print(f"sm_{arch} specialization probe ({time.time() - t0:.0f} s): compiled variants per kernel over "
                  f"20 seeds and 4 dropout probabilities x 5 batch sizes: {counts}", flush=True)
            problems += [f"sm_{arch} {name}: {count} compiled variants where the seed, the dropout probability or "
                         f"the batch size changed (must be 1: mark the integer do_not_specialize)"
                         for name, count in counts.items() if count != 1]
    summary = dict(compiles=len(rows), seconds=round(time.time() - start, 1), problems=problems)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_compile_check.json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    print(f"\ngpu_compile_check: {len(rows)} compiles in {summary['seconds']} s; "
          f"{len(problems)} problem(s)" + "".join(f"\n  {p}" for p in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
