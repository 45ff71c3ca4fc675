"""Pure-PyTorch specification of every op in lora_kernels.

This module is the oracle: tests and benchmarks compare every backend against
it, and it doubles as the ``reference`` backend. It favours clarity over speed
and works in any floating dtype, float64 included.

Notation: x [M, in], weight W0 [out, in], bias [out], lora_A [r, in],
lora_B [out, r], scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA).

Dropout masks come from a counter-based generator (Philox-4x32-10, the
generator behind ``tl.rand``): element (m, k) of the [M, in] mask is decided by
``philox(seed, m * in + k)``, so every backend, forward or backward, on any
device and with any blocking, regenerates exactly the same mask from the seed.
"""

from __future__ import annotations

import torch

__all__ = [
    "PHILOX_ROUNDS",
    "philox_uint32",
    "dropout_threshold",
    "dropout_mask",
    "lora_linear",
    "lora_linear_backward",
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


def philox_uint32(seed: int, offsets: torch.Tensor, rounds: int = PHILOX_ROUNDS) -> torch.Tensor:
    """First output word of Philox-4x32 for counter (offset_lo, offset_hi, 0, 0), key = seed.

    offsets: int64 tensor of any shape. Returns an int64 tensor holding uint32 values.
    Bit-identical to triton's ``tl.randint(seed, offsets)`` with int64 offsets and to
    the C++/CUDA implementation in csrc/philox.h.
    """
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """Integer threshold t = round(p * 2**32): an element is dropped iff its uint32 draw is < t."""
    return min(int(p * 2.0**32 + 0.5), 2**32)


def dropout_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Keep-mask [rows, cols] (bool) of the dropout applied to x before lora_A."""
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return philox_uint32(seed, offsets) >= dropout_threshold(p)


def _dropped(x: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor:
    """drop(x) = x * mask / (1 - p) for x [M, in]; x itself when dropout is off."""
    if dropout_p == 0.0 or seed is None:
        return x
    keep = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    return x * keep.to(x.dtype) / (1.0 - dropout_p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    """y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ, and xa = drop(x) Aᵀ (what the backward saves).

    x [M, in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r].
    Dropout is applied when dropout_p > 0 and a seed is given. Returns (y [M, out], xa [M, r]).
    """
    xa = _dropped(x, dropout_p, seed) @ lora_A.t()
    y = x @ weight.t() + (scaling * xa) @ lora_B.t()
    if bias is not None:
        y = y + bias
    return y, xa


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p=0.0, seed=None):
    """Gradients of lora_linear for a frozen weight: returns (dx [M, in], dA [r, in], dB [out, r]).

        gb = dy B                 (M × r)
        dx = dy W0 + s · (gb A) ⊙ mask / (1 - p)
        dA = s · gbᵀ drop(x)
        dB = s · dyᵀ xa
    """
    gb = grad_y @ lora_B
    dx = grad_y @ weight + _dropped(scaling * (gb @ lora_A), dropout_p, seed)
    d_lora_A = scaling * (gb.t() @ _dropped(x, dropout_p, seed))
    d_lora_B = scaling * (grad_y.t() @ xa)
    return dx, d_lora_A, d_lora_B


def merge(weight, lora_A, lora_B, scaling):
    """W0 + s · B A, computed in float64 and returned in weight's dtype (not in place)."""
    delta = scaling * (lora_B.double() @ lora_A.double())
    return (weight.double() + delta).to(weight.dtype)
