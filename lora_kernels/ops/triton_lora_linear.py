"""Triton kernels of the fused LoRA linear, forward and backward.

Four kernels serve every product (x [M, in], W0 [out, in], A [r, in], B [out, r]):

  _shrink_kernel        L = drop?(X) D              [M, r]   xa = drop(x) Aᵀ, gb = dy B
  _fused_gemm_kernel    Y = s·L U (⊙ mask) + bias + X Wop    y (Wop = W0ᵀ, U = Bᵀ) and
                                                [M, N]       dx (Wop = W0, U = A, dropout mask on s·L U)
                        one accumulator: it starts as the tile's LoRA term and bias, loaded and
                        computed before the K loop, so no load waits after it and no second
                        [BLOCK_M, BLOCK_N] accumulator is live. With SHRINK_IN_LOOP (decode), L
                        is accumulated inside the K loop from the X tiles already loaded (one
                        launch, W0 read once) and the LoRA term follows the loop.
  _weight_grad_kernel   P = Gᵀ drop?(X)             [r, N]   dA = s·gbᵀ drop(x), dBᵀ = s·xaᵀ dy
                        reduced over M in parallel slices of float32 partial sums,
  _finish_kernel        out = cast(s · Σ slices)             which this one adds, scales, rounds and
                                                             writes (transposed for dB): no ATen op

Dropout masks come from tl.randint4x(seed, (row * in + col) // 8), 16 bits per
element, the Philox scheme that reference.dropout_draws and csrc/philox.h
reproduce bit for bit, so the backward
regenerates the forward's mask and nothing of size [M, in] is saved. The seed is read in
device memory (a 0-d int64 tensor drawn on x's device: a replayed CUDA graph draws a new
one each time), and every integer that changes from call to call (M, the dropout threshold,
the slice counts) is marked do_not_specialize: Triton would otherwise compile a new variant
when such a value turns 1 or a multiple of 16 (benchmarks/gpu_compile_check.py counts them). All
accumulation is float32; masks guard every edge; row offsets are int64.
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (one small config).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import gpu_paths
from .lora_linear import _backend as dense_backend  # lora_linear's path per step and shape
from .triton_dora import dora_gained
from .triton_common import (RANK_CHUNK, block_r, cast, configs, dequantized_tile, dot, dropout_args, dropped,
                            fitting_configs, full_precision, gpu_configs, grouped_mask, interpreted, keep_mask,
                            kernel_seed, multiprocessors, on_device, soft_bf16, weight4bit_aligned,
                            weight_grad_tiles)

# Up to this many rows the forward is one launch (shrink fused into the GEMM's K
# loop): the repeated shrink costs M·in·r per column block, noise next to W0's
# out·in reads while M is small, and it saves a launch and the xa round trip.
DECODE_MAX_M = 16
# A decode launch split over K (a layer too narrow to give every SM two programs) gives each slice at least this
# many columns of K: 1024 × 16 columns of bf16 W0 are 32 KB per program (8 KB in 4 bits).
DECODE_SPLIT_MIN_K = 1024

# The large-M GEMM's LoRA tile is computed in rank chunks of this many (tl.dot's minimum): a float32 L
# (dx's gb) in chunks of 32 or 64 ranks, split in TF32 parts next to the accumulator and the dropout mask,
# spilled on sm_80 and sm_90 (gpu_compile_check); the LoRA term is ~r/in of the GEMM's work either way.
LORA_TILE_RANKS = 16


# Large-M GEMM configs for Hopper/Ampere; tuned per (M, N, K) by triton.autotune. Not 128×256×64 (8 warps)
# nor 128×128×32 (4 warps): at 255 registers with the LoRA tile, both spilled on sm_90 (ptxas -v, 2026-12-02).
_GEMM_TILES = [
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 8, 4),
    (dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), 8, 3),
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 4, 4),
    (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 4),
]
_GEMM_CONFIGS = configs(_GEMM_TILES, small=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4))
# Decode configs: 16-row tiles (tl.dot's minimum), narrow column blocks so that
# enough programs stream W0 to fill the GPU, long K tiles. 32-column blocks give a
# 4096-wide layer 128 programs, one wave on an H100/H200's 132 SMs with one
# program each, too few loads in flight to hide HBM latency: 16-column blocks
# give it 256 (two per SM); the autotuner picks per layer shape.
_DECODE_TILES = [
    (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=1), 4, 4),
    (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, GROUP_M=1), 4, 3),
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1), 4, 4),
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1), 4, 3),
    (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1), 4, 4),
    (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1), 4, 3),
    (dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1), 4, 4),
]
_DECODE_CONFIGS = configs(_DECODE_TILES, small=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1))


@triton.jit(do_not_specialize=["M", "threshold"])
def _shrink_kernel(
    x_ptr, d_ptr, out_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_dk, stride_dr, stride_om, stride_or,
    threshold, inv_keep,
    DROPOUT: tl.constexpr, GROUPED_MASK: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[M, R] = drop?(x)[M, K] @ d[K, R]; each program owns BLOCK_M rows and BLOCK_R ranks
    (large ranks are split over programs, so the d tile fits in shared memory), and loops over K."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & (ks[None, :] < K),
                    other=0.0)
        if DROPOUT:
            x = dropped(x, keep_mask(seed, rows, ks, K, threshold, GROUPED_MASK), SOFT_BF16)
        d = tl.load(d_ptr + ks.to(tl.int64)[:, None] * stride_dk + ranks[None, :] * stride_dr,
                    mask=(ks[:, None] < K) & (ranks[None, :] < R), other=0.0)
        acc = dot(x, d, acc, SOFT_BF16)  # float32 d (adapters) on a 16-bit x: see dot
    # The 1/(1-p) of dropout is applied once here rather than to every element of x.
    acc = acc * inv_keep
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=row_ok[:, None] & (ranks[None, :] < R))


@triton.jit
def _scaling_value(scaling, SCALING_IN_MEMORY: tl.constexpr):
    """The scaling as a float32 number: read from its 0-d tensor, or the number itself."""
    if SCALING_IN_MEMORY:
        value = tl.load(scaling).to(tl.float32)
    else:
        value = scaling
    return value


@triton.jit
def _store_output(acc, rows, cols, row_ok, col_ok, y_ptr, z_ptr, gain_ptr, bias_ptr, stride_ym, stride_yn,
                  ADD_BIAS: tl.constexpr, GAIN: tl.constexpr, STORE_Z: tl.constexpr, SOFT_BF16: tl.constexpr,
                  TRANSPOSED: tl.constexpr):
    """The GEMMs' last stage: the float32 tile acc [rows, cols] (TRANSPOSED: [cols, rows]) stored as y, with GAIN
    as DoRA's y = g ⊙ acc + bias (g [N] float32: the gain in the epilogue, y written once, no second pass) and,
    with STORE_Z, acc itself stored as z (y's shape and strides: what the magnitude's gradient needs), each
    rounded once from the same accumulator. ADD_BIAS: the bias is added here (decode, or after the gain) rather
    than in the accumulator's first stage."""
    if TRANSPOSED:
        offsets = rows.to(tl.int64)[None, :] * stride_ym + cols.to(tl.int64)[:, None] * stride_yn
        ok = row_ok[None, :] & col_ok[:, None]
    else:
        offsets = rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
        ok = row_ok[:, None] & col_ok[None, :]
    if STORE_Z:
        tl.store(z_ptr + offsets, cast(acc, z_ptr.dtype.element_ty, SOFT_BF16), mask=ok)
    if GAIN:
        gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0)
        if TRANSPOSED:
            acc = acc * gain[:, None]
        else:
            acc = acc * gain[None, :]
    if ADD_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if TRANSPOSED:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    tl.store(y_ptr + offsets, cast(acc, y_ptr.dtype.element_ty, SOFT_BF16), mask=ok)


@triton.jit
def _decode_epilogue(acc, l_acc, rows, cols, ranks, row_ok, col_ok, rank_ok, write_l, l_ptr, u_ptr, bias_ptr, y_ptr,
                     z_ptr, gain_ptr, stride_lm, stride_lr, stride_ur, stride_un, stride_ym, stride_yn, scaling,
                     inv_keep, HAS_BIAS: tl.constexpr, GAIN: tl.constexpr, STORE_Z: tl.constexpr,
                     SCALING_IN_MEMORY: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Decode's last stage: y = acc + s·(L U) + bias (GAIN: y = g ⊙ (acc + s·(L U)) + bias, and z as
    _store_output says) from the K loop's sums acc = x W0 and l_acc = drop(x) D (float32), L rounded to xa's dtype
    and written out as xa where write_l (one column block). Rank lanes beyond R hold 0·x, NaN where x is ±Inf:
    they are zeroed, or the zero-padded rows of U would turn them into NaN across the whole row of y."""
    l_acc = tl.where(rank_ok[None, :], l_acc * inv_keep, 0.0)
    lora_left = cast(l_acc, l_ptr.dtype.element_ty, SOFT_BF16)
    if write_l:  # xa is saved for the backward
        l_ptrs = l_ptr + rows.to(tl.int64)[:, None] * stride_lm + ranks[None, :] * stride_lr
        tl.store(l_ptrs, lora_left, mask=row_ok[:, None] & rank_ok[None, :])
    u = tl.load(u_ptr + ranks[:, None] * stride_ur + cols.to(tl.int64)[None, :] * stride_un,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    lora = dot(lora_left, u, tl.zeros(acc.shape, dtype=tl.float32), SOFT_BF16)
    acc += lora * _scaling_value(scaling, SCALING_IN_MEMORY)
    _store_output(acc, rows, cols, row_ok, col_ok, y_ptr, z_ptr, gain_ptr, bias_ptr, stride_ym, stride_yn, HAS_BIAS,
                  GAIN, STORE_Z, SOFT_BF16, False)


@triton.jit(do_not_specialize=["M", "M_BUCKET", "splits", "threshold"])
def _fused_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, l_ptr, u_ptr, d_ptr, y_ptr, z_ptr, gain_ptr, seed_ptr,
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr, part_ptr, part_l_ptr,
    M, N, K, R, M_BUCKET, splits,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_dk, stride_dr, stride_ym, stride_yn,
    scaling, threshold, inv_keep,
    HAS_BIAS: tl.constexpr, GAIN: tl.constexpr, STORE_Z: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
    DROPOUT_SHRINK: tl.constexpr, DROPOUT_EPILOGUE: tl.constexpr, GROUPED_MASK: tl.constexpr,
    SCALING_IN_MEMORY: tl.constexpr, SOFT_BF16: tl.constexpr, W4: tl.constexpr, W4_TRANSPOSED: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] @ w[K, N] + bias + scaling · (L[M, R] @ u[R, N]) (⊙ mask / (1-p)).

    With W4, w is a 4-bit weight W0 (w_ptr its codes, the scale and table pointers its other parts): w = W0ᵀ
    (W4_TRANSPOSED: the forward, W0 [N, K]) or W0 (dx, W0 [K, N]), each tile dequantized in x's dtype in the K
    loop (triton_common.dequantized_tile, rows aligned on scale blocks) and fed to the same dot; nothing of W0
    is dequantized outside it. With SWAP_AB (the 4-bit large-M GEMMs) the program computes its tile transposed,
    yᵀ = wᵀ xᵀ [BLOCK_N, BLOCK_M]: the dequantized tile is then the dot's left operand, which Hopper's wgmma
    reads from registers (the 16-bit x tile comes from shared memory), so the tile never makes a round trip
    through shared memory and the asynchronous MMA overlaps the next tile's dequantization (wait_group 1 in
    the PTX, against a store, a barrier and wait_group 0 unswapped: benchmarks/NOTES.md).

    L is read from l_ptr, or with SHRINK_IN_LOOP accumulated in the K loop as
    drop?(x) @ d[K, R] and written to l_ptr by the first column block. With SPLIT_K (decode of a layer too narrow
    to fill the GPU), program (·, s) of the 2-D grid takes slice s of `splits` slices of K and writes its float32
    sums x W0 and drop(x) D to part_ptr [splits, M, N] and part_l_ptr [splits, M, BLOCK_R]; _split_finish_kernel
    adds them and applies the LoRA term, the bias and the rounding. With GAIN (DoRA's forward), y = g ⊙ (x W0ᵀ +
    s·L U) + bias, g [N] read at gain_ptr, and with STORE_Z the tile before the gain is also stored at z_ptr (y's
    strides): _store_output. With SCALING_IN_MEMORY,
    `scaling` points to a 0-d tensor read at run time (a replayed CUDA graph sees its current value).
    M_BUCKET (M rounded up to a power of two) is not used here: it is the
    autotuner's key, so that batches of every new length do not re-tune.
    """
    # Grouped ordering: GROUP_M row blocks sweep the column blocks together, so
    # their x rows and w columns stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < R
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    if DROPOUT_SHRINK or DROPOUT_EPILOGUE:
        seed = tl.load(seed_ptr)

    if SWAP_AB:  # the tile transposed: [columns of y, rows of y]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not SHRINK_IN_LOOP:
        # Stage 1: the accumulator starts as s·(L U) (⊙ mask / (1-p)) + bias, L [BLOCK_M, R] being xa (in
        # the adapters' dtype) or gb (float32, for dx; U is then widened), in rank chunks of BLOCK_R so that
        # large ranks need no large tiles; s is applied after the product, so s·L is never rounded to a
        # 16-bit type (reference.py's order). Its loads and its mask's Philox rounds happen here, before
        # the pipelined K loop, instead of after it with a second accumulator live.
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: the tiles stay single
            chunk = r0 + ranks
            chunk_ok = chunk < R
            if SWAP_AB:  # (L U)ᵀ = Uᵀ Lᵀ, both read transposed
                u_t = tl.load(u_ptr + chunk[None, :] * stride_ur + cols.to(tl.int64)[:, None] * stride_un,
                              mask=chunk_ok[None, :] & col_ok[:, None], other=0.0)
                lora_left_t = tl.load(l_ptr + rows.to(tl.int64)[None, :] * stride_lm + chunk[:, None] * stride_lr,
                                      mask=row_ok[None, :] & chunk_ok[:, None], other=0.0)
                acc = dot(u_t, lora_left_t, acc, SOFT_BF16)
            else:
                lora_left = tl.load(l_ptr + rows.to(tl.int64)[:, None] * stride_lm + chunk[None, :] * stride_lr,
                                    mask=row_ok[:, None] & chunk_ok[None, :], other=0.0)
                u = tl.load(u_ptr + chunk[:, None] * stride_ur + cols.to(tl.int64)[None, :] * stride_un,
                            mask=chunk_ok[:, None] & col_ok[None, :], other=0.0)
                acc = dot(lora_left, u, acc, SOFT_BF16)
        acc = acc * _scaling_value(scaling, SCALING_IN_MEMORY)
        if DROPOUT_EPILOGUE:
            keep = keep_mask(seed, rows, cols, N, threshold, GROUPED_MASK)
            if SWAP_AB:
                keep = tl.trans(keep)
            acc = tl.where(keep, acc * inv_keep, 0.0)
        if HAS_BIAS and not GAIN:  # with a gain, the bias comes after it (_store_output)
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if SWAP_AB:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
    else:
        l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    # Stage 2: the base GEMM (and, for decode, the LoRA shrink from the same x tiles).
    k_lo = 0
    k_hi = K
    if SPLIT_K:  # this program's slice of K: whole BLOCK_K tiles, the last slices possibly empty
        k_slice = tl.cdiv(tl.cdiv(K, BLOCK_K), splits) * BLOCK_K
        k_lo = tl.program_id(1) * k_slice
        k_hi = tl.minimum(K, k_lo + k_slice)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if SWAP_AB:  # yᵀ += wᵀ xᵀ: wᵀ [BLOCK_N, BLOCK_K] is W0[cols, ks] (y) or W0[ks, cols]ᵀ (dx)
            x_t = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks.to(tl.int64)[:, None] * stride_xk,
                          mask=row_ok[None, :] & k_ok[:, None], other=0.0)
            if W4_TRANSPOSED:
                w_t = dequantized_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr,
                                       cols, k0, N, K, x_ptr.dtype.element_ty, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT,
                                       True, SOFT_BF16)
            else:
                w_t = tl.trans(dequantized_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                                table_ptr, ks, pid_n * BLOCK_N, K, N, x_ptr.dtype.element_ty,
                                                BLOCK_N, BLOCKSIZE, DOUBLE_QUANT, True, SOFT_BF16))
            acc = dot(w_t, x_t, acc, SOFT_BF16)
        else:
            x = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if W4:  # decode (the only unswapped 4-bit GEMM): W0ᵀ[ks, cols] = W0[cols, ks], transposed
                w = tl.trans(dequantized_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                              table_ptr, cols, k0, N, K, x_ptr.dtype.element_ty, BLOCK_K, BLOCKSIZE,
                                              DOUBLE_QUANT, True, SOFT_BF16))
            else:
                w = tl.load(w_cols + ks[:, None].to(tl.int64) * stride_wk, mask=k_ok[:, None] & col_ok[None, :],
                            other=0.0)
            acc = dot(x, w, acc, SOFT_BF16)
            if SHRINK_IN_LOOP:
                if DROPOUT_SHRINK:
                    x = dropped(x, keep_mask(seed, rows, ks, K, threshold, GROUPED_MASK), SOFT_BF16)
                d = tl.load(d_ptr + ks.to(tl.int64)[:, None] * stride_dk + ranks[None, :] * stride_dr,
                            mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
                l_acc = dot(x, d, l_acc, SOFT_BF16)

    if SPLIT_K:  # the slice's float32 sums, added by _split_finish_kernel
        slice_ = tl.program_id(1).to(tl.int64)
        part = part_ptr + slice_ * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(part, acc, mask=row_ok[:, None] & col_ok[None, :])
        if pid_n == 0:
            part_l = part_l_ptr + (slice_ * M + rows.to(tl.int64)[:, None]) * BLOCK_R + ranks[None, :]
            tl.store(part_l, l_acc, mask=row_ok[:, None])
    elif SHRINK_IN_LOOP:  # Stage 3 (decode): the LoRA term from the loop's L (the launcher keeps R <= BLOCK_R)
        _decode_epilogue(acc, l_acc, rows, cols, ranks, row_ok, col_ok, rank_ok, pid_n == 0, l_ptr, u_ptr,
                         bias_ptr, y_ptr, z_ptr, gain_ptr, stride_lm, stride_lr, stride_ur, stride_un, stride_ym,
                         stride_yn, scaling, inv_keep, HAS_BIAS, GAIN, STORE_Z, SCALING_IN_MEMORY, SOFT_BF16)
    else:
        _store_output(acc, rows, cols, row_ok, col_ok, y_ptr, z_ptr, gain_ptr, bias_ptr, stride_ym, stride_yn,
                      HAS_BIAS and GAIN, GAIN, STORE_Z, SOFT_BF16, SWAP_AB)


@triton.jit(do_not_specialize=["M", "splits"])
def _split_finish_kernel(
    part_ptr, part_l_ptr, l_ptr, u_ptr, bias_ptr, y_ptr, z_ptr, gain_ptr,
    M, N, R, splits,
    stride_lm, stride_lr, stride_ur, stride_un, stride_ym, stride_yn,
    scaling, inv_keep,
    HAS_BIAS: tl.constexpr, GAIN: tl.constexpr, STORE_Z: tl.constexpr, SCALING_IN_MEMORY: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Split decode's end: acc = Σ_s part[s] and l_acc = Σ_s part_l[s] (slices added in order: the same bits at
    every launch), then decode's epilogue (y = acc + s·(L U) + bias, xa written by the first column block)."""
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)  # M <= 16 rows at decode
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    rows64 = rows.to(tl.int64)[:, None]
    for slice_ in range(0, splits):
        acc += tl.load(part_ptr + (slice_ * M + rows64) * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0)
        l_acc += tl.load(part_l_ptr + (slice_ * M + rows64) * BLOCK_R + ranks[None, :], mask=row_ok[:, None],
                         other=0.0)
    _decode_epilogue(acc, l_acc, rows, cols, ranks, row_ok, col_ok, rank_ok, pid_n == 0, l_ptr, u_ptr, bias_ptr,
                     y_ptr, z_ptr, gain_ptr, stride_lm, stride_lr, stride_ur, stride_un, stride_ym, stride_yn,
                     scaling, inv_keep, HAS_BIAS, GAIN, STORE_Z, SCALING_IN_MEMORY, SOFT_BF16)


# Keyed on M's power-of-two bucket, not M: training batches of varying length
# would otherwise pay a full autotuning run (seconds) for every new M. The flags
# that change a config's shared memory or registers (bias, dropout, the rank tile)
# are part of the key, so a config tuned without dropout is never reused with it. DoRA's GAIN and STORE_Z are
# not: they only add a load and a store after the loop, and one config for both keeps the K loop's order, so an
# eval forward (no z) gives the training forward's bits.
_KEY = ["N", "K", "R", "HAS_BIAS", "DROPOUT_SHRINK", "DROPOUT_EPILOGUE", "BLOCK_R", "W4", "W4_TRANSPOSED"]
_PRUNE = {"early_config_prune": fitting_configs}
_fused_gemm = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET"] + _KEY, prune_configs_by=_PRUNE)(
    _fused_gemm_kernel)
_fused_gemm_decode = triton.autotune(configs=_DECODE_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_fused_gemm_kernel)
# Split decode: the narrowest column blocks only (a layer is split because even they are too few)
_SPLIT_DECODE_TILES = [tile for tile in _DECODE_TILES if tile[0]["BLOCK_N"] == 16]
_fused_gemm_split_decode = triton.autotune(
    configs=configs(_SPLIT_DECODE_TILES, small=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1)),
    key=_KEY + ["splits"], prune_configs_by=_PRUNE)(_fused_gemm_kernel)
# what a GPU's autotuner chooses from, also under the interpreter (lora_kernels.cost_model reads them)
_fused_gemm.gpu_configs, _fused_gemm_decode.gpu_configs = gpu_configs(_GEMM_TILES), gpu_configs(_DECODE_TILES)
_fused_gemm_split_decode.gpu_configs = gpu_configs(_SPLIT_DECODE_TILES)


@triton.jit(do_not_specialize=["M", "rows_per_split", "threshold"])
def _weight_grad_kernel(
    g_ptr, x_ptr, part_ptr, seed_ptr,
    M, N, R, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xn,
    threshold,
    DROPOUT: tl.constexpr, GROUPED_MASK: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[s, R, N] = g[rows of slice s, R]ᵀ @ drop?(x)[rows of slice s, N], float32."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # large ranks: one chunk per program
    col_ok, rank_ok = cols < N, ranks < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + ranks[None, :] * stride_gr,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols.to(tl.int64)[None, :] * stride_xn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            x = dropped(x, keep_mask(seed, rows, cols, N, threshold, GROUPED_MASK), SOFT_BF16)
        acc = dot(tl.trans(g), x, acc, SOFT_BF16)  # g may be float32 (gb)
    part = part_ptr + pid_s.to(tl.int64) * R * N + ranks.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(part, acc, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["splits"])
def _finish_kernel(
    part_ptr, out_ptr, scaling,
    R, N, splits,
    stride_or, stride_on,
    factor,
    SCALING_IN_MEMORY: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """out[r, n] = (scaling · factor · Σ_s part[s, r, n]) rounded once to out's dtype; part [splits, R, N]
    float32, out through its strides (dB is written as the transpose of its [r, out] sum). Each program owns
    BLOCK consecutive elements of R·N and reads SPLIT_CHUNK slices of them per step (loads in flight: the sum
    is latency-bound otherwise); the slices are added in the same order at every launch."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < R * N
    slices = tl.arange(0, SPLIT_CHUNK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, splits, SPLIT_CHUNK):
        rows = s0 + slices
        chunk = tl.load(part_ptr + rows.to(tl.int64)[:, None] * R * N + offsets[None, :],
                        mask=(rows < splits)[:, None] & ok[None, :], other=0.0)
        total += tl.sum(chunk, axis=0)
    total = total * (_scaling_value(scaling, SCALING_IN_MEMORY) * factor)
    out = out_ptr + (offsets // N) * stride_or + (offsets % N) * stride_on
    tl.store(out, cast(total, out_ptr.dtype.element_ty, SOFT_BF16), mask=ok)


# ---------------------------------------------------------------------------
# Launchers


# Each kernel's launch is split in two: `<kernel>_launch_args` assembles the arguments and the
# constexpr flags exactly as a launch passes them, and the launcher runs the kernel with them.
# benchmarks/gpu_compile_check.py compiles the kernels for a GPU from the same functions, so it
# checks the specialisations that really launch.


def shrink_rows(M: int, programs_wanted: int) -> int:
    """The shrink's row tile: the largest of 64/32/16 that still gives `programs_wanted` programs (two per
    SM), else 16. Each program reads all of A's chunk from L2, so smaller tiles cost L2 traffic, not HBM;
    64-row tiles at M = 2048 left 100 of 132 SMs idle (32 programs streaming x)."""
    if interpreted():
        return 16
    for rows in (64, 32):
        if triton.cdiv(M, rows) >= programs_wanted:
            return rows
    return 16


def shrink_launch_args(x, d, out, p: float, seed, programs_wanted: int = 264):
    """(kernel, grid, args, flags) of out = drop?(x) @ d for x [M, K], d [K, R] (any strides); seed: a 0-d
    int64 tensor on x's device when p > 0 (unread otherwise)."""
    M, K = x.shape
    R = d.shape[1]
    threshold, inv_keep = dropout_args(p)
    block_m = shrink_rows(M, programs_wanted)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r(R)))
    args = (x, d, out, seed if p > 0.0 else out, M, K, R, x.stride(0), x.stride(1), d.stride(0), d.stride(1),
            out.stride(0), out.stride(1), threshold, inv_keep)
    # Four stages keep 32 KB of x and A in flight per program (16 rows, r <= 16: 16 × 256 × 16 spilled), so that
    # 128 programs can stream x at HBM speed (benchmarks/cost_model.py); wider rank tiles take shallower K
    # tiles (32 × 128 × 64 spilled on sm_90, gpu_compile_check).
    block_k = 32 if interpreted() else 128 if block_r(R) <= 32 else 64
    flags = dict(DROPOUT=p > 0.0, GROUPED_MASK=grouped_mask(K), SOFT_BF16=soft_bf16(x.dtype), BLOCK_M=block_m,
                 BLOCK_K=block_k, BLOCK_R=block_r(R), num_stages=1 if interpreted() else 4)
    return _shrink_kernel, grid, args, flags


def _shrink(x: torch.Tensor, d: torch.Tensor, p: float, seed, out_dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """drop?(x) @ d for x [M, K], d [K, R] (any strides), in out_dtype (default x's dtype)."""
    out = torch.empty(x.shape[0], d.shape[1], device=x.device, dtype=out_dtype or x.dtype)
    if x.shape[0] == 0:
        return out
    kernel, grid, args, flags = shrink_launch_args(x, d, out, p, seed, 2 * multiprocessors(x.device))
    kernel[grid](*args, **flags)
    return out


def decode_split_count(M: int, N: int, K: int, sms: int) -> int:
    """The slices of K proposed for a decode launch: 1, unless the layer's 16-column blocks give fewer programs
    than the GPU has SMs (a 4096 -> 1024 projection: 64, on 132); then enough for two programs per SM, each slice
    at least DECODE_SPLIT_MIN_K columns of K long (so that each program still streams a long run of W0).
    gpu_paths.decode_splits keeps the proposal where the cost model predicts a gain."""
    programs = triton.cdiv(M, 16) * triton.cdiv(N, 16)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), K // (128 if interpreted() else DECODE_SPLIT_MIN_K)))


def fused_gemm_launch_args(x, w_kn, bias, left, u_rn, d_kr, y, scaling, p, seed, shrink_in_loop, dropout_epilogue,
                           w4=None, w4_transposed=False, part=None, part_l=None, gain=None, z=None):
    """(autotuned kernel, grid, args, flags) of y = x @ w_kn + bias + scaling · left @ u_rn
    (see _fused_gemm_kernel); with gain [N] (float32), y = gain ⊙ (x @ w_kn + scaling · left @ u_rn) + bias, and
    z (y's shape and strides, or None) gets the part before the gain; w_kn, u_rn, d_kr are views; scaling is a
    float or a 0-d tensor on x's device;
    seed a 0-d int64 tensor on x's device when p > 0. With w4 (a 4-bit weight W0's kernel_args(), w_kn None),
    w_kn is W0ᵀ (w4_transposed: the forward) or W0 (dx). With part [splits, M, N] and part_l [splits, M, BLOCK_R]
    (float32, decode only) the launch is split over K and writes its sums there (split_finish_launch_args ends it)."""
    M, K = x.shape
    N = y.shape[1]
    R = u_rn.shape[0]
    threshold, inv_keep = dropout_args(p)
    splits = part.shape[0] if part is not None else 1

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)

    d_strides = (d_kr.stride(0), d_kr.stride(1)) if d_kr is not None else (0, 0)
    if w4 is None:
        w, w4_pointers, w_strides, w4_flags = w_kn, (y,) * 5, (w_kn.stride(0), w_kn.stride(1)), {}
    else:
        codes, absmax, nested_absmax, nested_code, offset, table, _, blocksize = w4
        double_quant = nested_absmax is not None
        w, w_strides = codes, (0, 0)
        w4_pointers = (absmax, *((nested_absmax, nested_code, offset) if double_quant else (y, y, y)), table)
        if not weight4bit_aligned(K if w4_transposed else N, blocksize):
            raise ValueError("the fused 4-bit GEMM needs rows that start a scale block (in_features % blocksize "
                             "== 0); the launchers dequantize other weights first")
        w4_flags = dict(W4=True, W4_TRANSPOSED=w4_transposed, DOUBLE_QUANT=double_quant, BLOCKSIZE=blocksize,
                        SWAP_AB=not shrink_in_loop,  # decode's 16-row tiles stay as they are (mma.sync)
                        # the double-quantized scale's product and sum rounded apart, as the spec does
                        enable_fp_fusion=not double_quant)
    if z is not None and (gain is None or z.shape != y.shape or z.stride() != y.stride()):
        raise ValueError("z needs a gain and y's shape and strides")
    args = (x, w, bias if bias is not None else y, left, u_rn, d_kr if d_kr is not None else left, y,
            z if z is not None else y, gain if gain is not None else y, seed if p > 0.0 else y, *w4_pointers,
            *((part, part_l) if part is not None else (y, y)),
            M, N, K, R, triton.next_power_of_2(M), splits,
            x.stride(0), x.stride(1), *w_strides,
            left.stride(0), left.stride(1), u_rn.stride(0), u_rn.stride(1), *d_strides, y.stride(0), y.stride(1),
            scaling, threshold, inv_keep)
    flags = dict(HAS_BIAS=bias is not None, GAIN=gain is not None, STORE_Z=z is not None,
                 SHRINK_IN_LOOP=shrink_in_loop, DROPOUT_SHRINK=shrink_in_loop and p > 0.0,
                 DROPOUT_EPILOGUE=dropout_epilogue and p > 0.0,
                 GROUPED_MASK=grouped_mask(K if shrink_in_loop else N),  # decode masks x, dx's epilogue dx
                 SCALING_IN_MEMORY=isinstance(scaling, torch.Tensor), SOFT_BF16=soft_bf16(x.dtype),
                 W4=False, W4_TRANSPOSED=False, DOUBLE_QUANT=False, BLOCKSIZE=64, SWAP_AB=False,
                 SPLIT_K=part is not None, BLOCK_R=block_r(R) if shrink_in_loop else LORA_TILE_RANKS)
    flags.update(w4_flags)
    kernel = (_fused_gemm_split_decode if part is not None else _fused_gemm_decode) if shrink_in_loop else _fused_gemm
    return kernel, grid, args, flags


def split_finish_launch_args(part, part_l, bias, left, u_rn, y, scaling, p, gain=None, z=None):
    """(kernel, grid, args, flags) of a split decode's end (_split_finish_kernel): y and xa (left) from the
    slices' sums part [splits, M, N] and part_l [splits, M, BLOCK_R] (gain, z: as fused_gemm_launch_args)."""
    splits, M, N = part.shape
    R = u_rn.shape[0]
    _, inv_keep = dropout_args(p)
    block_n = 32 if interpreted() else 64
    grid = (triton.cdiv(N, block_n),)
    args = (part, part_l, left, u_rn, bias if bias is not None else y, y, z if z is not None else y,
            gain if gain is not None else y, M, N, R, splits,
            left.stride(0), left.stride(1), u_rn.stride(0), u_rn.stride(1), y.stride(0), y.stride(1), scaling,
            inv_keep)
    flags = dict(HAS_BIAS=bias is not None, GAIN=gain is not None, STORE_Z=z is not None,
                 SCALING_IN_MEMORY=isinstance(scaling, torch.Tensor), SOFT_BF16=soft_bf16(y.dtype), BLOCK_M=16,
                 BLOCK_N=block_n, BLOCK_R=part_l.shape[2])
    return _split_finish_kernel, grid, args, flags


def _fused_gemm_launch(*launch, **options):
    kernel, grid, args, flags = fused_gemm_launch_args(*launch, **options)
    kernel[grid](*args, **flags)


def weight_grad_splits(M: int, N: int, programs_wanted: int, full: bool) -> tuple[int, int]:
    """(slices, rows per slice) of the weight gradient's sum over M: enough slices for `programs_wanted`
    programs, each a whole number of row blocks (full: float32 dots, see weight_grad_tiles)."""
    block_m, block_n = weight_grad_tiles(full)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(programs_wanted, max(1, triton.cdiv(N, block_n)))))
    rows_per_split = max(1, triton.cdiv(triton.cdiv(M, splits), block_m)) * block_m  # M = 0: one empty slice
    return max(1, triton.cdiv(M, rows_per_split)), rows_per_split


def weight_grad_launch_args(g, x, part, rows_per_split: int, p: float, seed):
    """(kernel, grid, args, flags) of part[s] = g[slice s]ᵀ @ drop?(x)[slice s] for g [M, R], x [M, N];
    a float32 g (gb) or float32 x gets full-precision dots."""
    M, R = g.shape
    N = x.shape[1]
    block_m, block_n = weight_grad_tiles(full_precision(g, x))
    threshold, _ = dropout_args(p)
    grid = (triton.cdiv(N, block_n), part.shape[0], triton.cdiv(R, block_r(R)))
    args = (g, x, part, seed if p > 0.0 else part, M, N, R, rows_per_split, g.stride(0), g.stride(1), x.stride(0),
            x.stride(1), threshold)
    flags = dict(DROPOUT=p > 0.0, GROUPED_MASK=grouped_mask(N), SOFT_BF16=soft_bf16(x.dtype), BLOCK_M=block_m,
                 BLOCK_N=block_n, BLOCK_R=block_r(R))
    return _weight_grad_kernel, grid, args, flags


def finish_launch_args(part, out_rn, scaling, factor: float):
    """(kernel, grid, args, flags) of out_rn = cast(scaling · factor · part.sum(0)) for part [splits, R, N]
    float32 and out_rn an [R, N] view (any strides) of the gradient."""
    splits, R, N = part.shape
    block = 64 if interpreted() else 256
    grid = (triton.cdiv(R * N, block),)
    args = (part, out_rn, scaling, R, N, splits, out_rn.stride(0), out_rn.stride(1), factor)
    flags = dict(SCALING_IN_MEMORY=isinstance(scaling, torch.Tensor), SOFT_BF16=soft_bf16(out_rn.dtype),
                 BLOCK=block, SPLIT_CHUNK=4 if interpreted() else 8)
    return _finish_kernel, grid, args, flags


def _weight_grad(g: torch.Tensor, x: torch.Tensor, p: float, seed, out_rn: torch.Tensor, scaling,
                 factor: float) -> None:
    """out_rn [R, N] = scaling · factor · gᵀ @ drop?(x) for g [M, R], x [M, N]: float32 slices of the sum over
    M, then one kernel that adds, scales, rounds and writes them (two launches)."""
    M, R = g.shape
    N = x.shape[1]
    wanted = 1 if interpreted() else 4 * multiprocessors(x.device)
    splits, rows_per_split = weight_grad_splits(M, N, wanted, full_precision(g, x))
    if out_rn.numel() == 0:
        return
    part = torch.empty(splits, R, N, device=x.device, dtype=torch.float32)
    if M == 0:
        part.zero_()
    else:
        kernel, grid, args, flags = weight_grad_launch_args(g, x, part, rows_per_split, p, seed)
        kernel[grid](*args, **flags)
    kernel, grid, args, flags = finish_launch_args(part, out_rn, scaling, factor)
    kernel[grid](*args, **flags)

def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend supports float16, bfloat16 and float32, got {x.dtype}")
# float32 adapters on a 16-bit x (reference.lora_linear's mixed precision): every LoRA product takes the
# adapters' dtype and full float32 precision (x's tiles are widened in registers, exactly); the base GEMM
# stays 16-bit.


def forward(x, weight, bias, lora_A, lora_B, scaling, p: float, seed):
    """(y [M, out], xa [M, r]) for x [M, in]: y = x W0ᵀ + b + s·xa Bᵀ, xa = drop(x) Aᵀ; seed: a 0-d int64
    tensor (any device; read on x's) when p > 0."""
    with on_device(x):
        return _forward(x, weight, bias, lora_A, lora_B, scaling, p, kernel_seed(seed, x))


def gained_forward(x, weight, bias, lora_A, lora_B, scaling, gain):
    """(y, xa): DoRA's forward without dropout, y = g ⊙ (x W0ᵀ + s·xa Bᵀ) + b [M, out], the gain g [out] (float32)
    applied in the GEMM's epilogue, so y is written once (ops/dora_linear.py); adapters in x's dtype."""
    with on_device(x):
        return _gained_forward(x, weight, bias, lora_A, lora_B, scaling, gain, False)[:2]


def gained_forward_keeping_z(x, weight, bias, lora_A, lora_B, scaling, gain):
    """(y, xa, z): gained_forward and z = x W0ᵀ + s·xa Bᵀ [M, out] (what DoRA's magnitude gradient needs), both
    stored from the GEMM's one accumulator."""
    with on_device(x):
        return _gained_forward(x, weight, bias, lora_A, lora_B, scaling, gain, True)


def _gained_forward(x, weight, bias, lora_A, lora_B, scaling, gain, keep_z: bool, w4=None):
    """(y, xa, z or None): the launches of the gained forwards (W0 dense, or 4-bit as w4 with weight None)."""
    N = weight.shape[0] if w4 is None else w4[6]
    z = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype) if keep_z else None
    y, xa = _forward(x, weight, bias, lora_A, lora_B, scaling, 0.0, None, w4=w4, gain=gain, z=z)
    return y, xa, z


def _forward(x, weight, bias, lora_A, lora_B, scaling, p: float, seed, w4=None, gain=None, z=None):
    """forward's launches; with w4 (a 4-bit W0's kernel_args(), weight None) its tiles are dequantized in the GEMM;
    with gain (and z), DoRA's epilogue (fused_gemm_launch_args)."""
    _check_dtype(x)
    M = x.shape[0]
    N, R = (weight.shape[0] if w4 is None else w4[6]), lora_A.shape[0]
    w_kn = weight.t() if w4 is None else None
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    xa = torch.empty(M, R, device=x.device, dtype=lora_A.dtype)
    if gain is not None:
        gain = gain.contiguous()
    if M == 0:
        return y, xa
    if M <= DECODE_MAX_M and R <= RANK_CHUNK:  # the shrink's accumulator holds every rank
        splits = gpu_paths.decode_splits(M, N, x.shape[1], R, w4 is not None, multiprocessors(x.device))
        part = part_l = None
        if splits > 1:  # a narrow layer: K split over programs, float32 sums added by a second launch
            part = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
            part_l = torch.empty(splits, M, block_r(R), device=x.device, dtype=torch.float32)
        _fused_gemm_launch(x, w_kn, bias, xa, lora_B.t(), lora_A.t(), y, scaling, p, seed,
                           shrink_in_loop=True, dropout_epilogue=False, w4=w4, w4_transposed=True, part=part,
                           part_l=part_l, gain=gain, z=z)
        if splits > 1:
            kernel, grid, args, flags = split_finish_launch_args(part, part_l, bias, xa, lora_B.t(), y, scaling, p,
                                                                 gain, z)
            kernel[grid](*args, **flags)
    else:
        xa = _shrink(x, lora_A.t(), p, seed, lora_A.dtype)
        _fused_gemm_launch(x, w_kn, bias, xa, lora_B.t(), None, y, scaling, p, seed,
                           shrink_in_loop=False, dropout_epilogue=False, w4=w4, w4_transposed=True, gain=gain, z=z)
    return y, xa


def backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p: float, seed, need_dx: bool):
    """(dx [M, in] or [0], dA [r, in], dB [out, r]) for a frozen weight: six launches (gb, dA and dB in
    two each, dx), every scaling, cast and transpose inside them."""
    with on_device(x):
        return _backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, kernel_seed(seed, x), need_dx)


def _backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p: float, seed, need_dx: bool, w4=None):
    """backward's launches; with w4 (weight None) dx's GEMM dequantizes W0's tiles."""
    _check_dtype(x)
    _, inv_keep = dropout_args(p)
    gb = _shrink(grad_y, lora_B, 0.0, None, torch.float32)  # dy B   [M, r], float32 (reference.py's order)
    d_lora_A = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
    _weight_grad(gb, x, p, seed, d_lora_A, scaling, inv_keep)  # s/(1-p) · gbᵀ drop(x)
    d_lora_B = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
    _weight_grad(xa, grad_y, 0.0, None, d_lora_B.t(), scaling, 1.0)  # (s · xaᵀ dy)ᵀ, written transposed
    if not need_dx:
        return x.new_empty(0), d_lora_A, d_lora_B
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        _fused_gemm_launch(grad_y, weight, None, gb, lora_A, None, dx, scaling, p, seed,
                           shrink_in_loop=False, dropout_epilogue=True, w4=w4, w4_transposed=False)
    return dx, d_lora_A, d_lora_B


def _dequantized_for(step: str, x, w4, in_features: int, r: int):
    """W0 dequantized whole (by the GEMMs' own tile code) when this call takes the triton backend's "dequantize"
    path, else None (the fused GEMMs read W0 packed). Weights whose rows do not start a scale block (in_features
    % blocksize != 0: blocks run across rows, no real model's layer) always take it: the per-element addressing
    of their tiles spilled in every GEMM config on sm_80 and sm_90 (gpu_compile_check, 2026-12-03). Others take
    gpu_paths.path_4bit's choice for the step and shape."""
    M = x.shape[0]
    if weight4bit_aligned(in_features, w4[7]) and gpu_paths.path_4bit(step, M, w4[6], in_features, r) == "fused":
        return None
    return dequantize_4bit(w4, in_features, x.dtype)


class Weight4bitBackend:
    """lora_linear_4bit on these kernels (QLoRA), W0 a 4-bit weight (w4: its kernel_args()), on one of two paths
    per step (gpu_paths.path_4bit): the same launches with the fused GEMMs of y and dx dequantizing W0's tiles in
    their K loops (the shrink and the weight gradients never read W0), or W0 dequantized whole into a temporary
    and lora_linear's own path for that step on it (these 16-bit kernels or the cuda backend's cuBLAS
    composition, ops/lora_linear._backend); the temporary is freed with the call: the backward dequantizes again."""

    @staticmethod
    def forward(x, w4, bias, lora_A, lora_B, scaling, p: float, seed):
        with on_device(x):
            dense = _dequantized_for("forward", x, w4, x.shape[1], lora_A.shape[0])
            if dense is not None:
                return dense_backend("forward", x, dense, lora_A, p).forward(x, dense, bias, lora_A, lora_B, scaling,
                                                                             p, seed)
            return _forward(x, None, bias, lora_A, lora_B, scaling, p, kernel_seed(seed, x), w4=w4)

    @staticmethod
    def gained_forward(x, w4, bias, lora_A, lora_B, scaling, gain):
        """(y, xa) of DoRA's forward without dropout (QDoRA): the gain in the fused GEMM's epilogue."""
        y, xa, _ = Weight4bitBackend._gained(x, w4, bias, lora_A, lora_B, scaling, gain, False)
        return y, xa

    @staticmethod
    def gained_forward_keeping_z(x, w4, bias, lora_A, lora_B, scaling, gain):
        """(y, xa, z): gained_forward and z = x W0ᵀ + s·xa Bᵀ."""
        return Weight4bitBackend._gained(x, w4, bias, lora_A, lora_B, scaling, gain, True)

    @staticmethod
    def _gained(x, w4, bias, lora_A, lora_B, scaling, gain, keep_z: bool):
        with on_device(x):
            dense = _dequantized_for("forward", x, w4, x.shape[1], lora_A.shape[0])
            if dense is None:  # the fused GEMM dequantizes W0's tiles
                return _gained_forward(x, None, bias, lora_A, lora_B, scaling, gain, keep_z, w4=w4)
            impl = dense_backend("forward", x, dense, lora_A, 0.0)
            if hasattr(impl, "gained_forward_keeping_z"):  # these kernels on the dequantized W0
                return _gained_forward(x, dense, bias, lora_A, lora_B, scaling, gain, keep_z)
            # lora_linear's cuBLAS composition on the dequantized W0, then the gain kernel (one pass)
            z, xa = impl.forward(x, dense, None, lora_A, lora_B, scaling, 0.0, None)
            return dora_gained(z, gain, bias, x.dtype, in_place=not keep_z), xa, (z if keep_z else None)

    @staticmethod
    def backward(grad_y, x, w4, lora_A, lora_B, xa, scaling, p: float, seed, need_dx: bool):
        with on_device(x):
            dense = _dequantized_for("backward", x, w4, x.shape[1], lora_A.shape[0]) if need_dx else None
            if dense is not None:
                return dense_backend("backward", x, dense, lora_A, p).backward(grad_y, x, dense, lora_A, lora_B, xa,
                                                                               scaling, p, seed, need_dx)
            return _backward(grad_y, x, None, lora_A, lora_B, xa, scaling, p, kernel_seed(seed, x), need_dx, w4=w4)

    @staticmethod
    def base_forward(x, w4, bias):
        with on_device(x):
            return base_4bit(x, w4, x.shape[1], bias, transposed=True)

    @staticmethod
    def base_backward(grad, x, w4):
        with on_device(x):
            return base_4bit(grad, w4, x.shape[1], transposed=False)

    @staticmethod
    def dequantize(w4, in_features, dtype):
        return dequantize_4bit(w4, in_features, dtype)


def base_4bit(x, w4, in_features: int, bias=None, transposed: bool = True):
    """x W0ᵀ + bias [M, out] (transposed) or x W0 [M, in] for a 4-bit W0 [out, in] (w4: its kernel_args()), in
    x's dtype: the fused GEMM without a LoRA term (lora_linear_multi_4bit's base products, to which its own
    kernels add the adapters)."""
    _check_dtype(x)
    dense = _dequantized_for("forward" if transposed else "backward", x, w4, in_features, 16)
    if dense is not None:
        return torch.nn.functional.linear(x, dense, bias) if transposed else x @ dense
    N = w4[6] if transposed else in_features
    y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    if x.shape[0]:  # rank 0: the LoRA stage runs no iteration and reads nothing
        _fused_gemm_launch(x, None, bias, x.new_empty(x.shape[0], 0), x.new_empty(0, N), None, y, 0.0, 0.0, None,
                           shrink_in_loop=False, dropout_epilogue=False, w4=w4, w4_transposed=transposed)
    return y


@triton.jit(do_not_specialize=["n_rows"])
def _dequantize_kernel(
    codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr, out_ptr,
    n_rows, n_cols,
    DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr, BLOCKSIZE: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """out[n_rows, n_cols] = the whole 4-bit weight in out's dtype, by the GEMMs' own tile dequantization."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col0 = tl.program_id(1) * BLOCK_COLS
    cols = col0 + tl.arange(0, BLOCK_COLS)
    tile = dequantized_tile(codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr, rows,
                            col0, n_rows, n_cols, out_ptr.dtype.element_ty, BLOCK_COLS, BLOCKSIZE, DOUBLE_QUANT,
                            ALIGNED, SOFT_BF16)
    out = out_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out, tile, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


def dequantize_launch_args(w4, in_features: int, dtype: torch.dtype, out: torch.Tensor):
    """(kernel, grid, args, flags) of out [out, in] = the 4-bit weight w4 (its kernel_args()) in dtype."""
    codes, absmax, nested_absmax, nested_code, offset, table, out_features, blocksize = w4
    double_quant = nested_absmax is not None
    block_rows, block_cols = (16, 64) if interpreted() else (32, 256)
    grid = (triton.cdiv(out_features, block_rows), triton.cdiv(in_features, block_cols))
    args = (codes, absmax, *((nested_absmax, nested_code, offset) if double_quant else (out, out, out)), table, out,
            out_features, in_features)
    flags = dict(DOUBLE_QUANT=double_quant, ALIGNED=weight4bit_aligned(in_features, blocksize), BLOCKSIZE=blocksize,
                 SOFT_BF16=soft_bf16(dtype), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
                 enable_fp_fusion=not double_quant)
    return _dequantize_kernel, grid, args, flags


def dequantize_4bit(w4, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole 4-bit weight [out, in] in dtype (w4: its kernel_args()), equal to reference.dequantize_4bit bit for
    bit: the "dequantize" path, DoRA's row norms (a block of rows at a time) and the GPU check's baseline."""
    codes, out_features = w4[0], w4[6]
    out = torch.empty(out_features, in_features, device=codes.device, dtype=dtype)
    if out.numel():
        kernel, grid, args, flags = dequantize_launch_args(w4, in_features, dtype, out)
        with on_device(codes):
            kernel[grid](*args, **flags)
    return out
