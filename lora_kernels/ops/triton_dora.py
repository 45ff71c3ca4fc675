"""Triton kernels of DoRA's per-column gain, around the LoRA kernels (ops/dora_linear.py):

  _gain_kernel        y = cast(g ⊙ z + b)                       [M, N]   one pass: z read, y written
  _gain_grad_kernel   g ⊙ dy, and per row block Σ_rows dy ⊙ z    [M, N], [blocks, N]   dy and z read once

g [N] is float32 (float64 tensors never reach a GPU kernel here), products and sums are float32, each output is
rounded once. In ATen the same epilogues are three passes over [M, N] forward (a float32 g ⊙ z + b, then its
rounding) and five backward (g ⊙ dy in float32, its rounding, dy ⊙ z, the row sum): on a GPU, where the GEMMs
are fast, those passes were the cost model's largest DoRA excess (benchmarks/NOTES.md). z may be y's buffer
(gained in place, when the forward does not keep z). The partial sums are per block of BLOCK_M rows, added by
one small ATen sum: a fixed order, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import cast, interpreted, on_device, soft_bf16


def _tiles() -> tuple[int, int]:
    return (16, 32) if interpreted() else (32, 128)


@triton.jit(do_not_specialize=["M"])
def _gain_kernel(z_ptr, g_ptr, b_ptr, y_ptr, M, N, stride_zm, stride_ym, HAS_BIAS: tl.constexpr,
                 SOFT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_zm + cols[None, :], mask=ok, other=0.0)
    y = z.to(tl.float32) * tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], cast(y, y_ptr.dtype.element_ty, SOFT_BF16),
             mask=ok)


@triton.jit(do_not_specialize=["M"])
def _gain_grad_kernel(dy_ptr, z_ptr, g_ptr, gdy_ptr, part_ptr, M, N, stride_dym, stride_zm, stride_gm,
                      NEED_DM: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
    tl.store(gdy_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :],
             cast(dy * g[None, :], gdy_ptr.dtype.element_ty, SOFT_BF16), mask=ok)
    if NEED_DM:
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_zm + cols[None, :], mask=ok, other=0.0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(dy * z.to(tl.float32), axis=0), mask=col_ok)


def gain_launch_args(z, gain, bias, y):
    """(kernel, grid, args, flags) of y = cast(gain ⊙ z + bias); y may be z."""
    M, N = z.shape
    block_m, block_n = _tiles()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    args = (z, gain, bias if bias is not None else gain, y, M, N, z.stride(0), y.stride(0))
    return _gain_kernel, grid, args, dict(HAS_BIAS=bias is not None, SOFT_BF16=soft_bf16(y.dtype), BLOCK_M=block_m,
                                          BLOCK_N=block_n)


def gain_grad_launch_args(grad_y, z, gain, out, part):
    """(kernel, grid, args, flags) of out = cast(gain ⊙ grad_y) and part [row blocks, N] = Σ_rows grad_y ⊙ z
    (part None: no sums)."""
    M, N = grad_y.shape
    block_m, block_n = _tiles()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    need_dm = part is not None
    args = (grad_y, z if need_dm else grad_y, gain, out, part if need_dm else gain, M, N, grad_y.stride(0),
            z.stride(0) if need_dm else 0, out.stride(0))
    return _gain_grad_kernel, grid, args, dict(NEED_DM=need_dm, SOFT_BF16=soft_bf16(out.dtype), BLOCK_M=block_m,
                                               BLOCK_N=block_n)


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dora_gained(z: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                in_place: bool) -> torch.Tensor:
    """y = g ⊙ z + b [M, N] in out_dtype (z [M, N], gain [N] float32, bias [N] or None), one rounding; into z's
    buffer when in_place and the dtypes agree."""
    z = _contiguous_rows(z)
    y = z if in_place and z.dtype == out_dtype else torch.empty(z.shape, dtype=out_dtype, device=z.device)
    if z.numel():
        kernel, grid, args, flags = gain_launch_args(z, gain.contiguous(), bias, y)
        with on_device(z):
            kernel[grid](*args, **flags)
    return y


def dora_gain_gradients(grad_y: torch.Tensor, z: torch.Tensor | None, gain: torch.Tensor, out_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g ⊙ dy [M, N] in out_dtype, Σ_rows dy ⊙ z [N] float32, or None when z is None), dy and z read once."""
    grad_y = _contiguous_rows(grad_y)
    M, N = grad_y.shape
    out = torch.empty(M, N, dtype=out_dtype, device=grad_y.device)
    if z is None or not M:
        part = None
    else:
        z = _contiguous_rows(z)
        part = torch.empty(triton.cdiv(M, _tiles()[0]), N, dtype=torch.float32, device=grad_y.device)
    if grad_y.numel():
        kernel, grid, args, flags = gain_grad_launch_args(grad_y, z, gain.contiguous(), out, part)
        with on_device(grad_y):
            kernel[grid](*args, **flags)
    if z is None:
        return out, None
    return out, (part.sum(0) if part is not None else grad_y.new_zeros(N, dtype=torch.float32))
