"""In-place merge of a LoRA adapter into its base weight, as a torch.library custom op.

    lora_kernels::merge_(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, safe)

weight [out, in] becomes round(weight + scaling · lora_B lora_A − sub_scaling · sub_B sub_A),
each product accumulated in float32 (float64 for float64 weights) tile by tile
and rounded once into weight's dtype: no [out, in] temporary. The subtracted
adapter (sub_A [r', in], sub_B [out, r']) is optional: unmerge is merge with
-scaling, switching adapters is one pass with both. Because each element's sum
runs in a fixed order, unmerge subtracts exactly what merge added, so repeated
merge/unmerge cycles do not drift.

With safe=True the merged values are computed once without writing, and if any
is not finite a RuntimeError is raised with weight untouched.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import select_backend

# Rows per chunk of the pure-PyTorch (reference backend) merge: bounds its float64
# temporaries to ~ROWS * in elements whatever the weight's size.
_REFERENCE_CHUNK_ELEMENTS = 1 << 20


def _reference_merge_(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only) -> int:
    """Chunked float64 merge in plain PyTorch; returns the count of non-finite results."""
    rows_per_chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    A64 = lora_A.double()
    sub_A64 = sub_A.double() if sub_A is not None else None
    nonfinite = 0
    for r0 in range(0, weight.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        change = scaling * (lora_B[rows].double() @ A64)
        if sub_A64 is not None:
            change = change - sub_scaling * (sub_B[rows].double() @ sub_A64)
        merged = (weight[rows].double() + change).to(weight.dtype)  # overflow shows up here
        if check_only:
            nonfinite += int((~torch.isfinite(merged)).sum())
        else:
            weight[rows] = merged
    return nonfinite


def _run_merge(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only) -> int:
    backend = select_backend(weight.device)
    if backend in ("cpu", "cuda"):
        return torch.ops.lora_kernels.merge_kernel_(
            weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only
        )
    if backend == "triton":
        from . import triton_merge

        return triton_merge.merge_(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only)
    return _reference_merge_(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only)


def _raise_if_not_finite(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling) -> None:
    """The check of safe=True: computes every merged value, writes nothing."""
    nonfinite = _run_merge(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, True)
    if nonfinite:
        raise RuntimeError(
            f"lora_kernels: merge would make {nonfinite} element(s) of weight non-finite "
            "(NaN/Inf in lora_A, lora_B or weight, or overflow); weight was left unchanged"
        )


@torch.library.custom_op("lora_kernels::merge_", mutates_args=("weight",))
def merge_op(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    sub_A: Optional[Tensor],
    sub_B: Optional[Tensor],
    sub_scaling: float,
    safe: bool,
) -> None:
    if safe:
        _raise_if_not_finite(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling)
    _run_merge(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, False)


@merge_op.register_fake
def _(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, safe):
    return None


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


def merge_exact_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, safe: bool) -> MergeRecord:
    """merge_ that also returns the MergeRecord of elements whose round trip is inexact.

    Works a block of rows at a time: the block is merged in place, a copy of it is
    unmerged with the same kernel (which gives every element the same value it
    gives in a whole-weight call), and the elements that do not come back are
    recorded. Temporaries are two blocks of rows, whatever the weight's size.
    """
    if safe:
        _raise_if_not_finite(weight, lora_A, lora_B, scaling, None, None, 0.0)
    out_features, in_features = weight.shape
    rows_per_block = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, in_features))
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    indices, values = [], []
    for r0 in range(0, out_features, rows_per_block):
        block = weight[r0 : r0 + rows_per_block]
        original = block.clone()
        merge_op(block, lora_A, lora_B[r0 : r0 + rows_per_block], scaling, None, None, 0.0, False)
        round_trip = block.clone()
        merge_op(round_trip, lora_A, lora_B[r0 : r0 + rows_per_block], -scaling, None, None, 0.0, False)
        rows, cols = torch.nonzero(_bits(round_trip) != _bits(original), as_tuple=True)
        indices.append(((rows + r0) * in_features + cols).to(index_dtype))
        values.append(original[rows, cols])
    empty_index = torch.empty(0, dtype=index_dtype, device=weight.device)
    return MergeRecord(
        weight.shape,
        torch.cat(indices) if indices else empty_index,
        torch.cat(values) if values else weight.new_empty(0),
    )
