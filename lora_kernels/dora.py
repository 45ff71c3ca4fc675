"""DoRA's layer-level pieces: merge and unmerge in place (W ← g ⊙ (W0 + s·BA) with g = m / ‖W0 + s·BA‖, and back),
and the cache of row norms a layer reuses between forwards.

    merged = dora_merge_(weight, lora_A, lora_B, magnitude, scaling, safe=False, exact=False)
    dora_unmerge_(weight, lora_A, lora_B, scaling, merged)
    cache = DoRANormCache(); cache.norm(weight, lora_A, lora_B, scaling)

A block of rows at a time, in float32 (float64 for float64 weights), one rounding per element: temporaries stay
near 2**20 elements whatever the weight's size. The gain g used is kept in the returned DoRAMerge (a merged weight
no longer tells it), so that unmerge computes W0 = W / g − s·BA; with exact=True the DoRAMerge also remembers
the elements whose round trip is inexact (a MergeRecord) and unmerge restores W0 bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import validation
from .functional import dora_weight_norm
from .merge_record import InexactElements, MergeRecord
from .weight4bit import Weight4bit
from .ops.dora_linear import _row_blocks, dora_weight_norm_op, norm_dtype, row_sq_norms


@dataclass
class DoRAMerge:
    """What dora_merge_ returns and dora_unmerge_ needs: the gain g [out] that was applied (norm dtype) and, for
    an exact merge, the record of elements to restore."""

    gain: Tensor
    record: MergeRecord | None = None


def _check(weight, lora_A, lora_B, scaling) -> float:
    scaling = validation.check_merge_args(weight, lora_A, lora_B, scaling)
    validation.check_no_shared_elements("weight", weight)
    return scaling


@torch.no_grad()
def dora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                safe: bool = False, exact: bool = False) -> DoRAMerge:
    """weight ← g ⊙ (weight + s · lora_B @ lora_A), g = magnitude / ‖weight + s·BA‖ per row; in place.

    weight [out, in], lora_A [r, in], lora_B [out, r], magnitude [out]. A gain that is zero or not finite
    (a zero magnitude or norm) is refused: the merged rows could not be unmerged. safe=True: raise
    RuntimeError, weight untouched, if any merged value would be NaN/Inf. exact=True: the returned DoRAMerge
    lets dora_unmerge_ restore the weight bit for bit (it records the elements whose round trip is inexact,
    typically most of them: a DoRA merge rescales every element).
    """
    scaling = _check(weight, lora_A, lora_B, scaling)
    validation.check_magnitude(magnitude, weight, lora_A.dtype)
    lora_A, lora_B = validation.unaliased(lora_A, weight), validation.unaliased(lora_B, weight)
    magnitude = validation.unaliased(magnitude, weight)
    norm = dora_weight_norm_op(weight, lora_A, lora_B, scaling, None)
    gain = magnitude.to(norm.dtype) / norm
    bad = ~torch.isfinite(gain) | (gain == 0)
    if bool(bad.any()):
        raise ValueError(f"dora_merge_: the gain magnitude / ‖W0 + s·BA‖ is zero or not finite in "
                         f"{int(bad.sum())} rows (first: {int(bad.nonzero()[0])}); such rows cannot be unmerged, "
                         "nothing was changed")
    A, sB = lora_A.to(gain.dtype), lora_B.to(gain.dtype) * scaling
    blocks = _row_blocks(weight)
    if safe:  # every block is checked before any is written
        for rows in blocks:
            merged = ((weight[rows].to(gain.dtype) + sB[rows] @ A) * gain[rows, None]).to(weight.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise RuntimeError("dora_merge_(safe=True): the merged weight would have NaN/Inf values; "
                                   "nothing was changed")
    inexact = InexactElements(weight) if exact else None
    for rows in blocks:
        original = weight[rows].clone() if exact else None
        weight[rows] = ((weight[rows].to(gain.dtype) + sB[rows] @ A) * gain[rows, None]).to(weight.dtype)
        if exact:
            inexact.add(rows.start, original, _unmerged_rows(weight[rows], A, sB[rows], gain[rows]))
    return DoRAMerge(gain, inexact.record() if exact else None)


def _unmerged_rows(block: Tensor, A: Tensor, sB_rows: Tensor, gain_rows: Tensor) -> Tensor:
    """W0 rows = W / g − s·B A, rounded once to the block's dtype."""
    return (block.to(gain_rows.dtype) / gain_rows[:, None] - sB_rows @ A).to(block.dtype)


@torch.no_grad()
def dora_unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, merged: DoRAMerge) -> None:
    """weight ← weight / g − s · lora_B @ lora_A in place, with the gain g of dora_merge_'s DoRAMerge; with an
    exact merge's record, the original weight bit for bit."""
    scaling = _check(weight, lora_A, lora_B, scaling)
    if not isinstance(merged, DoRAMerge):
        raise TypeError(f"merged must be the DoRAMerge dora_merge_ returned, got {type(merged).__name__}")
    if merged.gain.shape != (weight.shape[0],) or merged.gain.device != weight.device:
        raise ValueError(f"merged was made for a weight of {merged.gain.shape[0]} rows on {merged.gain.device}, "
                         f"got {tuple(weight.shape)} on {weight.device}")
    lora_A, lora_B = validation.unaliased(lora_A, weight), validation.unaliased(lora_B, weight)
    gain = merged.gain
    A, sB = lora_A.to(gain.dtype), lora_B.to(gain.dtype) * scaling
    for rows in _row_blocks(weight):
        weight[rows] = _unmerged_rows(weight[rows], A, sB[rows], gain[rows])
    if merged.record is not None:
        merged.record.restore_(weight)


class DoRANormCache:
    """The row norms a DoRA layer reuses: ‖W0_o‖² while W0 is unchanged, and the norm ‖W0 + s·BA‖ itself while W0,
    A, B and s are: every forward in eval, and in training every forward between two optimizer steps (gradient
    accumulation, activation checkpointing's recomputed forward); a step changes A and B, and the next forward
    recomputes the adapter's terms (W0 Aᵀ: one more read of W0). A tensor counts as unchanged while its data
    pointer, version counter, dtype, device and shape are: in-place updates (an optimizer step, load_state_dict,
    merge) are seen; a write through ``.data`` is not (clear() after one)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._sq_norm = (None, None)
        self._norm = (None, None)

    @staticmethod
    def _state_of(*tensors) -> tuple:
        """Of tensors, or of a Weight4bit's codes and scales."""
        state = []
        for t in tensors:
            parts = [p for p in t.kernel_args()[:6] if p is not None] if isinstance(t, Weight4bit) else [t]
            state += [(p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in parts]
        return tuple(state)

    def norm(self, weight: Tensor | Weight4bit, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor | None:
        """‖W0 + s·BA‖ per row for this forward (W0 a tensor or a Weight4bit), or None under torch.compile (the op
        then computes it in the graph: reading version counters there would break it)."""
        if torch.compiler.is_compiling():
            return None
        key = self._state_of(weight, lora_A, lora_B) + (float(scaling),)
        if self._norm[0] == key:
            return self._norm[1]
        weight_key = self._state_of(weight)
        if self._sq_norm[0] != weight_key:
            with torch.no_grad():
                self._sq_norm = (weight_key, row_sq_norms(weight, norm_dtype(weight, lora_A)))
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling, self._sq_norm[1])
        self._norm = (key, norm)
        return norm
