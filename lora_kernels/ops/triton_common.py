"""Triton helpers shared by the kernel files: autotune configs, the dropout mask, and the
interpreter work-arounds. Kernels import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted
from ..reference import NESTED_BLOCKSIZE, dropout_threshold  # the mask rule is defined once, by the spec


_AS_ON_GPU = [False]


def interpreted() -> bool:
    """Whether the kernels run through Triton's interpreter (never inside as_launched_on_gpu())."""
    return triton_interpreted() and not _AS_ON_GPU[0]


@contextlib.contextmanager
def as_launched_on_gpu():
    """The launchers' choices (tiles, grids, configs) as a GPU gets them, also under TRITON_INTERPRET=1: for
    lora_kernels.cost_model, which launches nothing."""
    before, _AS_ON_GPU[0] = _AS_ON_GPU[0], True
    try:
        yield
    finally:
        _AS_ON_GPU[0] = before  # nested uses (the cost model inside gpu_paths inside a launcher) keep the outer one


def gpu_configs(full: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """triton.Configs from (tile sizes, num_warps, num_stages), as a GPU's autotuner gets them.

    LORA_KERNELS_AUTOTUNE=first (read at import) keeps only the first config of each list: no
    autotuning runs, for validation passes that must fit a short GPU lease."""
    if os.environ.get("LORA_KERNELS_AUTOTUNE") == "first":
        full = full[:1]
    return [triton.Config(tiles, num_warps=warps, num_stages=stages) for tiles, warps, stages in full]


def configs(full: list[tuple[dict, int, int]], small: dict) -> list[triton.Config]:
    """gpu_configs(full); `small` alone under the interpreter (it is slow: one small config, no tuning)."""
    if interpreted():
        return [triton.Config(small, num_warps=4, num_stages=1)]
    return gpu_configs(full)


@triton.jit
def _draws(word_index, half, w0, w1, w2, w3):
    """The 16-bit draw in half `half` of word `word_index` of a Philox output (see reference.py), as int32.
    In 32-bit arithmetic: 64-bit draws doubled the registers of every masked tile (the dropout epilogue
    of dx spilled over 1 KB per thread on sm_90)."""
    word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
    return ((word >> (half * 16).to(tl.uint32)) & 0xFFFF).to(tl.int32)


@triton.jit
def _grouped_draws(seed, rows, cols, row_len):
    """Draws of a tile whose rows start on a Philox group (row_len % 8 == 0) and whose cols run in aligned
    groups of 8: one generator call per group, [rows, cols / 8] calls in all."""
    BLOCK_ROWS: tl.constexpr = rows.shape[0]
    BLOCK_COLS: tl.constexpr = cols.shape[0]
    group_first = tl.min(tl.reshape(cols, (BLOCK_COLS // 8, 8)), axis=1)  # each run's first column
    counters = (rows.to(tl.int64)[:, None] * row_len + group_first.to(tl.int64)[None, :]) >> 3
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    k = tl.arange(0, 8)[None, None, :]  # element e = 8·group + k: word (k >> 1), half (k & 1)
    draws = _draws(k >> 1, k & 1, w0[:, :, None], w1[:, :, None], w2[:, :, None], w3[:, :, None])
    return tl.reshape(draws, (BLOCK_ROWS, BLOCK_COLS))


@triton.jit
def _elementwise_draws(seed, rows, cols, row_len):
    """Draws of any tile: one generator call per element (a group may straddle two rows)."""
    offsets = rows.to(tl.int64)[:, None] * row_len + cols.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, offsets >> 3)
    return _draws(((offsets >> 1) & 3).to(tl.int32), (offsets & 1).to(tl.int32), w0, w1, w2, w3)


@triton.jit
def keep_mask(seed, rows, cols, row_len, threshold, GROUPED: tl.constexpr):
    """Dropout keep-mask of elements (rows[:, None], cols[None, :]) of a [*, row_len] tensor.

    cols are consecutive and start at a multiple of 8 (a block of a power-of-two width >= 8). When
    row_len is a multiple of 8 too (GROUPED = grouped_mask(row_len), a compile-time flag), every aligned
    run of 8 columns is one Philox group and the generator runs once per group instead of once per
    element (8x less Philox work). A run-time test here compiled both generators into every masked
    kernel, which made dx's dropout epilogue spill about 1 KB per thread on sm_90 (gpu_compile_check).
    """
    if GROUPED:
        draws = _grouped_draws(seed, rows, cols, row_len)
    else:
        draws = _elementwise_draws(seed, rows, cols, row_len)
    return draws >= threshold


@triton.jit
def dropped(x, keep, SOFT_BF16: tl.constexpr):
    """x ⊙ keep (0 or 1) in x's dtype, as a multiplication: an Inf or NaN that is dropped gives NaN, as in
    reference.py (a select would hide it). Under the interpreter a bfloat16 product is taken on its raw
    16-bit pattern (inf · 0 came out 0), so there it goes through float32."""
    if SOFT_BF16:
        return (x.to(tl.float32) * keep.to(tl.float32)).to(x.dtype)
    return x * keep.to(x.dtype)


# Triton's interpreter mishandles bfloat16 in two places: tl.dot multiplies the
# raw uint16 bits, and float32 -> bfloat16 casts truncate. Kernels take a
# constexpr SOFT_BF16, set only when interpreting bfloat16, that routes around
# both: dots on float32 copies (bf16 products are exact in fp32) and a
# round-to-nearest-even done on the bits before the cast. On a GPU it is off.


@triton.jit
def _tf32_part(a):
    """a rounded to TF32 (10 mantissa bits, to nearest) on its float32 bits: exact input for a TF32 MMA."""
    bits = a.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, SOFT_BF16: tl.constexpr):
    """acc + a @ b, float32 accumulation, about float32's precision for a float32 operand (float32 x, float32
    adapters, the backward's gb) on tensor cores: Triton's own float32 dot is plain TF32, which keeps 10 of
    the 23 mantissa bits, and a full-precision FMA dot kept both operand tiles in registers and spilled.
    A float32 operand next to a 16-bit one (exact in TF32) is split into two TF32 parts, big + small, for two
    exact-input TF32 products (22 bits of it kept); two float32 operands get Triton's three-product tf32x3."""
    A_WIDE: tl.constexpr = a.dtype == tl.float32
    B_WIDE: tl.constexpr = b.dtype == tl.float32
    if SOFT_BF16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif A_WIDE and B_WIDE:
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    elif A_WIDE:
        big = _tf32_part(a)
        wide = b.to(tl.float32)
        out = tl.dot(a - big, wide, tl.dot(big, wide, acc, input_precision="tf32"), input_precision="tf32")
    elif B_WIDE:
        big = _tf32_part(b)
        wide = a.to(tl.float32)
        out = tl.dot(wide, b - big, tl.dot(wide, big, acc, input_precision="tf32"), input_precision="tf32")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def cast(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x rounded to nearest-even into dtype."""
    if SOFT_BF16 and dtype == tl.bfloat16:  # only a bfloat16 result needs the soft rounding
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ---- the 4-bit weight (bitsandbytes' layout, lora_kernels/weight4bit.py), dequantized a tile at a time ----------

_NESTED_BLOCKSIZE = tl.constexpr(NESTED_BLOCKSIZE)  # a global a kernel may read


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, ok,
                  DOUBLE_QUANT: tl.constexpr):
    """The float32 scale of quantization blocks `blocks` (0 where not ok): absmax itself or, double quantized,
    nested_code[code] · nested_absmax[b // 256] + offset, two roundings (the launch turns FMA contraction off)."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + blocks, mask=ok, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blocks // _NESTED_BLOCKSIZE, mask=ok, other=0.0)
        scales = tl.where(ok, tl.load(nested_code_ptr + code) * nested + tl.load(offset_ptr), 0.0)
    else:
        scales = tl.load(absmax_ptr + blocks, mask=ok, other=0.0)
    return scales


@triton.jit
def _lookup(table_ptr, codes):
    """table[codes] for a 2-D tile of 4-bit codes, from a register copy of the 16-entry table."""
    ROWS: tl.constexpr = codes.shape[0]
    table = tl.broadcast_to(tl.load(table_ptr + tl.arange(0, 16))[None, :], (ROWS, 16))
    return tl.gather(table, codes, 1)


@triton.jit
def dequantized_tile(codes_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr,
                     rows, col0, n_rows, n_cols, dtype: tl.constexpr, BLOCK_COLS: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
                     SOFT_BF16: tl.constexpr):
    """W0[rows, col0 : col0 + BLOCK_COLS] of a 4-bit weight [n_rows, n_cols] in `dtype`, 0 outside it: element
    e = row·n_cols + col is table[nibble e] · scale[e // BLOCKSIZE] in float32, rounded once (reference.py's
    dequantize_4bit, bit for bit). col0 is a multiple of BLOCK_COLS.

    ALIGNED (n_cols % BLOCKSIZE == 0, every real layer): each row starts on a byte and on a scale block, so the
    tile is read as [rows, BLOCK_COLS / 2] bytes, each split in its two codes, and each run of
    min(BLOCKSIZE, BLOCK_COLS) columns of a row shares one scale, decoded once for the tile; otherwise every
    element finds its byte and its block (blocks then run across rows)."""
    rows64 = rows.to(tl.int64)
    row_ok = rows < n_rows
    if ALIGNED:
        pairs = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        byte_ok = row_ok[:, None] & (pairs * 2 < n_cols)[None, :]
        byte = tl.load(codes_ptr + rows64[:, None] * (n_cols // 2) + pairs[None, :], mask=byte_ok, other=0)
        byte = byte.to(tl.int32)
        # even columns are the high nibble: interleaving (high, low) puts every code in its column
        values = tl.interleave(_lookup(table_ptr, byte >> 4), _lookup(table_ptr, byte & 15))
        SCALES: tl.constexpr = (BLOCK_COLS + BLOCKSIZE - 1) // BLOCKSIZE  # scale blocks across the tile
        SPAN: tl.constexpr = BLOCK_COLS // SCALES  # columns per scale
        span_cols = col0 + SPAN * tl.arange(0, SCALES)
        blocks = rows64[:, None] * (n_cols // BLOCKSIZE) + (span_cols // BLOCKSIZE)[None, :]
        scales = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks,
                               row_ok[:, None] & (span_cols < n_cols)[None, :], DOUBLE_QUANT)
        rows_: tl.constexpr = rows.shape[0]
        scales = tl.reshape(tl.broadcast_to(scales[:, :, None], (rows_, SCALES, SPAN)), (rows_, BLOCK_COLS))
    else:
        cols = col0 + tl.arange(0, BLOCK_COLS)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        e = rows64[:, None] * n_cols + cols[None, :]
        byte = tl.load(codes_ptr + (e >> 1), mask=ok, other=0).to(tl.int32)
        values = _lookup(table_ptr, tl.where((e & 1) == 0, byte >> 4, byte & 15))
        scales = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, e // BLOCKSIZE, ok,
                               DOUBLE_QUANT)
    return cast(values * scales, dtype, SOFT_BF16)


def weight4bit_aligned(in_features: int, blocksize: int) -> bool:
    """dequantized_tile's ALIGNED flag for a weight whose rows are in_features long."""
    return in_features % blocksize == 0


# Ranks are processed in chunks of at most this many: a rank-wide tile (the shrink's d, the
# epilogue's U) then stays within shared memory whatever r is (r = 256 in bf16 needed 240 KB
# in one chunk, over sm_90's 227 KB).
RANK_CHUNK = 64


# Shared memory per block when the device cannot be asked: sm_80's 163 KB (sm_90 has 227 KB).
SM80_SHARED_MEMORY_BYTES = 166912


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory a block may use on `device` (opt-in maximum)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", SM80_SHARED_MEMORY_BYTES)
    return SM80_SHARED_MEMORY_BYTES


def shared_memory_estimate(config: triton.Config, element_bytes: int, block_r_: int, shrink_in_loop: bool,
                           adapter_bytes: int | None = None, w4: bool = False) -> int:
    """An upper bound of the fused GEMM's shared memory: its pipelined x and W0 tiles (and d's, when
    decoding, in the adapters' dtype: float32 adapters on a 16-bit x take twice the bytes) or, if larger,
    the epilogue's L and U tiles in float32 (that loop is not pipelined and reuses the space). A 4-bit W0
    (w4) is not staged as 16-bit tiles: its dequantized tile (plus half a byte per element of conversion
    scratch) is in shared memory once. Checked against the compiler's figures for every config in
    benchmarks/gpu_compile_check.py."""
    kw = config.kwargs
    w_elements = kw["BLOCK_K"] * kw["BLOCK_N"]
    if w4:
        per_stage = kw["BLOCK_M"] * kw["BLOCK_K"] * element_bytes
        extra = int(w_elements * (element_bytes + 0.5))
    else:
        per_stage, extra = (kw["BLOCK_M"] * kw["BLOCK_K"] + w_elements) * element_bytes, 0
    if shrink_in_loop:
        per_stage += kw["BLOCK_K"] * block_r_ * (adapter_bytes or element_bytes)
        if (adapter_bytes or element_bytes) > element_bytes:  # float32 d: the compiler stages a converted copy
            extra += kw["BLOCK_K"] * block_r_ * adapter_bytes
    epilogue = (kw["BLOCK_M"] + kw["BLOCK_N"]) * block_r_ * 4
    return max(config.num_stages * per_stage + extra, epilogue)


@functools.lru_cache(maxsize=None)
def compute_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of `device`; sm_90 for a CPU tensor (the interpreter, which has a single config)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def spills(config: triton.Config, named_args, flags) -> bool:
    """Whether the fused GEMM in this config runs out of registers (ptxas spills to the stack) with these
    operands and flags: the cases benchmarks/gpu_compile_check.py found (ptxas -v, 2026-12-02), which it keeps
    checking on sm_90 and sm_80, so a rule that stops being enough fails CI."""
    kw = config.kwargs
    x = named_args["x_ptr"]
    hopper = compute_capability(x.device) >= (9, 0)
    if flags.get("W4") and flags["SHRINK_IN_LOOP"] and kw["BLOCK_K"] * kw["BLOCK_N"] >= 16384:
        return True  # a decode tile of 16K dequantized elements: two of the three such configs spilled on sm_90
    if flags.get("SWAP_AB") and named_args["u_ptr"].dtype == torch.float32 and config.num_warps == 4 \
            and kw["BLOCK_N"] >= 128:
        return True  # the 4-bit dx with float32 adapters (A split in TF32 parts): 64 x 128 on 4 warps spilled
    if flags["SHRINK_IN_LOOP"]:  # decode: the shrink's x and d tiles sit beside the accumulator
        if named_args["d_ptr"].dtype == torch.float32:
            return kw["BLOCK_K"] > 128 or kw["BLOCK_N"] > 32  # float32 d, split in TF32 parts
        return flags["DROPOUT_SHRINK"] and kw["BLOCK_N"] > 64  # the mask of the x tile
    if named_args["u_ptr"].dtype == torch.float32:  # float32 adapters: both LoRA operands split in three
        return kw["BLOCK_N"] > 128 if hopper else kw["BLOCK_N"] < 256
    return flags["DROPOUT_EPILOGUE"] and kw["BLOCK_M"] == 128 and kw["BLOCK_N"] == 64


def fitting_configs(configs_, named_args, **kwargs) -> list[triton.Config]:
    """The autotuner's configs whose shared memory fits the device (early_config_prune): the fp32 tiles
    are twice the 16-bit ones, and a config over the limit would fail at launch; and that do not spill."""
    x = named_args["x_ptr"]
    limit = shared_memory_limit(x.device)

    def estimate(config):
        return shared_memory_estimate(config, x.element_size(), kwargs["BLOCK_R"], kwargs["SHRINK_IN_LOOP"],
                                      named_args["d_ptr"].element_size(),
                                      kwargs.get("W4", False))

    sixteen_bit = x.dtype != torch.float32  # float32 tensors go to cuBLAS under auto: their spills are reported
    fit = [c for c in configs_ if estimate(c) <= limit and not (sixteen_bit and spills(c, named_args, kwargs))]
    if fit:
        return fit
    # none fits: the smallest, with two stages (the compile check makes sure this does not happen)
    smallest = min(configs_, key=estimate)
    return [triton.Config(smallest.kwargs, num_warps=smallest.num_warps, num_stages=2)]


def weight_grad_tiles(full_precision: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the weight-gradient kernels (lora_linear's and lora_linear_multi's). A float32
    operand (gb, float32 adapters or x) makes the dot full precision (see dot), whose operand tiles take
    registers: as an FMA loop, 64 × 128 spilled 300 B per thread on sm_90 (gpu_compile_check); 32 × 64 does not."""
    if interpreted():
        return 16, 32
    return (32, 64) if full_precision else (64, 128)


def full_precision(*tensors: torch.Tensor) -> bool:
    """Whether a dot over these operands runs in full float32 (one of them is float32: see dot)."""
    return any(t.dtype == torch.float32 for t in tensors)


def block_r(r: int) -> int:
    """The rank tile: r rounded up to a power of two, at least 16 (tl.dot's minimum), at most RANK_CHUNK."""
    return min(RANK_CHUNK, max(16, triton.next_power_of_2(r)))


def on_device(t: torch.Tensor):
    """Launch on t's GPU (not whichever is current): a context for the launches of one op call."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def soft_bf16(dtype: torch.dtype) -> bool:
    return interpreted() and dtype == torch.bfloat16


def grouped_mask(row_len: int) -> bool:
    """keep_mask's GROUPED flag for a masked tensor whose rows are row_len long."""
    return row_len % 8 == 0


def dropout_args(p: float) -> tuple[int, float]:
    """(threshold, 1/(1-p)) for dropout probability p (p = 0: nothing dropped)."""
    return dropout_threshold(p), 1.0 / (1.0 - p)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """SMs of `device` (a CUDA device), or 1 for a CPU tensor under the interpreter."""
    return _multiprocessors(device) if device.type == "cuda" else 1


def kernel_seed(seed, x: torch.Tensor):
    """The dropout seed as the kernels read it: a 0-d int64 tensor on x's device (one drawn there is used as
    it is, so a captured CUDA graph reads each replay's new draw); None without dropout."""
    if seed is None:
        return None
    if not isinstance(seed, torch.Tensor):
        return torch.tensor(seed, dtype=torch.int64, device=x.device)
    return seed.to(x.device, torch.int64)


@triton.jit
def _interpreter_probe_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """What every kernel here does, in small: a bound read in memory turned into a row mask, a loop of masked
    loads feeding dot(), a dropout mask, a store."""
    offsets = tl.arange(0, BLOCK)
    ok = offsets < tl.where(tl.load(x_ptr) > -1e30, n, 0)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for _ in range(0, 2):
        tile = tl.load(x_ptr + offsets[:, None] * BLOCK + offsets[None, :], mask=ok[:, None] & ok[None, :], other=0.0)
        acc = dot(tile, tile, acc, False)
    keep = keep_mask(7, offsets, offsets, BLOCK, 0, True)  # threshold 0: every element kept
    tl.store(out_ptr + offsets[:, None] * BLOCK + offsets[None, :], dropped(acc, keep, False))


def interpreter_probe() -> str | None:
    """Run the probe kernel under the interpreter on CPU tensors: None if it gives torch's answer, else why not
    (the availability check of the triton backend under TRITON_INTERPRET=1)."""
    x = torch.arange(256, dtype=torch.float32).reshape(16, 16) / 256
    out = torch.empty_like(x)
    try:
        _interpreter_probe_kernel[(1,)](x, out, 16, BLOCK=16)
    except Exception as error:  # noqa: BLE001 - any failure means the backend cannot run here
        return f"{type(error).__name__}: {error}"
    if not torch.allclose(out, 2 * (x @ x), rtol=1e-4, atol=1e-5):
        return "the probe kernel's result differs from torch's"
    return None
