"""Triton kernels of lora_linear_multi (many adapters in one batch), forward and backward.

The rows are grouped by adapter on the GPU, without a host synchronisation: `_group` sorts the ids,
counts each adapter's rows and cuts every adapter's rows into tiles of BLOCK_M rows, so that a tile
belongs to one adapter (SGMV-style; at decode, a tile is one row: BGMV). The grid has a fixed upper
bound of tiles, cdiv(M, BLOCK_M) + n; tiles past the last exit at once. Three kernels serve every product:

  _segment_shrink_kernel   L[m, :r_a] = drop?(X[m]) D_a (· s_a)     xa = drop(x) A_aᵀ; gb = s_a · dy B_a
  _segment_expand_kernel   O[m] += (s_a ·) L[m, :r_a] U_a (⊙ mask)   y += s_a · xa B_aᵀ; dx += (gb A_a) ⊙ mask
  _segment_weight_grad_kernel  G_a = (s_a ·) P_aᵀ drop?(Q_a)          dA_a = gbᵀ drop(x); dB_aᵀ = s_a · xaᵀ dy

The base GEMMs (x W0ᵀ + b, dy W0) are cuBLAS's (torch), run once over the whole batch; on a 4-bit W0
(Weight4bitBackend, lora_linear_multi_4bit) they are triton_lora_linear's fused GEMM with no LoRA term, which
dequantizes W0's tiles in its K loop. D_a, U_a and
the outputs are addressed through strides, so A, B and their transposes need no copies. An adapter of
rank r_a < r_max loads, computes and writes only its r_a ranks (the rest of xa and of its gradients
stay zero). Dropout masks are lora_linear's (keep_mask with the row's index in the batch). Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import (block_r, cast, dot, dropout_args, dropped, full_precision, grouped_mask, interpreted,
                            keep_mask, kernel_seed, multiprocessors, on_device, soft_bf16, weight_grad_tiles)
from .triton_lora_linear import base_4bit  # the 4-bit base GEMM (Weight4bitBackend)


def _tile_rows() -> int:
    return 16 if interpreted() else 64


def _block_k() -> int:
    return 32 if interpreted() else 64


@triton.jit
def _tile(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_count_ptr, n_adapters, BLOCK_M: tl.constexpr):
    """(adapter, rows of the batch, row mask) of this program's tile; adapter >= n_adapters: no tile."""
    t = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + t)
    start = tl.load(tile_start_ptr + t)
    count = tl.load(tile_count_ptr + t)
    slots = tl.arange(0, BLOCK_M)
    # one comparison, not a tensor mask & a scalar one: Triton 3.9's interpreter refuses that mask's dtype
    row_ok = slots < tl.where(adapter < n_adapters, count, 0)
    rows = tl.load(order_ptr + start + slots, mask=row_ok, other=0)
    return adapter, rows.to(tl.int64), row_ok


@triton.jit
def _segment_shrink_kernel(
    x_ptr, d_ptr, out_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_count_ptr, ranks_ptr, scalings_ptr,
    K, n_adapters,
    stride_xm, stride_xk, stride_da, stride_dk, stride_dr, stride_om, stride_or,
    seed_ptr, thresholds_ptr, inv_keeps_ptr,
    SCALE: tl.constexpr, DROPOUT: tl.constexpr, GROUPED_MASK: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, j] = drop?(x)[m, :] @ d[a, :, j] (· s_a) for the rows m of this tile's adapter a, ranks j < r_a."""
    adapter, rows, row_ok = _tile(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_count_ptr, n_adapters, BLOCK_M)
    if adapter >= n_adapters:
        return
    rank = tl.load(ranks_ptr + adapter)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(1) * BLOCK_R >= rank:
        return
    rank_ok = ranks < rank
    d_adapter = d_ptr + adapter.to(tl.int64) * stride_da
    if DROPOUT:  # this tile's adapter's probability
        threshold = tl.load(thresholds_ptr + adapter)
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks.to(tl.int64)[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        if DROPOUT:
            x = dropped(x, keep_mask(seed, rows, ks, K, threshold, GROUPED_MASK), SOFT_BF16)
        d = tl.load(d_adapter + ks.to(tl.int64)[:, None] * stride_dk + ranks[None, :] * stride_dr,
                    mask=(ks[:, None] < K) & rank_ok[None, :], other=0.0)
        acc = dot(x, d, acc, SOFT_BF16)  # float32 adapters on a 16-bit x: see dot
    if DROPOUT:
        acc = acc * tl.load(inv_keeps_ptr + adapter)
    if SCALE:
        acc = acc * tl.load(scalings_ptr + adapter)
    out = out_ptr + rows[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _segment_expand_kernel(
    l_ptr, u_ptr, out_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_count_ptr, ranks_ptr, scalings_ptr,
    N, n_adapters,
    stride_lm, stride_lr, stride_ua, stride_ur, stride_un, stride_om, stride_on,
    seed_ptr, thresholds_ptr, inv_keeps_ptr,
    SCALE: tl.constexpr, DROPOUT: tl.constexpr, GROUPED_MASK: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, n] += (s_a ·) l[m, :r_a] @ u[a, :r_a, n] (⊙ mask / (1-p)) for the rows m of this tile's adapter a;
    the sum is formed in float32 and rounded once into out. Each row of out belongs to one tile: no races."""
    adapter, rows, row_ok = _tile(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_count_ptr, n_adapters, BLOCK_M)
    if adapter >= n_adapters:
        return
    rank = tl.load(ranks_ptr + adapter)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    u_adapter = u_ptr + adapter.to(tl.int64) * stride_ua
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        left = tl.load(l_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr,
                       mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        u = tl.load(u_adapter + ranks[:, None] * stride_ur + cols.to(tl.int64)[None, :] * stride_un,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        lora = dot(left, u, lora, SOFT_BF16)
    if SCALE:
        lora = lora * tl.load(scalings_ptr + adapter)
    if DROPOUT:
        threshold = tl.load(thresholds_ptr + adapter)
        keep = keep_mask(tl.load(seed_ptr), rows, cols, N, threshold, GROUPED_MASK)
        lora = tl.where(keep, lora * tl.load(inv_keeps_ptr + adapter), 0.0)
    out = out_ptr + rows[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on
    ok = row_ok[:, None] & col_ok[None, :]
    total = tl.load(out, mask=ok, other=0.0).to(tl.float32) + lora
    tl.store(out, cast(total, out_ptr.dtype.element_ty, SOFT_BF16), mask=ok)


@triton.jit(do_not_specialize=["splits"])
def _segment_weight_grad_kernel(
    p_ptr, q_ptr, out_ptr, order_ptr, seg_start_ptr, seg_count_ptr, ranks_ptr, scalings_ptr,
    N, splits,
    stride_pm, stride_pr, stride_qm, stride_qn, stride_os, stride_oa, stride_or, stride_on,
    seed_ptr, thresholds_ptr, inv_keeps_ptr,
    SCALE: tl.constexpr, DROPOUT: tl.constexpr, GROUPED_MASK: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[s, a, j, n] = (s_a ·) Σ over adapter a's row tiles t ≡ s (mod splits) of p[m, j] · drop?(q)[m, n],
    j < r_a, in float32: slice s of the sum over a's rows (the launcher adds the slices)."""
    adapter = tl.program_id(0) // splits
    split = tl.program_id(0) % splits
    rank = tl.load(ranks_ptr + adapter)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(2) * BLOCK_R >= rank:
        return
    rank_ok = ranks < rank
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    start = tl.load(seg_start_ptr + adapter)
    count = tl.load(seg_count_ptr + adapter)
    if DROPOUT:
        threshold = tl.load(thresholds_ptr + adapter)
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    # every splits-th row tile: any row count is covered, and the slices of one adapter share its rows evenly
    for m0 in range(split * BLOCK_M, count, splits * BLOCK_M):
        slots = m0 + tl.arange(0, BLOCK_M)
        row_ok = slots < count
        rows = tl.load(order_ptr + start + slots, mask=row_ok, other=0).to(tl.int64)
        p = tl.load(p_ptr + rows[:, None] * stride_pm + ranks[None, :] * stride_pr,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qm + cols.to(tl.int64)[None, :] * stride_qn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            q = dropped(q, keep_mask(seed, rows, cols, N, threshold, GROUPED_MASK), SOFT_BF16)
        acc = dot(tl.trans(p), q, acc, SOFT_BF16)
    if DROPOUT:
        acc = acc * tl.load(inv_keeps_ptr + adapter)
    if SCALE:
        acc = acc * tl.load(scalings_ptr + adapter)
    out = (out_ptr + split.to(tl.int64) * stride_os + adapter.to(tl.int64) * stride_oa + ranks[:, None] * stride_or
           + cols.to(tl.int64)[None, :] * stride_on)
    tl.store(out, acc, mask=rank_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------
# Grouping and launchers


class Groups:
    """The batch's rows grouped by adapter, on the batch's device (no host synchronisation).

    order [M]: rows sorted by adapter (-1 first); seg_start / seg_count [n]: each adapter's range in
    order; tile_adapter / tile_start / tile_count [max_tiles]: each tile's adapter (n: no tile), its
    first position in order and its number of rows (at most block_m).
    """

    def __init__(self, adapter_ids: torch.Tensor, n: int, block_m: int):
        M = adapter_ids.shape[0]
        device = adapter_ids.device
        self.order = torch.argsort(adapter_ids, stable=True)
        counts = torch.zeros(n + 1, dtype=torch.int64, device=device)
        counts.scatter_add_(0, adapter_ids + 1, torch.ones_like(adapter_ids))
        starts = torch.cumsum(counts, 0) - counts
        self.seg_start, self.seg_count = starts[1:].contiguous(), counts[1:].contiguous()
        tiles = (self.seg_count + block_m - 1) // block_m
        tiles_end = torch.cumsum(tiles, 0)
        self.max_tiles = triton.cdiv(M, block_m) + n
        t = torch.arange(self.max_tiles, device=device)
        adapter = torch.searchsorted(tiles_end, t, right=True)  # n for tiles past the last
        a = adapter.clamp(max=n - 1)
        first_tile = tiles_end[a] - tiles[a]
        self.tile_adapter = adapter
        self.tile_start = self.seg_start[a] + (t - first_tile) * block_m
        self.tile_count = (self.seg_start[a] + self.seg_count[a] - self.tile_start).clamp(0, block_m)


def shrink_launch_args(x, d, d_strides, out, groups, ranks, scalings, scale: bool, dropout, seed, r_max: int):
    """(kernel, grid, args, flags) of out[m, :r_a] = drop?(x[m]) d_a (· s_a); d_strides: (adapter, k, rank);
    dropout: None, or each adapter's (thresholds, 1/(1-p)) on the device (see _dropout_tensors), with seed
    a 0-d int64 tensor on the device."""
    thresholds, inv_keeps = dropout or (ranks, scalings)  # unread without dropout
    br = block_r(r_max)
    grid = (groups.max_tiles, triton.cdiv(r_max, br))
    args = (x, d, out, groups.order, groups.tile_adapter, groups.tile_start, groups.tile_count, ranks, scalings,
            x.shape[1], ranks.shape[0], x.stride(0), x.stride(1), *d_strides, out.stride(0), out.stride(1),
            _seed_arg(seed, ranks), thresholds, inv_keeps)
    flags = dict(SCALE=scale, DROPOUT=dropout is not None, GROUPED_MASK=grouped_mask(x.shape[1]),
                 SOFT_BF16=soft_bf16(x.dtype), BLOCK_M=_tile_rows(),
                 BLOCK_K=_block_k(), BLOCK_R=br)
    return _segment_shrink_kernel, grid, args, flags


def expand_launch_args(left, u, u_strides, out, groups, ranks, scalings, scale: bool, dropout, seed, r_max: int):
    """(kernel, grid, args, flags) of out[m] += (s_a ·) left[m, :r_a] u_a (⊙ mask); u_strides: (adapter, rank, n)."""
    thresholds, inv_keeps = dropout or (ranks, scalings)
    N = out.shape[1]
    block_n = 32 if interpreted() else 128
    grid = (groups.max_tiles, triton.cdiv(N, block_n))
    args = (left, u, out, groups.order, groups.tile_adapter, groups.tile_start, groups.tile_count, ranks, scalings,
            N, ranks.shape[0], left.stride(0), left.stride(1), *u_strides, out.stride(0), out.stride(1),
            _seed_arg(seed, ranks), thresholds, inv_keeps)
    # a float32 left operand (dx's gb) in chunks of 32 or 64 ranks spilled on sm_80 and sm_90: 16 (gpu_compile_check)
    rank_tile = 16 if left.dtype == torch.float32 else block_r(r_max)
    flags = dict(SCALE=scale, DROPOUT=dropout is not None, GROUPED_MASK=grouped_mask(N),
                 SOFT_BF16=soft_bf16(out.dtype), BLOCK_M=_tile_rows(), BLOCK_N=block_n, BLOCK_R=rank_tile)
    return _segment_expand_kernel, grid, args, flags


def weight_grad_splits(M: int, n: int, N: int, r_max: int, programs_wanted: int, full: bool = False) -> int:
    """How many slices the weight gradient's sum over rows is cut into: enough for about `programs_wanted`
    programs in all (few adapters with many rows would otherwise leave most of a GPU idle, one program
    looping over thousands of rows), never more than the batch has row tiles. Chosen from M and n alone:
    the rows per adapter are on the GPU, and reading them would synchronise. full: float32 dots (see
    weight_grad_tiles)."""
    block_m, block_n = weight_grad_tiles(full)
    programs = n * triton.cdiv(N, block_n) * triton.cdiv(r_max, block_r(r_max))
    return max(1, min(triton.cdiv(programs_wanted, programs), triton.cdiv(M, block_m)))


def weight_grad_launch_args(p_, q, out, groups, ranks, scalings, scale: bool, dropout, seed, r_max: int):
    """(kernel, grid, args, flags) of out[s, a, j, n] = (s_a ·) Σ over slice s of adapter a's rows of
    p_[m, j] drop?(q)[m, n], out [splits, n, r_max, N] float32; float32 operands get full-precision dots."""
    thresholds, inv_keeps = dropout or (ranks, scalings)
    N = q.shape[1]
    splits = out.shape[0]
    block_m, block_n = weight_grad_tiles(full_precision(p_, q))
    br = block_r(r_max)
    grid = (ranks.shape[0] * splits, triton.cdiv(N, block_n), triton.cdiv(r_max, br))
    args = (p_, q, out, groups.order, groups.seg_start, groups.seg_count, ranks, scalings, N, splits,
            p_.stride(0), p_.stride(1), q.stride(0), q.stride(1), *out.stride(), _seed_arg(seed, ranks), thresholds,
            inv_keeps)
    flags = dict(SCALE=scale, DROPOUT=dropout is not None, GROUPED_MASK=grouped_mask(N), SOFT_BF16=soft_bf16(q.dtype),
                 BLOCK_M=block_m,
                 BLOCK_N=block_n, BLOCK_R=br)
    return _segment_weight_grad_kernel, grid, args, flags


def _weight_grad(p_, q, groups, ranks, scalings, scale: bool, dropout, seed, r_max: int):
    """[n, r_max, N] float32: each adapter's (s_a ·) p_ᵀ drop?(q) over its rows, zeros past its rank; the sum
    over rows in weight_grad_splits(...) slices, added here."""
    M, N = q.shape
    wanted = 1 if interpreted() else 4 * multiprocessors(q.device)
    splits = weight_grad_splits(M, ranks.shape[0], N, r_max, wanted, full_precision(p_, q))
    part = torch.zeros(splits, ranks.shape[0], r_max, N, device=q.device, dtype=torch.float32)
    _launch(weight_grad_launch_args(p_, q, part, groups, ranks, scalings, scale, dropout, seed, r_max))
    return part[0] if splits == 1 else part.sum(0)


def _launch(launch_args):
    kernel, grid, args, flags = launch_args
    kernel[grid](*args, **flags)


def _check_dtypes(x, lora_A):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"the triton backend runs float16, bfloat16 and float32, with adapters of x's dtype or "
                        f"float32, got x {x.dtype} and adapters {lora_A.dtype}")


def _seed_arg(seed, placeholder):
    """The seed's pointer argument; without dropout no kernel reads it and any tensor stands in."""
    return seed if seed is not None else placeholder


def _dropout_tensors(dropouts: torch.Tensor, device):
    """Each adapter's (16-bit threshold, 1/(1-p)) on the device, or None when no adapter drops (dropouts
    is a CPU tensor: reading it does not synchronise). Kept per (probabilities, device): the tables are
    copied to the GPU once, by the first call (a CUDA graph's eager warm-up), and a capture reuses them
    instead of copying from host memory, which a capturing stream refuses."""
    ps = tuple(dropouts.tolist())
    if not any(ps):
        return None
    return _device_dropout_tables(ps, torch.device(device))


@functools.lru_cache(maxsize=64)
def _device_dropout_tables(ps: tuple, device: torch.device):
    pairs = [dropout_args(p) for p in ps]
    return (torch.tensor([t for t, _ in pairs], dtype=torch.int32).to(device),
            torch.tensor([k for _, k in pairs], dtype=torch.float32).to(device))


def _prepare(x, lora_A, scalings, adapter_ids, ranks):
    n, r_max = lora_A.shape[:2]
    # contiguous: the kernels index ids, ranks and scalings by position (a strided view, t[::2], read as if
    # it were packed gave wrong ranks and scalings)
    ids = adapter_ids.to(x.device, torch.int64).contiguous()
    ranks = (torch.full((n,), r_max, dtype=torch.int64, device=x.device) if ranks is None
             else ranks.to(x.device, torch.int64).contiguous())
    # Checked on the device, asynchronously: reading the values on the host would synchronise.
    torch._assert_async(((ids >= -1) & (ids < n)).all(), f"lora_kernels: adapter_ids must be in [-1, {n})")
    torch._assert_async(((ranks >= 1) & (ranks <= r_max)).all(), f"lora_kernels: ranks must be in [1, r_max={r_max}]")
    return Groups(ids, n, _tile_rows()), ranks, scalings.to(x.device, torch.float32).contiguous()


def forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
    """(y [M, out], xa [M, r_max]) for x [M, in] (see reference.lora_linear_multi); seed: a 0-d int64 tensor
    (read on x's device) or None."""
    return _forward(x, lambda: torch.nn.functional.linear(x, weight, bias), lora_A, lora_B, scalings, adapter_ids,
                    ranks, dropouts, seed)


def _forward(x, base, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
    """forward's launches after base() = x W0ᵀ + b (one product over the whole batch)."""
    _check_dtypes(x, lora_A)
    with on_device(x):
        seed = kernel_seed(seed, x)
        y = base().contiguous()
        r_max = lora_A.shape[1]
        xa = torch.zeros(x.shape[0], r_max, device=x.device, dtype=lora_A.dtype)
        if x.shape[0] == 0:
            return y, xa
        groups, ranks, scalings = _prepare(x, lora_A, scalings, adapter_ids, ranks)
        dropout = _dropout_tensors(dropouts, x.device)
        a_strides = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))  # d[a, k, j] = A[a, j, k]
        _launch(shrink_launch_args(x, lora_A, a_strides, xa, groups, ranks, scalings, False, dropout, seed, r_max))
        b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))  # u[a, j, n] = B[a, n, j]
        _launch(expand_launch_args(xa, lora_B, b_strides, y, groups, ranks, scalings, True, None, None, r_max))
        return y, xa


def backward(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx: bool):
    """(dx [M, in] or [0], dA [n, r_max, in], dB [n, out, r_max]) for a frozen weight."""
    return _backward(grad_y, x, lambda: grad_y @ weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts,
                     seed, need_dx)


def _backward(grad_y, x, base_dx, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx: bool):
    """backward's launches; base_dx() = dy W0 (when need_dx)."""
    _check_dtypes(x, lora_A)
    with on_device(x):
        seed = kernel_seed(seed, x)
        n, r_max = lora_A.shape[:2]
        dx = base_dx() if need_dx else x.new_empty(0)
        if x.shape[0] == 0:
            return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
        groups, ranks, scalings = _prepare(x, lora_A, scalings, adapter_ids, ranks)
        dropout = _dropout_tensors(dropouts, x.device)
        gb = torch.zeros(x.shape[0], r_max, device=x.device, dtype=torch.float32)  # s_a · dy B_a, float32
        b_strides = (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2))  # d[a, n, j] = B[a, n, j]
        _launch(shrink_launch_args(grad_y, lora_B, b_strides, gb, groups, ranks, scalings, True, None, None, r_max))
        d_lora_A = _weight_grad(gb, x, groups, ranks, scalings, False, dropout, seed, r_max)
        d_lora_B_t = _weight_grad(xa, grad_y, groups, ranks, scalings, True, None, None, r_max)
        d_lora_B = d_lora_B_t.transpose(1, 2)  # [n, r_max, out] -> dB [n, out, r_max]
        if need_dx:
            dx = dx.contiguous()
            _launch(expand_launch_args(gb, lora_A, lora_A.stride(), dx, groups, ranks, scalings, False, dropout, seed,
                                       r_max))
        return dx, d_lora_A.to(lora_A.dtype), d_lora_B.to(lora_B.dtype, memory_format=torch.contiguous_format)


class Weight4bitBackend:
    """lora_linear_multi_4bit: the same launches, the base products x W0ᵀ + b and dy W0 on a 4-bit W0 (w4: its
    kernel_args()) by triton_lora_linear's fused GEMM, which dequantizes W0's tiles in its K loop."""

    @staticmethod
    def forward(x, w4, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
        return _forward(x, lambda: base_4bit(x, w4, x.shape[1], bias), lora_A, lora_B, scalings, adapter_ids, ranks,
                        dropouts, seed)

    @staticmethod
    def backward(grad_y, x, w4, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx: bool):
        return _backward(grad_y, x, lambda: base_4bit(grad_y, w4, x.shape[1], transposed=False), lora_A, lora_B, xa,
                         scalings, adapter_ids, ranks, dropouts, seed, need_dx)
