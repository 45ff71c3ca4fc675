"""In-place merge of a LoRA adapter into its base weight: implementations per backend and the op.

    merge_op(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, safe)      (custom op lora_kernels::merge_)

weight [out, in] becomes round(weight + scaling · lora_B lora_A − sub_scaling · sub_B sub_A),
each product accumulated in float32 (float64 for float64 weights) tile by tile
and rounded once into weight's dtype: no [out, in] temporary. The subtracted
adapter (sub_A [r', in], sub_B [out, r']) is optional: unmerge is merge with
-scaling, switching adapters is one pass with both. Because each element's sum
runs in a fixed order, unmerge subtracts exactly what merge added, so repeated
merge/unmerge cycles do not drift.

Every backend implements (reference.merge_ is the spec):

    merge_(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only) -> non-finite count

With safe=True the merged values are computed once without writing, and if any
is not finite a RuntimeError is raised with weight untouched.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import FLOAT32_ADAPTERS_ON_HALF, Implementation, compiled_extension, implementation, register
from .definition import define_op

OP = "merge"


def compiled_merge_(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only: bool) -> int:
    """lora_kernels._C (csrc/cpu/merge.cpp, csrc/cuda/merge.cu), chosen by the dispatcher from weight's device:
    one op that writes, one that only counts (a mutating op that also returns a value cannot be functionalized)."""
    args = (weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling)
    if check_only:
        return int(torch.ops.lora_kernels.merge_nonfinite_count(*args))
    torch.ops.lora_kernels.merge_kernel_(*args)
    return 0


# float32 adapters on a 16-bit weight: the reference (float64 blocks, one rounding), on any device
register(Implementation(OP, "reference", "lora_kernels.reference:merge_", mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(OP, "cpu", "lora_kernels.ops.merge:compiled_merge_", devices=("cpu",)))
register(Implementation(OP, "cuda", "lora_kernels.ops.merge:compiled_merge_", devices=("cuda",)))
register(Implementation(OP, "triton", "lora_kernels.ops.triton_merge:merge_", devices=("cuda",)))


def _implementation(weight: Tensor, lora_A: Tensor, sub_A: Optional[Tensor]):
    adapter_dtype = lora_A.dtype if sub_A is None or sub_A.dtype == weight.dtype else sub_A.dtype
    return implementation(OP, weight.device, weight.dtype, adapter_dtype)


def raise_if_not_finite(weight, lora_A, lora_B, scaling, sub_A=None, sub_B=None, sub_scaling=0.0) -> None:
    """The check of safe=True: computes every merged value once, writes nothing."""
    merge = _implementation(weight, lora_A, sub_A)
    nonfinite = merge(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, True)
    if nonfinite:
        raise RuntimeError(
            f"lora_kernels: merge would make {nonfinite} element(s) of weight non-finite "
            "(NaN/Inf in lora_A, lora_B or weight, or overflow); weight was left unchanged"
        )


def _merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sub_A: Optional[Tensor],
           sub_B: Optional[Tensor], sub_scaling: float, safe: bool) -> None:
    if safe:
        raise_if_not_finite(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling)
    _implementation(weight, lora_A, sub_A)(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, False)


def _merge_fake(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, safe):
    return None


merge_op = define_op("merge_", _merge, _merge_fake, mutates_args=("weight",))

if compiled_extension() is not None:  # the C++ kernels' fakes, so that opcheck and torch.compile see through them
    @torch.library.register_fake("lora_kernels::merge_kernel_")
    def _(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling):
        return None

    @torch.library.register_fake("lora_kernels::merge_nonfinite_count")
    def _(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling):
        return weight.new_empty((), dtype=torch.int64)
