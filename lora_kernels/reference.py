"""Pure-PyTorch specification of every op in lora_kernels.

This module is the oracle: tests and benchmarks compare every backend against
it, and it doubles as the ``reference`` backend. It favours clarity over speed
and works in any floating dtype, float64 included.

Notation: x [M, in], weight W0 [out, in], bias [out], lora_A [r, in],
lora_B [out, r], scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA).

Dropout masks come from a counter-based generator (Philox-4x32-10, the
generator behind ``tl.randint4x``). Element e = m * in + k of the [M, in] mask
gets a 16-bit draw: one Philox call on counter e // 8 yields 128 bits, which
serve the 8 elements of that group (word (e // 2) % 4, half e % 2); the element
is dropped iff its draw is below round(p * 2**16). So every backend, forward or
backward, on any device and with any blocking, regenerates exactly the same
mask from the seed, and the CPU pays one Philox call per 8 elements.
"""

from __future__ import annotations

import torch

__all__ = [
    "PHILOX_ROUNDS",
    "philox4x32",
    "dropout_draws",
    "dropout_threshold",
    "dropout_mask",
    "accumulation_dtype",
    "lora_linear",
    "lora_linear_backward",
    "dora_weight_norm",
    "dora_linear",
    "dora_merge",
    "lora_linear_multi",
    "lora_linear_multi_backward",
    "merge_",
    "merge",
]

PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a constant a and uint32 values b (int64 tensor).

    The 64-bit product does not fit an int64, so b is split into 16-bit halves.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def philox4x32(seed: int, counters: torch.Tensor, rounds: int = PHILOX_ROUNDS):
    """The four output words of Philox-4x32 for counter (lo32, hi32, 0, 0) and key = seed.

    counters: int64 tensor of any shape. Returns four int64 tensors holding uint32
    values, bit-identical to triton's ``tl.randint4x(seed, counters)`` with int64
    counters and to ``philox4x32_10`` in csrc/philox.h.
    """
    counters = counters.to(torch.int64)
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_draws(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """16-bit draws (int64 tensor) of the elements at flat `offsets` (see the module docstring)."""
    words = torch.stack(philox4x32(seed, offsets >> 3))
    word = torch.gather(words, 0, ((offsets >> 1) & 3).unsqueeze(0)).squeeze(0)
    return (word >> ((offsets & 1) * 16)) & 0xFFFF


def dropout_threshold(p: float) -> int:
    """Integer threshold t = round(p * 2**16): an element is dropped iff its 16-bit draw is < t."""
    return min(int(p * 65536.0 + 0.5), 65536)


def dropout_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Keep-mask [rows, cols] (bool) of the dropout applied to x before lora_A."""
    return _keep_rows(seed, torch.arange(rows, device=device), cols, p)


def _keep_rows(seed: int, rows: torch.Tensor, cols: int, p: float) -> torch.Tensor:
    """Keep-mask [len(rows), cols] of the given rows of a [*, cols] tensor's mask (element m·cols + k)."""
    offsets = rows.to(torch.int64)[:, None] * cols + torch.arange(cols, dtype=torch.int64, device=rows.device)
    return dropout_draws(seed, offsets) >= dropout_threshold(p)


def _dropped_rows(x_rows: torch.Tensor, rows: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor:
    """drop(x) for some rows of a batch x [M, in]: x_rows = x[rows], with the batch's mask (element m·in + k)."""
    if dropout_p == 0.0 or seed is None:
        return x_rows
    keep = _keep_rows(seed, rows, x_rows.shape[1], dropout_p)
    return x_rows * keep.to(x_rows.dtype) / (1.0 - dropout_p)


def _dropped(x: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor:
    """drop(x) = x * mask / (1 - p) for x [M, in]; x itself when dropout is off."""
    return _dropped_rows(x, torch.arange(x.shape[0], device=x.device), dropout_p, seed)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the LoRA branch's intermediates live: float32 for float16/bfloat16 inputs.

    s·xa and dy B can leave float16's range (or sink into its subnormals) long
    before the result does, so they are never rounded to a 16-bit type.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    """y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ, and xa = drop(x) Aᵀ (what the backward saves).

    x [M, in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r].
    Dropout is applied when dropout_p > 0 and a seed is given. Returns (y [M, out], xa [M, r]).

    Order of rounding (the spec every backend follows): xa is rounded to the
    adapter's dtype (it is an output); s · xa Bᵀ is computed in accumulation_dtype
    and added to the base x W0ᵀ + b (rounded to x's dtype by its GEMM) before the
    final rounding, so a large scaling cannot overflow a float16 intermediate.

    Mixed precision: lora_A and lora_B may be float32 when x, weight and bias are
    float16/bfloat16 (PEFT's default for 16-bit models). The LoRA branch is then
    computed from x widened to float32 (exact) and the float32 A and B: xa is
    float32, and the gradients of A and B come back in float32.
    """
    acc = accumulation_dtype(x.dtype)
    xa = _dropped(x.to(lora_A.dtype), dropout_p, seed) @ lora_A.t()
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    y = (y.to(acc) + scaling * (xa.to(acc) @ lora_B.to(acc).t())).to(x.dtype)
    return y, xa


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p=0.0, seed=None):
    """Gradients of lora_linear for a frozen weight: returns (dx [M, in], dA [r, in], dB [out, r]).

        gb = dy B                 (M × r)
        dx = dy W0 + s · (gb A) ⊙ mask / (1 - p)
        dA = s · gbᵀ drop(x)
        dB = s · dyᵀ xa

    gb and every LoRA product are kept in accumulation_dtype (float32 for 16-bit
    inputs) and each gradient is rounded once at the end: dx to x's dtype, dA and
    dB to the adapter's (float32 for float32 adapters on a 16-bit x).
    """
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    grad_y_acc = grad_y.to(acc)
    gb = grad_y_acc @ lora_B.to(acc)
    dx = ((grad_y @ weight).to(acc) + _dropped(scaling * (gb @ lora_A.to(acc)), dropout_p, seed)).to(dtype)
    d_lora_A = (scaling * (gb.t() @ _dropped(x.to(acc), dropout_p, seed))).to(lora_A.dtype)
    d_lora_B = (scaling * (grad_y_acc.t() @ xa.to(acc))).to(lora_B.dtype)
    return dx, d_lora_A, d_lora_B


# ---- DoRA (weight-decomposed LoRA, PEFT's use_dora=True)

def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """n = ‖W0 + s · B A‖ of every output row [out], as PEFT computes it: from the dense W0 + s·BA, in the dtype
    W0 and the adapter promote to. No gradient (DoRA detaches the norm: the paper's §4.3 and PEFT)."""
    with torch.no_grad():
        return _dense_row_norm(weight, lora_A, lora_B, scaling)


def _dense_row_norm(weight, lora_A, lora_B, scaling):
    return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, seed=None, weight_norm=None,
                norm_gradient=False):
    """DoRA: y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s · (x̃ Aᵀ) Bᵀ, with g = m / ‖W0 + s·BA‖ (per output row)
    and x̃ = drop(x); without dropout y = g ⊙ (x W0ᵀ + s · x Aᵀ Bᵀ) + b.

    x [M, in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r], magnitude m [out] (the
    adapter's dtype). weight_norm: n [out] if already known (else dora_weight_norm). Computed as PEFT's DoRA layer
    does, term by term, in the dtype x and the adapter promote to, rounded to x's dtype at the end; differentiable
    by autograd (the norm a constant; norm_gradient=True: the norm too, differentiated in A, B and W0, and
    weight_norm is not used). Returns y [M, out].
    """
    if norm_gradient:
        norm = _dense_row_norm(weight, lora_A, lora_B, scaling)
    else:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling) if weight_norm is None else weight_norm
    gain = magnitude / norm
    base = x @ weight.t()
    x_dropped = _dropped(x, dropout_p, seed)
    dropped_base = base if x_dropped is x else x_dropped @ weight.t()
    lora = (x_dropped.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()
    y = base + (gain - 1) * dropped_base + gain * scaling * lora
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def dora_merge(weight, lora_A, lora_B, magnitude, scaling):
    """g ⊙ (W0 + s · B A) with g = m / ‖W0 + s·BA‖ (rows): the merged DoRA weight, computed in float64 and rounded
    once to weight's dtype (not in place)."""
    merged = weight.double() + scaling * (lora_B.double() @ lora_A.double())
    gain = magnitude.double() / torch.linalg.norm(merged, dim=1)
    return (gain[:, None] * merged).to(weight.dtype)


# ---- 4-bit base weights (bitsandbytes' layout: lora_kernels/weight4bit.py)

NESTED_BLOCKSIZE = 256  # bitsandbytes' block of scales under double quantization


def block_scales(absmax, nested_absmax=None, nested_code=None, offset=None):
    """The float32 scale of every block: absmax itself, or, double quantized, nested_code[absmax] ·
    nested_absmax[b // 256] + offset (two float32 roundings, as bitsandbytes decodes it)."""
    if nested_absmax is None:
        return absmax
    per_block = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:absmax.numel()]
    return nested_code[absmax.long()] * per_block + offset


def dequantize_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, in_features,
                    blocksize, dtype):
    """The weight [out, in] in `dtype`: element e (of the row-major flattened weight) is
    code_table[nibble e] · scale[e // blocksize] in float32, one rounding, then rounded to dtype; nibble e is the
    high half of byte e // 2 for even e (bitsandbytes' dequantize_4bit)."""
    n = out_features * in_features
    scales = block_scales(absmax, nested_absmax, nested_code, offset)
    nibbles = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1)[:n].long()
    per_element = scales.repeat_interleave(blocksize)[:n]
    return (code_table[nibbles] * per_element).to(dtype).view(out_features, in_features)


def lora_linear_4bit(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize,
                     bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    """lora_linear with a 4-bit base: W0 = dequantize_4bit(..., x.dtype), then lora_linear's formula and rounding."""
    weight = dequantize_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, x.shape[1],
                             blocksize, x.dtype)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def lora_linear_4bit_backward(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                              blocksize, lora_A, lora_B, xa, scaling, dropout_p=0.0, seed=None):
    """lora_linear_backward with the 4-bit base dequantized in x's dtype: (dx, dA, dB)."""
    weight = dequantize_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, x.shape[1],
                             blocksize, x.dtype)
    return lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed)


def _adapter_rows(adapter_ids: torch.Tensor, n: int):
    """(adapter, row indices) for every adapter that has rows in the batch (ids of -1: no adapter)."""
    for a in range(n):
        rows = (adapter_ids == a).nonzero().flatten()
        if rows.numel():
            yield a, rows


def _adapter_dropouts(dropout_p, n: int) -> list[float]:
    """Each adapter's dropout probability: one float for all, or a sequence / tensor [n]."""
    if isinstance(dropout_p, (int, float)):
        return [float(dropout_p)] * n
    return [float(p) for p in (dropout_p.tolist() if isinstance(dropout_p, torch.Tensor) else dropout_p)]


def _ranks(lora_A: torch.Tensor, ranks) -> list[int]:
    n, r_max = lora_A.shape[:2]
    return [r_max] * n if ranks is None else [int(r) for r in ranks.tolist()]


def lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks=None, dropout_p=0.0, seed=None):
    """Many adapters in one batch: row m uses adapter a = adapter_ids[m] (none when -1).

        y[m]  = x[m] W0ᵀ + b + s_a · (drop(x)[m] A_a[:r_a]ᵀ) B_a[:, :r_a]ᵀ
        xa[m] = drop(x)[m] A_a[:r_a]ᵀ in its first r_a columns, zeros after (and for rows of -1)

    x [M, in], weight [out, in], bias [out] or None, lora_A [n, r_max, in], lora_B [n, out, r_max],
    scalings [n] (s_a), adapter_ids [M] integers in [-1, n), ranks [n] integers in [1, r_max] or None
    (all r_max): adapter a reads only A_a's first r_a rows and B_a's first r_a columns. dropout_p: one
    probability, or one per adapter ([n]); row m of adapter a is dropped with p_a by lora_linear's rule
    (element m·in + k of x, 16-bit draw below round(p_a·2¹⁶), from the same seed). Rounding as
    lora_linear. Returns (y [M, out], xa [M, r_max]).
    """
    acc = accumulation_dtype(x.dtype)
    n, r_max = lora_A.shape[:2]
    rank_of = _ranks(lora_A, ranks)
    p_of = _adapter_dropouts(dropout_p, n)
    xa = torch.zeros(x.shape[0], r_max, dtype=lora_A.dtype, device=x.device)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    y = y.to(acc)
    for a, rows in _adapter_rows(adapter_ids, n):
        r = rank_of[a]
        xa_rows = _dropped_rows(x[rows].to(lora_A.dtype), rows, p_of[a], seed) @ lora_A[a, :r].t()
        xa[rows, :r] = xa_rows
        y[rows] = y[rows] + float(scalings[a]) * (xa_rows.to(acc) @ lora_B[a, :, :r].to(acc).t())
    return y.to(x.dtype), xa


def lora_linear_multi_backward(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks=None,
                               dropout_p=0.0, seed=None):
    """Gradients of lora_linear_multi for a frozen weight: (dx [M, in], dA [n, r_max, in], dB [n, out, r_max]).

    Per adapter a over its rows (lora_linear_backward's formulas): dA_a[:r_a] = s_a · gbᵀ drop(x),
    dB_a[:, :r_a] = s_a · dyᵀ xa, dx = dy W0 + s_a · (gb A_a) ⊙ mask / (1 - p) with gb = dy B_a.
    Adapters without rows, and the ranks past r_a, get zero gradients.
    """
    acc = accumulation_dtype(x.dtype)
    n, r_max = lora_A.shape[:2]
    rank_of = _ranks(lora_A, ranks)
    p_of = _adapter_dropouts(dropout_p, n)
    d_lora_A = torch.zeros(lora_A.shape, dtype=acc, device=x.device)
    d_lora_B = torch.zeros(lora_B.shape, dtype=acc, device=x.device)
    lora_dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_y_acc = grad_y.to(acc)
    for a, rows in _adapter_rows(adapter_ids, n):
        r, s = rank_of[a], float(scalings[a])
        gb = grad_y_acc[rows] @ lora_B[a, :, :r].to(acc)
        d_lora_A[a, :r] = s * (gb.t() @ _dropped_rows(x[rows].to(acc), rows, p_of[a], seed))
        d_lora_B[a, :, :r] = s * (grad_y_acc[rows].t() @ xa[rows, :r].to(acc))
        lora_dx[rows] = _dropped_rows(s * (gb @ lora_A[a, :r].to(acc)), rows, p_of[a], seed)
    dx = ((grad_y @ weight).to(acc) + lora_dx).to(x.dtype)
    return dx, d_lora_A.to(lora_A.dtype), d_lora_B.to(lora_B.dtype)


def merge_(weight, lora_A, lora_B, scaling, sub_A=None, sub_B=None, sub_scaling=0.0, check_only=False) -> int:
    """weight = round(weight + s · B A − s' · B' A') in place, each element computed in float64 and
    rounded once; returns the number of non-finite results (with check_only, nothing is written).

    weight [out, in], lora_A [r, in], lora_B [out, r]; the subtracted adapter (sub_A [r', in],
    sub_B [out, r'], s') is optional. Works on blocks of rows, so that its float64 temporaries stay
    near 2**20 elements whatever the weight's size.
    """
    rows_per_block = max(1, _MERGE_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    A64 = lora_A.double()
    sub_A64 = sub_A.double() if sub_A is not None else None
    nonfinite = 0
    for r0 in range(0, weight.shape[0], rows_per_block):
        rows = slice(r0, r0 + rows_per_block)
        change = scaling * (lora_B[rows].double() @ A64)
        if sub_A64 is not None:
            change = change - sub_scaling * (sub_B[rows].double() @ sub_A64)
        merged = (weight[rows].double() + change).to(weight.dtype)  # overflow shows up here
        if check_only:
            nonfinite += int((~torch.isfinite(merged)).sum())
        else:
            weight[rows] = merged
    return nonfinite


_MERGE_BLOCK_ELEMENTS = 1 << 20


def merge(weight, lora_A, lora_B, scaling):
    """W0 + s · B A, computed in float64 and returned in weight's dtype (not in place)."""
    merged = weight.clone()
    merge_(merged, lora_A, lora_B, scaling)
    return merged
