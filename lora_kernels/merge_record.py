"""Bit-exact merge: merge_ that remembers, compactly, how to restore the weight exactly.

Built on the merge op (ops/merge.py); MergeRecord is what merge_(..., exact=True) returns and
unmerge_(..., record=...) consumes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops.merge import merge_op, raise_if_not_finite

# Rows per block of the exact merge: its temporaries stay near this many elements.
_BLOCK_ELEMENTS = 1 << 20


class MergeRecord:
    """What an exact merge remembers so that unmerge restores the weight bit for bit.

    Only the elements whose merge/unmerge round trip is not exact are kept: their
    flat indices (int32, or int64 for weights of 2**31 elements or more) and
    original values. `nbytes` / `relative_size` give its memory cost.
    """

    def __init__(self, shape: torch.Size, indices: Tensor, values: Tensor):
        self.shape = torch.Size(shape)
        self.indices = indices
        self.values = values

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()

    @property
    def relative_size(self) -> float:
        """Bytes of the record over bytes of the weight."""
        numel = self.shape.numel()
        return self.nbytes / (numel * self.values.element_size()) if numel else 0.0

    def restore_(self, weight: Tensor) -> None:
        """Write the remembered original values back into weight."""
        if self.indices.numel() == 0:
            return
        flat = self.indices.long()
        weight[flat // self.shape[1], flat % self.shape[1]] = self.values

    def __repr__(self) -> str:
        return (
            f"MergeRecord(shape={tuple(self.shape)}, elements={self.indices.numel()}, "
            f"nbytes={self.nbytes}, relative_size={self.relative_size:.4f})"
        )


def _bits(t: Tensor) -> Tensor:
    """t's bit pattern as integers, so that comparisons are exact (NaN and -0.0 included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class InexactElements:
    """The elements of a weight whose merge/unmerge round trip is not exact, gathered a block of rows at a time
    (add), then as the weight's MergeRecord (record)."""

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
        self.indices: list[Tensor] = []
        self.values: list[Tensor] = []

    def add(self, r0: int, original: Tensor, round_trip: Tensor) -> None:
        """Rows r0 .. of the weight: `original` before the merge, `round_trip` after merge and unmerge."""
        rows, cols = torch.nonzero(_bits(round_trip) != _bits(original), as_tuple=True)
        self.indices.append(((rows + r0) * self.weight.shape[1] + cols).to(self.index_dtype))
        self.values.append(original[rows, cols])

    def record(self) -> MergeRecord:
        weight = self.weight
        empty_index = torch.empty(0, dtype=self.index_dtype, device=weight.device)
        return MergeRecord(weight.shape, torch.cat(self.indices) if self.indices else empty_index,
                           torch.cat(self.values) if self.values else weight.new_empty(0))


def merge_exact_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, safe: bool) -> MergeRecord:
    """merge_ that also returns the MergeRecord of elements whose round trip is inexact.

    Works a block of rows at a time: the block is merged in place, a copy of it is
    unmerged with the same kernel (which gives every element the same value it
    gives in a whole-weight call), and the elements that do not come back are
    recorded. Temporaries are two blocks of rows, whatever the weight's size.
    """
    if safe:  # the whole weight is checked before any block is written
        raise_if_not_finite(weight, lora_A, lora_B, scaling)
    out_features, in_features = weight.shape
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, in_features))
    inexact = InexactElements(weight)
    for r0 in range(0, out_features, rows_per_block):
        block = weight[r0 : r0 + rows_per_block]
        original = block.clone()
        merge_op(block, lora_A, lora_B[r0 : r0 + rows_per_block], scaling, None, None, 0.0, False)
        round_trip = block.clone()
        merge_op(round_trip, lora_A, lora_B[r0 : r0 + rows_per_block], -scaling, None, None, 0.0, False)
        inexact.add(r0, original, round_trip)
    return inexact.record()
