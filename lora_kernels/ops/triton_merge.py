"""Triton kernel of the in-place merge: W = round(W + s · B A − s' · B' A').

Each program owns a BLOCK_O x BLOCK_I tile of W. Its delta is accumulated in
float32 (float64 for float64 weights) as a sum of rank-1 outer products,
k = 0 .. r-1 in order: a fixed order, so unmerge (s -> -s) removes exactly what
merge added, and no tensor-core rounding (TF32) touches the delta. W is read and
written once; memory beyond W is O(tile). With CHECK_ONLY nothing is written and
the number of non-finite merged values is counted instead (safe merge).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import cast, interpreted, on_device, soft_bf16


@triton.jit
def _tile_delta(a_ptr, b_ptr, R, stride_ar, stride_ai, stride_bo, stride_br, rows, cols, row_ok, col_ok,
                ACC_DTYPE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Σ_k B[rows, k] A[k, cols] in ACC_DTYPE, k in order."""
    delta = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC_DTYPE)
    b_rows = b_ptr + rows.to(tl.int64) * stride_bo
    a_cols = a_ptr + cols.to(tl.int64) * stride_ai
    for k in range(0, R):
        b_k = tl.load(b_rows + k * stride_br, mask=row_ok, other=0.0).to(ACC_DTYPE)
        a_k = tl.load(a_cols + k * stride_ar, mask=col_ok, other=0.0).to(ACC_DTYPE)
        delta += b_k[:, None] * a_k[None, :]
    return delta


@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr, sub_a_ptr, sub_b_ptr, nonfinite_ptr,
    OUT, IN, R, SUB_R,
    stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br,
    stride_sar, stride_sai, stride_sbo, stride_sbr,
    scaling, sub_scaling,
    HAS_SUB: tl.constexpr, CHECK_ONLY: tl.constexpr, ACC_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok, col_ok = rows < OUT, cols < IN
    delta = _tile_delta(a_ptr, b_ptr, R, stride_ar, stride_ai, stride_bo, stride_br, rows, cols, row_ok, col_ok,
                        ACC_DTYPE, BLOCK_O, BLOCK_I)
    change = delta * scaling
    if HAS_SUB:
        # s·d − s'·d': swapping the two adapters gives exactly the negated change.
        sub = _tile_delta(sub_a_ptr, sub_b_ptr, SUB_R, stride_sar, stride_sai, stride_sbo, stride_sbr,
                          rows, cols, row_ok, col_ok, ACC_DTYPE, BLOCK_O, BLOCK_I)
        change = change - sub * sub_scaling
    mask = row_ok[:, None] & col_ok[None, :]
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wo + cols.to(tl.int64)[None, :] * stride_wi
    merged = tl.load(w_ptrs, mask=mask, other=0.0).to(ACC_DTYPE) + change
    rounded = cast(merged, w_ptr.dtype.element_ty, SOFT_BF16)  # overflow shows up here
    if CHECK_ONLY:
        as_acc = rounded.to(ACC_DTYPE)
        not_finite = (as_acc - as_acc) != 0  # NaN for ±Inf and NaN alike
        tl.atomic_add(nonfinite_ptr, tl.sum((not_finite & mask).to(tl.int32), axis=1).sum(axis=0))
    else:
        tl.store(w_ptrs, rounded, mask=mask)


def merge_launch_args(weight, lora_A, lora_B, scaling: float, sub_A, sub_B, sub_scaling: float, check_only: bool,
                      nonfinite):
    """(kernel, grid, args, flags) of the merge over weight [out, in] (also what the GPU compile check compiles)."""
    out_features, in_features = weight.shape
    block_o, block_i = (16, 32) if interpreted() else (32, 128)
    has_sub = sub_A is not None
    sub_A_, sub_B_ = (sub_A, sub_B) if has_sub else (lora_A, lora_B)
    grid = (triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i))
    args = (weight, lora_A, lora_B, sub_A_, sub_B_, nonfinite,
            out_features, in_features, lora_A.shape[0], sub_A_.shape[0],
            weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
            lora_B.stride(1), sub_A_.stride(0), sub_A_.stride(1), sub_B_.stride(0), sub_B_.stride(1),
            scaling, sub_scaling if has_sub else 0.0)
    flags = dict(HAS_SUB=has_sub, CHECK_ONLY=check_only,
                 ACC_DTYPE=tl.float64 if weight.dtype == torch.float64 else tl.float32,
                 SOFT_BF16=soft_bf16(weight.dtype), BLOCK_O=block_o, BLOCK_I=block_i,
                 # No FMA contraction: s·d − s'·d' must be the exact negation of s'·d' − s·d, so that
                 # switching adapters back and forth does not drift (an FMA rounds one product, not the other).
                 enable_fp_fusion=False)
    return _merge_kernel, grid, args, flags


def merge_(weight, lora_A, lora_B, scaling: float, sub_A, sub_B, sub_scaling: float, check_only: bool) -> int:
    """Launch the merge over weight [out, in]; returns the non-finite count when check_only, else 0."""
    if weight.numel() == 0:
        return 0
    nonfinite = torch.zeros(1, dtype=torch.int32, device=weight.device)
    kernel, grid, args, flags = merge_launch_args(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling,
                                                  check_only, nonfinite)
    with on_device(weight):
        kernel[grid](*args, **flags)
    return int(nonfinite.item()) if check_only else 0
