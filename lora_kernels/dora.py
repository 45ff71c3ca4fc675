"""DoRA's layer-level pieces: merge and unmerge in place (W ← g ⊙ (W0 + s·BA) with g = m / ‖W0 + s·BA‖, and back),
and the cache of row norms a layer reuses between forwards.

    merged = dora_merge_(weight, lora_A, lora_B, magnitude, scaling, safe=False, exact=False)
    dora_unmerge_(weight, lora_A, lora_B, scaling, merged)
    cache = DoRANormCache(); cache.norm(weight, lora_A, lora_B, scaling)
    y = cached_dora_linear(cache, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training)

A block of rows at a time, in float32 (float64 for float64 weights), one rounding per element: temporaries stay
near 2**20 elements whatever the weight's size. The gain g used is kept in the returned DoRAMerge (a merged weight
no longer tells it), so that unmerge computes W0 = W / g − s·BA; with exact=True the DoRAMerge also remembers
the elements whose round trip is inexact (a MergeRecord) and unmerge restores W0 bit for bit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from . import validation
from .functional import dora_linear, dora_linear_inference, dora_weight_norm
from .merge_record import InexactElements, MergeRecord
from .weight4bit import Weight4bit
from .ops.dora_linear import _gain, _row_blocks, dora_weight_norm_op, norm_dtype, row_sq_norms


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
    """The row norms a DoRA layer reuses: ‖W0_o‖² while W0 is unchanged, the norm ‖W0 + s·BA‖ itself while W0, A, B
    and s are (every forward in eval, and in training every forward between two optimizer steps: gradient
    accumulation, activation checkpointing's recomputed forward; a step changes A and B, and the next forward
    recomputes the adapter's terms, W0 Aᵀ: one more read of W0), and the gain g = m / ‖W0 + s·BA‖ while m is
    unchanged too (forwards without gradient). A tensor counts as unchanged while it is the same tensor (the same
    object, or a view of it: held weakly, so that a tensor freed and another allocated at its address, with the
    same version counter, is not taken for it) with the same data pointer and version counter: in-place updates
    (an optimizer step, load_state_dict, merge) and replaced parameters are seen; a write through ``.data`` is not
    (clear() after one)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._kept: dict[str, tuple] = {}  # "sq_norm", "norm", "gain" -> (weak refs, state, value)

    @staticmethod
    def _parts(*tensors) -> list[Tensor]:
        """The tensors a value depends on: each tensor, or a Weight4bit's codes and scales."""
        parts = []
        for t in tensors:
            if isinstance(t, Weight4bit):
                parts += [p for p in t.kernel_args()[:6] if p is not None]
            else:
                parts.append(t)
        return parts

    def _get(self, name: str, parts: list[Tensor], scaling: float | None = None) -> tuple:
        """(the value kept under name if computed from these very tensors, unchanged, else None; their state)."""
        state = [scaling]
        for p in parts:
            state += (p.data_ptr(), p._version)
        state = tuple(state)
        kept = self._kept.get(name)
        if kept is None or kept[1] != state:
            return None, state
        for ref, p in zip(kept[0], parts):
            if ref() is not (p if p._base is None else p._base):
                return None, state
        return kept[2], state

    def _put(self, name: str, parts: list[Tensor], state: tuple, value: Tensor) -> Tensor:
        self._kept[name] = ([weakref.ref(p if p._base is None else p._base) for p in parts], state, value)
        return value

    def norm(self, weight: Tensor | Weight4bit, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor | None:
        """‖W0 + s·BA‖ per row for this forward (W0 a tensor or a Weight4bit), or None under torch.compile (the op
        then computes it in the graph: reading version counters there would break it)."""
        if torch.compiler.is_compiling():
            return None
        weight_parts = self._parts(weight)
        parts = weight_parts + [lora_A, lora_B]
        norm, state = self._get("norm", parts, float(scaling))
        if norm is not None:
            return norm
        sq_norm, weight_state = self._get("sq_norm", weight_parts)
        if sq_norm is None:
            with torch.no_grad():
                sq_norm = row_sq_norms(weight, norm_dtype(weight, lora_A))
            self._put("sq_norm", weight_parts, weight_state, sq_norm)
        return self._put("norm", parts, state, dora_weight_norm(weight, lora_A, lora_B, scaling, sq_norm))

    def gain(self, weight: Tensor | Weight4bit, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
             ) -> Tensor | None:
        """g = m / ‖W0 + s·BA‖ per row (no gradient), or None under torch.compile; the magnitude is checked
        (validation.check_magnitude) whenever g is computed."""
        if torch.compiler.is_compiling():
            return None
        parts = self._parts(weight, lora_A, lora_B, magnitude)
        gain, state = self._get("gain", parts, float(scaling))
        if gain is not None:
            return gain
        norm = self.norm(weight, lora_A, lora_B, scaling)
        validation.check_magnitude(magnitude, weight, lora_A.dtype)
        with torch.no_grad():
            return self._put("gain", parts, state, _gain(magnitude, norm))

def cached_dora_linear(cache: DoRANormCache, x: Tensor, weight: Tensor | Weight4bit, bias: Tensor | None,
                       lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float, dropout_p: float,
                       training: bool, norm_gradient: bool = False, op_scaling: float | Tensor | None = None) -> Tensor:
    """dora_linear with what cache keeps while W0, A, B, m and s are unchanged: the norm, and for a forward without
    gradient or dropout (eval, generation) the gain itself (dora_linear_inference: no per-call gain, no magnitude
    check). scaling: the number the cache keys on; op_scaling: the scaling as the kernels get it (LoRALinear's
    0-d tensor on a GPU), default scaling."""
    op_scaling = scaling if op_scaling is None else op_scaling
    if not torch.is_grad_enabled() and not (training and dropout_p > 0.0):
        gain = cache.gain(weight, lora_A, lora_B, magnitude, scaling)
        if gain is not None:
            return dora_linear_inference(x, weight, bias, lora_A, lora_B, gain, op_scaling)
    norm = cache.norm(weight, lora_A, lora_B, scaling)
    return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, op_scaling, dropout_p, training, weight_norm=norm,
                       norm_gradient=norm_gradient)
