"""Triton helpers shared by the kernel files: autotune configs, the dropout mask, and the
interpreter work-arounds. Kernels import from here, never from each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted as interpreted
from ..reference import dropout_threshold  # the mask rule is defined once, by the spec


def configs(full: list[tuple[dict, int, int]], small: dict) -> list[triton.Config]:
    """triton.Configs from (tile sizes, num_warps, num_stages); `small` alone under the interpreter."""
    if interpreted():  # the interpreter is slow: one small config, no tuning
        return [triton.Config(small, num_warps=4, num_stages=1)]
    return [triton.Config(tiles, num_warps=warps, num_stages=stages) for tiles, warps, stages in full]


@triton.jit
def keep_mask(seed, rows, cols, row_len, threshold):
    """Dropout keep-mask of elements (rows[:, None], cols[None, :]) of a [*, row_len] tensor."""
    offsets = rows.to(tl.int64)[:, None] * row_len + cols.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, offsets >> 3)  # one call serves 8 elements (see reference.py)
    word_index = (offsets >> 1) & 3
    word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
    draws = ((word.to(tl.int64) & 0xFFFFFFFF) >> ((offsets & 1) * 16)) & 0xFFFF
    return draws >= threshold


# Triton's interpreter mishandles bfloat16 in two places: tl.dot multiplies the
# raw uint16 bits, and float32 -> bfloat16 casts truncate. Kernels take a
# constexpr SOFT_BF16, set only when interpreting bfloat16, that routes around
# both: dots on float32 copies (bf16 products are exact in fp32) and a
# round-to-nearest-even done on the bits before the cast. On a GPU it is off.


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """acc + a @ b, float32 accumulation."""
    if SOFT_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x rounded to nearest-even into dtype."""
    if SOFT_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots, as torch.mm gives by default (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def soft_bf16(dtype: torch.dtype) -> bool:
    return interpreted() and dtype == torch.bfloat16


def dropout_args(p: float) -> tuple[int, float]:
    """(threshold, 1/(1-p)) for dropout probability p (p = 0: nothing dropped)."""
    return dropout_threshold(p), 1.0 / (1.0 - p)
