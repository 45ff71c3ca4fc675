"""DoRA, the weight-decomposed LoRA linear: its row norms, its implementation over the LoRA kernels, one definition
per weight format (a dense W0, and a 4-bit one: QDoRA).

    dora_weight_norm_op(weight, lora_A, lora_B, scaling, weight_sq_norm) -> n [out]
    dora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z,
                   norm_gradient) -> (y [M, out], xa [M, r], z [M, out], or [0] when keep_z is False)
    dora_weight_norm_4bit_op(<w4>, lora_A, lora_B, scaling, weight_sq_norm) -> n [out]
    dora_linear_4bit_op(x, <w4>, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z,
                        norm_gradient) -> (y, xa, z)

with <w4> a 4-bit weight's parts as lora_linear_4bit_op takes them (codes, absmax, nested_absmax, nested_code,
offset, code_table, out_features, blocksize). What the math below needs of W0 comes from one of two classes:
DenseBase (an [out, in] tensor: lora_linear's kernels, ATen GEMMs) and Base4bit (bitsandbytes' 4-bit layout:
lora_linear_4bit's kernels, their base products, and W0 dequantized a block of rows at a time for the norm's
terms). A 4-bit W0's products are those of its kernels, W0 dequantized in x's dtype; its norm is of the weight's
exact values (table · scale in float32) whatever x's dtype, so that the float32 gradients of float32 adapters do
not depend on the compute dtype's rounding of W0. The spec: reference.dora_linear on dequantize_4bit(...,
x.dtype) with weight_norm = reference.dora_weight_norm of dequantize_4bit(..., float32).

The norm n = ‖W0 + s·BA‖ of every output row never builds an [out, in] tensor:

    n² = ‖W0_o‖² + 2s · (W0 Aᵀ)_o · B_o + s² · B_o (A Aᵀ) B_oᵀ

‖W0_o‖² is given (the layer caches it while W0 is unchanged) or computed; W0 Aᵀ [out, r] costs what the LoRA
shrink of `out` rows does; A Aᵀ is r × r. The three terms cancel when W0_o and s·B_o A nearly do: where n² is
below 1/16 (2^-20 in float64) of its scale (‖W0_o‖ + |s|·‖B_o A‖)², its error would grow past a few times the
dense computation's, and those rows are computed densely (a block of rows at a time). Float32 throughout
(float64 for float64 tensors), whatever the weight's dtype.

The op, with g = m / n [out] (the norm a constant, as in PEFT and the DoRA paper's §4.3):

    p = 0:  the fused LoRA forward with g in its epilogue where the backend has one (y written once; z = x W0ᵀ +
            s · xa Bᵀ stored beside it when kept), else the LoRA forward (z, xa), then y = g ⊙ z + b
    p > 0:  [x W0ᵀ; x̃ W0ᵀ] = [x; x̃] W0ᵀ, one product (each W0 tile read once for both), x̃ = drop(x)
            xa = x̃ Aᵀ,  z = x̃ W0ᵀ + s · xa Bᵀ
            y = x W0ᵀ + b + (g − 1) ⊙ z + s · xa Bᵀ           (PEFT's terms, regrouped)

and its backward (z is what dm needs; nothing [out, in] is ever built):

    (dx', dA, dB) = the fused LoRA backward of g ⊙ dy (with the forward's dropout mask)
    p = 0:  dx = dx'
    p > 0:  dx = dx' + (1 − mask/(1−p)) ⊙ (((1 − g) ⊙ dy) W0)
    dm = Σ_rows dy ⊙ z / n,   db = Σ_rows dy

norm_gradient=True differentiates the norm too (the DoRA paper and PEFT detach it): with w = −dm ⊙ g / n [out]
and V = W0 + s·BA, ∂L/∂V = diag(w) V, so dB += s · diag(w) (W0 Aᵀ + s · B (A Aᵀ)) and dA += s · ((w⊙B)ᵀ W0 +
s · (w⊙B)ᵀ B A): two more passes over W0 ([out, r] and [r, in] products), no [out, in] tensor.

The LoRA kernels are those lora_linear's backend choice picks for the call (cpu, cuda, triton or reference), so
DoRA runs wherever LoRA does. float32 adapters on a 16-bit base (PEFT's default) take ATen ops instead, with the
LoRA terms, z and g ⊙ dy in float32 (_mixed_forward / _mixed_backward): the LoRA kernels take the gradient in
x's dtype, and g ⊙ dy rounded to 16 bits would cost dA and dB their float32 accuracy.

With dropout PEFT's function needs a second product with W0, x̃ W0ᵀ (and dx one more): twice the multiply-adds
of LoRA's products, the cost of DoRA with dropout; the forward's two share one read of W0 (stacked rows). (A
product over the dropped elements only, x̃ = (x − x⊙(1−keep))/(1−p), was built and measured three ways: no
faster on a 2-core CPU; benchmarks/NOTES.md.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backends import HALF_AND_FLOAT32, Implementation, compiled_extension, implementation, register, requested_backend
from .definition import Backward, define_op, seed_value
from .lora_linear import _backend, _dropout, _kernel_scaling, scaling_graph_input
from .lora_linear_4bit import OP as OP_4BIT, ReferenceBackend as Reference4bit, dequantize_rows, rows_per_block

# Rows per block where the norm is computed densely (or a 16-bit weight widened): temporaries stay near this size.
_BLOCK_ELEMENTS = 1 << 20
# n² below this fraction of its scale is recomputed densely (see the module docstring).
_CANCELLATION = {torch.float32: 2.0**-4, torch.float64: 2.0**-20}


def norm_dtype(weight, lora_A: Tensor) -> torch.dtype:
    """The dtype of the row norms, the gain g and DoRA's epilogue: float64 for float64 tensors, else float32."""
    return torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype) else torch.float32


def _rows_per_block(in_features: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, in_features))


def _row_blocks(weight: Tensor):
    return _row_slices(weight.shape[0], _rows_per_block(weight.shape[1]))


def _row_slices(rows: int, per_block: int) -> list[slice]:
    return [slice(r0, r0 + per_block) for r0 in range(0, rows, per_block)]


class DenseBase:
    """W0 [out, in] as a tensor: the LoRA kernels lora_linear's backend choice picks for the call, ATen GEMMs for the
    base products, the weight read a block of rows at a time where it must be widened."""

    __slots__ = ("weight",)

    def __init__(self, weight: Tensor):
        self.weight = weight  # the rest read from it when needed: a decode step's forward needs none of it

    device = property(lambda self: self.weight.device)
    dtype = property(lambda self: self.weight.dtype)
    out_features = property(lambda self: self.weight.shape[0])
    in_features = property(lambda self: self.weight.shape[1])

    def gained_forward(self, x, bias, lora_A, lora_B, s, gain, keep_z: bool):
        """(y, xa, z or an empty tensor): y = g ⊙ z + b [M, out] in x's dtype, z = x W0ᵀ + s · xa Bᵀ, xa = x Aᵀ (no
        dropout; adapters in x's dtype)."""
        return _gained(_backend("forward", x, self.weight, lora_A, 0.0), x, self.weight, bias, lora_A, lora_B, s,
                       gain, keep_z)

    def lora_backward(self, grad, x, lora_A, lora_B, xa, s, p: float, seed, need_dx: bool):
        """(dx, dA, dB) of lora_linear for the output gradient grad (with the forward's dropout mask)."""
        return _backend("backward", x, self.weight, lora_A, p).backward(grad, x, self.weight, lora_A, lora_B, xa, s,
                                                                        p, seed, need_dx)

    def product(self, x, bias=None) -> Tensor:
        """x W0ᵀ (+ b) [M, out] in x's dtype."""
        return torch.addmm(bias, x, self.weight.t()) if bias is not None else x @ self.weight.t()

    def transposed_product(self, grad, x) -> Tensor:
        """grad W0 [M, in] in grad's dtype (x: the layer's input)."""
        return grad @ self.weight

    def blocks(self, acc: torch.dtype) -> list[slice]:
        """The row blocks in which W0 is read in acc: one when it already has that dtype."""
        if self.weight.dtype == acc:
            return [slice(0, self.out_features)]
        return _row_slices(self.out_features, _rows_per_block(self.in_features))

    def rows(self, rows: slice, acc: torch.dtype) -> Tensor:
        """W0[rows] in acc (a view when no cast is needed)."""
        return self.weight[rows].to(acc)

    def weight_times(self, A_t: Tensor) -> Tensor:
        """W0 @ A_t [out, k] in A_t's dtype."""
        return _blockwise_times(self, A_t)

    def dense(self, dtype: torch.dtype) -> Tensor:
        return self.weight


class Base4bit:
    """A 4-bit W0 (w4: its kernel_args(), in_features): lora_linear_4bit's kernels for the call's backend, their base
    products (the fused GEMMs with a zero adapter, or without a LoRA stage), and blocks of rows dequantized by that
    backend (each starting a scale block) for the norm's terms: no [out, in] temporary."""

    # the dtype of the values the norm is taken of: the weight's exact ones (no 4-bit weight is float64)
    dtype = torch.float32

    def __init__(self, w4: tuple, in_features: int):
        self.w4, self.device = w4, w4[0].device
        self.out_features, self.in_features = w4[6], in_features

    @staticmethod
    def _impl(x: Tensor, adapter_dtype: torch.dtype):
        return implementation(OP_4BIT, x.device, x.dtype, adapter_dtype)

    def gained_forward(self, x, bias, lora_A, lora_B, s, gain, keep_z: bool):
        return _gained(self._impl(x, lora_A.dtype), x, self.w4, bias, lora_A, lora_B, s, gain, keep_z)

    def lora_backward(self, grad, x, lora_A, lora_B, xa, s, p: float, seed, need_dx: bool):
        return self._impl(x, lora_A.dtype).backward(grad, x, self.w4, lora_A, lora_B, xa, s, p, seed, need_dx)

    def product(self, x, bias=None) -> Tensor:
        return self._impl(x, x.dtype).base_forward(x, self.w4, bias)

    def transposed_product(self, grad, x) -> Tensor:
        return self._impl(grad, grad.dtype).base_backward(grad, x, self.w4)

    def blocks(self, acc: torch.dtype) -> list[slice]:
        return _row_slices(self.out_features, rows_per_block(self.in_features, self.w4[7], _BLOCK_ELEMENTS))

    def weight_times(self, A_t: Tensor) -> Tensor:
        """W0 @ A_t [out, k] in A_t's dtype: from the backend's float32 base product where it has one ((A_t)ᵀ as x:
        one streaming pass over the packed weight, ~3x faster on the CPU than dequantizing blocks first), else from
        blocks of rows."""
        impl = self._impl(A_t, A_t.dtype)
        if A_t.dtype != torch.float32 or not getattr(impl, "FLOAT32_BASE_PRODUCT", False):
            return _blockwise_times(self, A_t)
        return impl.base_forward(A_t.t().contiguous(), self.w4, None).t()

    def rows(self, rows: slice, acc: torch.dtype) -> Tensor:
        block = dequantize_rows(self.w4, self.in_features, rows, torch.float32)  # exact: float64 only widens
        return block if acc == torch.float32 else block.to(acc)

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The whole W0 in dtype, as the spec dequantizes it (for the double backward, which runs the reference)."""
        return Reference4bit.dequantize(self.w4, self.in_features, dtype)


def _gained(lora_impl, x: Tensor, weight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, s, gain: Tensor,
            keep_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z or an empty tensor) of y = g ⊙ z + b, z = x W0ᵀ + s · (x Aᵀ) Bᵀ from a LoRA backend (weight as it
    takes it), the gain applied where the backend can: in the Triton GEMMs' epilogue (y and z stored from one
    accumulator, y written once), in the C++ fused forward on the CPU (one call from Python instead of two: ~20 µs
    of a decode step; the same ATen op as the dora_gain op's, so the same bits), else after the backend's forward
    by the dora_gain op (on a GPU one Triton pass)."""
    if keep_z and hasattr(lora_impl, "gained_forward_keeping_z"):
        return lora_impl.gained_forward_keeping_z(x, weight, bias, lora_A, lora_B, s, gain)
    if not keep_z and hasattr(lora_impl, "gained_forward") and not _gain_after_kernel(lora_impl, x):
        return (*lora_impl.gained_forward(x, weight, bias, lora_A, lora_B, s, gain), x.new_empty(0))
    z, xa = lora_impl.forward(x, weight, None, lora_A, lora_B, s, 0.0, None)
    y = _gain_ops(x).dora_gained(z, gain, bias, x.dtype, in_place=not keep_z)
    return y, xa, (z if keep_z else z.new_empty(0))


def _gain_after_kernel(lora_impl, x: Tensor) -> bool:
    """Whether the C++ kernels' gain (ATen's epilogue after the product) is worse than the dora_gain op's: on a GPU,
    where that op's Triton kernel is one pass over y."""
    return x.is_cuda and not hasattr(lora_impl, "gained_forward_keeping_z")


def _base_of(weight) -> "DenseBase | Base4bit":
    """The base class for a weight as the functional API takes it (a tensor or a Weight4bit)."""
    if isinstance(weight, Tensor):
        return DenseBase(weight)
    return Base4bit(weight.kernel_args(), weight.in_features)


def row_sq_norms(weight, acc: torch.dtype) -> Tensor:
    """‖W0_o‖² of every row [out] in acc, of a tensor or a Weight4bit (read a block of rows at a time)."""
    return _row_sq_norms(_base_of(weight), acc)


def _row_sq_norms(base, acc: torch.dtype) -> Tensor:
    blocks = base.blocks(acc)
    if not blocks:
        return torch.zeros(0, dtype=acc, device=base.device)
    return torch.cat([torch.linalg.vector_norm(base.rows(rows, acc), dim=1) for rows in blocks]).square()


def _blockwise_times(base, A_t: Tensor) -> Tensor:
    """W0 @ A_t [out, k] in A_t's dtype, W0 read a block of rows at a time."""
    blocks = base.blocks(A_t.dtype)
    if not blocks:
        return A_t.new_zeros(0, A_t.shape[1])
    return torch.cat([base.rows(rows, A_t.dtype) @ A_t for rows in blocks])


def _times_weight(C: Tensor, base) -> Tensor:
    """Cᵀ @ W0 [k, in] for C [out, k], in C's dtype."""
    total = C.new_zeros(C.shape[1], base.in_features)
    for rows in base.blocks(C.dtype):
        total += C[rows].t() @ base.rows(rows, C.dtype)
    return total


def _norm(base, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, weight_sq_norm: Optional[Tensor]) -> Tensor:
    """n = ‖W0 + s·BA‖ per output row, [out] in norm_dtype (see the module docstring)."""
    acc = norm_dtype(base, lora_A)
    s = _kernel_scaling(scaling)
    A, B = lora_A.to(acc), lora_B.to(acc)
    sq = _row_sq_norms(base, acc) if weight_sq_norm is None else weight_sq_norm.to(acc)
    cross = base.weight_times(A.t())
    lora_sq = ((B @ (A @ A.t())) * B).sum(1)  # ‖B_o A‖²
    n2 = sq + 2 * s * (cross * B).sum(1) + s * s * lora_sq
    scale = (sq.sqrt() + abs(s) * lora_sq.clamp_min(0).sqrt()).square()
    cancelled = ~(n2 >= scale * _CANCELLATION[acc])  # NaN included
    if bool(cancelled.any()):
        _dense_rows_(n2, cancelled, base, A, B, s)
    return n2.clamp_min(0).sqrt()


def _dense_rows_(n2: Tensor, cancelled: Tensor, base, A: Tensor, B: Tensor, s) -> None:
    """n2[o] = ‖W0_o + s·B_o A‖² for the cancelled rows o, from the dense rows, a block of rows at a time."""
    per_block = _rows_per_block(base.in_features)
    for rows in base.blocks(A.dtype):
        inside = cancelled[rows].nonzero().squeeze(1)
        if not inside.numel():
            continue
        block = base.rows(rows, A.dtype)
        for i in range(0, inside.numel(), per_block):
            some = inside[i:i + per_block]
            dense = block[some] + (B[rows][some] * s) @ A
            n2[rows.start + some] = torch.linalg.vector_norm(dense, dim=1).square()


def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
                weight_sq_norm: Optional[Tensor]) -> Tensor:
    """The dense op's implementation: n = ‖W0 + s·BA‖ per output row, [out] in norm_dtype."""
    return _norm(DenseBase(weight), lora_A, lora_B, scaling, weight_sq_norm)


def _weight_norm_fake(weight, lora_A, lora_B, scaling, weight_sq_norm):
    return weight.new_empty(weight.shape[0], dtype=norm_dtype(weight, lora_A))


def _norm_graph_args(args):
    weight, lora_A, lora_B, scaling, weight_sq_norm = args
    return weight, lora_A, lora_B, scaling_graph_input(weight, scaling), weight_sq_norm


# A custom op of its own so that torch.compile does not trace (and break its graph on) the data-dependent
# choice of dense rows.
dora_weight_norm_op = define_op("dora_weight_norm", weight_norm, _weight_norm_fake, graph_args=_norm_graph_args)


# ---- dropout mask, the forward and the backward

def keep_scale(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """mask / (1 − p) of x [M, in] (the mask every backend draws from this seed), float32 (float64 for float64 x)."""
    if _mask_kernel_for(x.device.type) and requested_backend() != "reference":
        mask = torch.ops.lora_kernels.dropout_mask(x, p, seed_value(seed))
        return mask if x.dtype != torch.float64 else mask.ne(0).to(torch.float64).mul_(1.0 / (1.0 - p))
    keep = reference.dropout_mask(seed_value(seed), x.shape[0], x.shape[1], p, device=x.device)
    return keep.to(torch.float64 if x.dtype == torch.float64 else torch.float32).mul_(1.0 / (1.0 - p))


def _mask_kernel_for(device_type: str) -> bool:
    """Whether lora_kernels._C has the dropout_mask kernel for this device (an extension built before it had not)."""
    ext = compiled_extension()
    return (ext is not None and hasattr(torch.ops.lora_kernels, "dropout_mask")
            and (device_type == "cpu" or (device_type == "cuda" and ext.with_cuda)))


def _dropped(x: Tensor, scale: Tensor) -> Tensor:
    """drop(x) in x's dtype (one rounding of x · mask/(1−p))."""
    return (x * scale).to(x.dtype)


def _gain(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    """g = m / n [out], in the norm's dtype."""
    return (magnitude if magnitude.dtype == weight_norm.dtype else magnitude.to(weight_norm.dtype)) / weight_norm


def _rows_scaled(t: Tensor, gain: Tensor) -> Tensor:
    """t ⊙ gain (per column: t [M, out], gain [out]), computed in gain's dtype and rounded once to t's."""
    return (t * gain).to(t.dtype)


class AtenGain:
    """DoRA's per-column gain epilogues in ATen ops (the reference and cuda backends of the dora_gain op, and the
    cpu backend's forward; the triton backend's are ops/triton_dora.py's kernels, one pass each)."""

    @staticmethod
    def dora_gained(z: Tensor, gain: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype, in_place: bool
                    ) -> Tensor:
        """y = g ⊙ z + b in out_dtype, one rounding (computed in gain's dtype); in place into z when allowed."""
        # one ATen op either way (a decode step pays each op's dispatch), and the same formula in place or not
        if in_place and z.dtype == gain.dtype == out_dtype:
            return torch.addcmul(bias, z, gain, out=z) if bias is not None else z.mul_(gain)
        y = torch.addcmul(bias, z, gain) if bias is not None else z * gain
        return y.to(out_dtype)

    @staticmethod
    def dora_gain_gradients(grad_y: Tensor, z: Optional[Tensor], gain: Tensor, out_dtype: torch.dtype
                            ) -> tuple[Tensor, Optional[Tensor]]:
        """(g ⊙ dy in out_dtype, Σ_rows dy ⊙ z in gain's dtype or None without z)."""
        acc = gain.dtype
        scaled = (grad_y * gain).to(out_dtype)
        return scaled, (None if z is None else (grad_y.to(acc) * z.to(acc)).sum(0))


class CompiledGain(AtenGain):
    """The cpu backend's: the backward epilogue in one pass (csrc/cpu/dora_gain.cpp: g ⊙ dy bit for bit AtenGain's,
    Σ_rows dy ⊙ z summed in float64, no [M, out] temporary); the forward epilogue is AtenGain's one addcmul. An
    extension built before the kernel existed gets AtenGain's."""

    @staticmethod
    def dora_gain_gradients(grad_y: Tensor, z: Optional[Tensor], gain: Tensor, out_dtype: torch.dtype
                            ) -> tuple[Tensor, Optional[Tensor]]:
        """(g ⊙ dy in out_dtype, Σ_rows dy ⊙ z in gain's dtype or None without z)."""
        if not hasattr(torch.ops.lora_kernels, "dora_gain_gradients"):
            return AtenGain.dora_gain_gradients(grad_y, z, gain, out_dtype)
        scaled, dz = torch.ops.lora_kernels.dora_gain_gradients(grad_y, z, gain, out_dtype)
        return scaled, (None if z is None else dz)


GAIN_OP = "dora_gain"
register(Implementation(GAIN_OP, "reference", "lora_kernels.ops.dora_linear:AtenGain"))
register(Implementation(GAIN_OP, "cpu", "lora_kernels.ops.dora_linear:CompiledGain", devices=("cpu",)))
register(Implementation(GAIN_OP, "cuda", "lora_kernels.ops.dora_linear:AtenGain", devices=("cuda",)))
register(Implementation(GAIN_OP, "triton", "lora_kernels.ops.triton_dora", devices=("cuda",), dtypes=HALF_AND_FLOAT32))


def _gain_ops(x: Tensor):
    """The dora_gain implementation for x: on a GPU under auto the Triton kernels (one pass each), else ATen."""
    return implementation(GAIN_OP, x.device, x.dtype)


def _forward(base, x: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             weight_norm: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor], keep_z: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z or an empty tensor) on either weight format (see the module docstring)."""
    p, seed = _dropout(dropout_p, seed)
    return _gained_forward(base, x, bias, lora_A, lora_B, _gain(magnitude, weight_norm), _kernel_scaling(scaling), p,
                           seed, keep_z)


def inference_forward(x: Tensor, weight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, gain: Tensor,
                      scaling) -> Tensor:
    """y [M, out] of the op without gradient or dropout from a gain g = m / n [out] computed beforehand (a layer in
    eval keeps g while nothing changes: dora.DoRANormCache.gain); x [M, in] checked by the caller, weight a tensor
    or a Weight4bit. The op's forward minus computing g: the same kernels, the same bits."""
    base, s = _base_of(weight), _kernel_scaling(scaling)
    if lora_A.dtype != x.dtype:
        return _mixed_forward(base, x, bias, lora_A, lora_B, gain, s, 0.0, None, False, _gain_ops(x))[0]
    return base.gained_forward(x, bias, lora_A, lora_B, s, gain, False)[0]


def _gained_forward(base, x: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, gain: Tensor, s,
                    p: float, seed: Optional[Tensor], keep_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    if lora_A.dtype != x.dtype:
        return _mixed_forward(base, x, bias, lora_A, lora_B, gain, s, p, seed, keep_z, _gain_ops(x))
    if p == 0.0:  # g and b in the LoRA kernel's epilogue where it has one
        return base.gained_forward(x, bias, lora_A, lora_B, s, gain, keep_z)
    else:
        x_dropped, base_x, base_dropped = _products_with_dropped(base, x, keep_scale(x, p, seed))
        xa = x_dropped @ lora_A.t()
        z = _plus_lora(base_dropped, xa, lora_B, s)  # x̃ W0ᵀ + s · xa Bᵀ
        acc = gain.dtype
        y = torch.addcmul(base_x.to(acc), z.to(acc), gain - 1)
        y.addmm_(xa.to(acc), (lora_B.to(acc) * s).t())
        if bias is not None:
            y.add_(bias)
        y = y.to(x.dtype)
    return y, xa, (z if keep_z else z.new_empty(0))


def _plus_lora(c: Tensor, xa: Tensor, lora_B: Tensor, s) -> Tensor:
    """c + s · xa Bᵀ [M, out], a new tensor, s applied in the product's accumulator (a 0-d tensor s scales B; so
    does s = 0, which BLAS would take as leave to skip the product and its NaN/Inf)."""
    if isinstance(s, Tensor) or s == 0.0:
        return torch.addmm(c, xa, (lora_B * s).t())
    return torch.addmm(c, xa, lora_B.t(), alpha=s)


def _products_with_dropped(base, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x̃ = drop(x) [M, in] in x's dtype, x W0ᵀ, x̃ W0ᵀ [M, out]) from one product of [x; x̃] stacked: each tile of
    W0 is read once for both (a small batch is bound by W0's traffic, a 4-bit W0 by its dequantization; at large M
    one GEMM of 2M rows costs what two of M rows do). keep: keep_scale(x, ...)."""
    M = x.shape[0]
    stacked = x.new_empty(2 * M, x.shape[1])
    stacked[:M].copy_(x)
    stacked[M:].copy_(x * keep)  # one rounding of x · mask/(1−p), as _dropped
    both = base.product(stacked)
    return stacked[M:], both[:M], both[M:]


def _backward(base, grad_y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, z: Tensor,
              magnitude: Tensor, weight_norm: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor],
              need_dx: bool, need_dm: bool, norm_gradient: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, dA, dB, dm or an empty tensor) on either weight format (see the module docstring)."""
    p, seed = _dropout(dropout_p, seed)
    s = _kernel_scaling(scaling)
    gain = _gain(magnitude, weight_norm)
    gain_ops = _gain_ops(x)
    mixed = lora_A.dtype != x.dtype
    # g ⊙ dy (float32 for float32 adapters) and, when dm is needed, Σ_rows dy ⊙ z: dy and z read once
    g_dy, dz = gain_ops.dora_gain_gradients(grad_y, z if need_dm or norm_gradient else None, gain,
                                            lora_A.dtype if mixed else grad_y.dtype)
    if mixed:
        dx, dA, dB = _mixed_backward(base, grad_y, g_dy, x, lora_A, lora_B, xa, gain, s, p, seed, need_dx, gain_ops)
    else:
        dx, dA, dB = base.lora_backward(g_dy, x, lora_A, lora_B, xa, s, p, seed, need_dx)
        if p > 0.0 and need_dx:
            kept = keep_scale(x, p, seed)
            one_minus_g_dy = gain_ops.dora_gain_gradients(grad_y, None, 1 - gain, grad_y.dtype)[0]
            base_part = base.transposed_product(one_minus_g_dy, x)
            dx = torch.addcmul(dx.to(kept.dtype), base_part.to(kept.dtype), 1 - kept).to(x.dtype)
    dm = dz / weight_norm if dz is not None else None
    if norm_gradient:
        dA_norm, dB_norm = _norm_gradients(base, lora_A, lora_B, -dm * gain / weight_norm, s)
        dA, dB = (dA + dA_norm).to(dA.dtype), (dB + dB_norm).to(dB.dtype)
    return dx, dA, dB, (dm.to(magnitude.dtype) if need_dm else magnitude.new_empty(0))


def _norm_gradients(base, lora_A, lora_B, w: Tensor, s) -> tuple[Tensor, Tensor]:
    """(dA, dB) through the norm for ∂L/∂V = diag(w) V, V = W0 + s·BA (module docstring), in w's dtype."""
    A, B = lora_A.to(w.dtype), lora_B.to(w.dtype)
    wB = w[:, None] * B
    dB = (base.weight_times(A.t()) + (B @ (A @ A.t())) * s) * (s * w[:, None])
    dA = (_times_weight(wB, base) + ((wB.t() @ B) @ A) * s) * s
    return dA, dB


def _mixed_forward(base, x, bias, lora_A, lora_B, gain, s, p: float, seed, keep_z: bool, gain_ops):
    """float32 adapters on a 16-bit x: the base GEMMs in x's dtype, the LoRA terms and z in float32, y rounded once."""
    acc = lora_A.dtype
    keep = keep_scale(x, p, seed) if p > 0.0 else None
    x_acc = x.to(acc) if keep is None else x.to(acc) * keep  # drop(x), exact in float32
    xa = x_acc @ lora_A.t()
    lora = (xa @ lora_B.t()) * s
    if keep is None:
        z = base.product(x).to(acc).add_(lora)
        y = gain_ops.dora_gained(z, gain, bias, x.dtype, in_place=False)
    else:
        _, base_x, base_dropped = _products_with_dropped(base, x, keep)
        z = base_dropped.to(acc).add_(lora)  # x̃ W0ᵀ + s · xa Bᵀ
        y = base_x.to(acc).addcmul_(z, gain - 1).add_(lora)
        if bias is not None:
            y.add_(bias)
        y = y.to(x.dtype)
    return y, xa, (z if keep_z else z.new_empty(0))


def _mixed_backward(base, grad_y, g_dy, x, lora_A, lora_B, xa, gain, s, p: float, seed, need_dx: bool, gain_ops):
    """(dx, dA, dB) of _mixed_forward from g_dy = g ⊙ dy (float32): gb = s · (g ⊙ dy) B, dA and dB in float32;
    the base GEMMs in x's dtype; dx rounded once."""
    acc = lora_A.dtype
    keep = keep_scale(x, p, seed) if p > 0.0 else None
    gb = (g_dy @ lora_B.to(acc)) * s
    dB = (g_dy.t() @ xa) * s
    dA = gb.t() @ (x.to(acc) if keep is None else x.to(acc) * keep)
    if not need_dx:
        return x.new_empty(0), dA, dB
    lora_dx = gb @ lora_A
    if keep is None:
        dx = base.transposed_product(g_dy.to(x.dtype), x).to(acc).add_(lora_dx)
    else:  # dy W0 + mask/(1−p) ⊙ (((g − 1) ⊙ dy) W0 + s (g ⊙ dy) B A)
        g_minus_one_dy = gain_ops.dora_gain_gradients(grad_y, None, gain - 1, grad_y.dtype)[0]
        dropped_part = base.transposed_product(g_minus_one_dy, x).to(acc).add_(lora_dx).mul_(keep)
        dx = base.transposed_product(grad_y, x).to(acc).add_(dropped_part)
    return dx.to(x.dtype), dA, dB


def _magnitude_gradient(grad_y, z, weight_norm) -> Tensor:
    """dm = Σ_rows dy ⊙ z / n [out], in the norm's dtype."""
    acc = weight_norm.dtype
    return (grad_y.to(acc) * z.to(acc)).sum(0) / weight_norm


def _backward_outputs_fake(grad_y, x, lora_A, lora_B, magnitude, need_dx, need_dm):
    return (x.new_empty(x.shape if need_dx else (0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape), magnitude.new_empty(magnitude.shape if need_dm else (0,)))


def _outputs_fake(x, out_features, lora_A, keep_z):
    M = x.shape[0]  # z has the adapter's dtype (float32 for float32 adapters on 16 bits)
    return (x.new_empty(M, out_features), lora_A.new_empty(M, lora_A.shape[0]),
            lora_A.new_empty((M, out_features) if keep_z else (0,)))


def _lora_gradients(ctx, grad_y, base_args: tuple, run_backward, x, lora_A, lora_B, xa, z, magnitude, weight_norm,
                    seed, need_x, need_m):
    """(dx, dA, dB, dm) from the op's backward (base_args: the weight as the backward op takes it)."""
    if (need_m or ctx.norm_gradient) and z.numel() != grad_y.numel():
        raise RuntimeError("dora_linear: the magnitude or the norm needs a gradient but the forward did not keep z "
                           "(called with keep_z=False)")
    return run_backward(grad_y, x, *base_args, lora_A, lora_B, xa, z, magnitude, weight_norm, ctx.scaling,
                        ctx.dropout_p, seed, need_x, need_m, ctx.norm_gradient)


def _reference_gradients(ctx, grad_y, base, x, lora_A, lora_B, magnitude, weight_norm, seed, wanted: dict) -> dict:
    """Double backward: the first derivatives as a graph of plain PyTorch ops (reference.dora_linear on the saved
    inputs, norm and W0 as the spec has it, differentiated with create_graph=True), for the inputs in `wanted`
    (name -> tensor). Only taken when a graph of the backward is asked for."""
    if not wanted:
        return {}
    p, seed = _dropout(ctx.dropout_p, seed)
    weight = wanted.get("weight", base.dense(x.dtype))
    y = reference.dora_linear(x, weight, None, lora_A, lora_B, magnitude, _kernel_scaling(ctx.scaling), p,
                              seed_value(seed) if seed is not None else None, weight_norm=weight_norm,
                              norm_gradient=ctx.norm_gradient)
    return dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y, create_graph=True)))


# ---- the op on a dense W0

def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
            weight_norm: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor], keep_z: bool,
            norm_gradient: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z or an empty tensor): the op's forward entry point (see the module docstring)."""
    return _forward(DenseBase(weight), x, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed,
                    keep_z)


def _forward_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z,
                  norm_gradient):
    return _outputs_fake(x, weight.shape[0], lora_A, keep_z)


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, z: Tensor,
             magnitude: Tensor, weight_norm: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor],
             need_dx: bool, need_dm: bool, norm_gradient: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, dA, dB, dm or an empty tensor) (see the module docstring)."""
    return _backward(DenseBase(weight), grad_y, x, lora_A, lora_B, xa, z, magnitude, weight_norm, scaling, dropout_p,
                     seed, need_dx, need_dm, norm_gradient)


def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, z, magnitude, weight_norm, scaling, dropout_p, seed,
                   need_dx, need_dm, norm_gradient):
    return _backward_outputs_fake(grad_y, x, lora_A, lora_B, magnitude, need_dx, need_dm)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z, norm_gradient = inputs
    _, xa, z = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, seed)
    ctx.scaling, ctx.dropout_p, ctx.norm_gradient = scaling, dropout_p, norm_gradient
    ctx.mark_non_differentiable(xa, z)


def _gradients(ctx, grad_outputs, run_backward):
    """The gradients of (x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z,
    norm_gradient). weight_norm gets none: it is a value (with norm_gradient, its gradient reaches A, B and W0)."""
    grad_y = grad_outputs[0]
    x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_b_lora, need_m = ctx.needs_input_grad[:6]
    d_bias = grad_y.sum(0) if need_b else None
    if torch.is_grad_enabled():
        wanted = {name: t for name, t, need in (("x", x, need_x), ("weight", weight, need_w), ("A", lora_A, need_a),
                                                 ("B", lora_B, need_b_lora), ("m", magnitude, need_m)) if need}
        grads = _reference_gradients(ctx, grad_y, DenseBase(weight), x, lora_A, lora_B, magnitude, weight_norm,
                                     seed, wanted)
        return (grads.get("x"), grads.get("weight"), d_bias, grads.get("A"), grads.get("B"), grads.get("m"),
                None, None, None, None, None, None)
    grad_y = grad_y.contiguous()
    dx, dA, dB, dm = _lora_gradients(ctx, grad_y, (weight,), run_backward, x, lora_A, lora_B, xa, z, magnitude,
                                     weight_norm, seed, need_x, need_m)
    d_weight = None
    if need_w:
        d_weight = _weight_gradient(grad_y, x, magnitude, weight_norm, ctx.dropout_p, seed)
        if ctx.norm_gradient:  # + diag(w) (W0 + s·BA), w = −dm g / n
            w = -_magnitude_gradient(grad_y, z, weight_norm) * _gain(magnitude, weight_norm) / weight_norm
            s = _kernel_scaling(ctx.scaling)
            V = weight.to(w.dtype) + (lora_B.to(w.dtype) * s) @ lora_A.to(w.dtype)
            d_weight = (d_weight + w[:, None] * V).to(d_weight.dtype)
    return (dx if need_x else None, d_weight, d_bias, dA if need_a else None, dB if need_b_lora else None,
            dm if need_m else None, None, None, None, None, None, None)


def _weight_gradient(grad_y, x, magnitude, weight_norm, dropout_p, seed) -> Tensor:
    """d W0 (a trainable base weight; the norm a constant): dyᵀ x + ((g − 1) ⊙ dy)ᵀ x̃."""
    p, seed = _dropout(dropout_p, seed)
    gain = _gain(magnitude, weight_norm)
    if p == 0.0:
        return _rows_scaled(grad_y, gain).t() @ x
    return grad_y.t() @ x + _rows_scaled(grad_y, gain - 1).t() @ _dropped(x, keep_scale(x, p, seed))


def _graph_args(args):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z, norm_gradient = args
    return (x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling_graph_input(x, scaling), dropout_p, seed,
            keep_z, norm_gradient)


dora_linear_op = define_op(
    "dora_linear", forward, _forward_fake,
    backward=Backward(impl=backward, fake=_backward_fake, setup_context=_setup_context, gradients=_gradients),
    graph_args=_graph_args,
)


# ---- the op on a 4-bit W0 (QDoRA): <w4> in place of weight; the weight is frozen (no gradient)

def weight_norm_4bit(codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                     offset: Optional[Tensor], code_table: Tensor, out_features: int, blocksize: int, lora_A: Tensor,
                     lora_B: Tensor, scaling: Tensor, weight_sq_norm: Optional[Tensor]) -> Tensor:
    """n = ‖W0 + s·BA‖ per output row of a 4-bit W0, [out] in norm_dtype."""
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return _norm(Base4bit(w4, lora_A.shape[1]), lora_A, lora_B, scaling, weight_sq_norm)


def _weight_norm_4bit_fake(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize,
                           lora_A, lora_B, scaling, weight_sq_norm):
    return lora_A.new_empty(out_features, dtype=norm_dtype(lora_A, lora_A))


def _norm_4bit_graph_args(args):
    return (*args[:10], scaling_graph_input(args[8], args[10]), args[11])


dora_weight_norm_4bit_op = define_op("dora_weight_norm_4bit", weight_norm_4bit, _weight_norm_4bit_fake,
                                     graph_args=_norm_4bit_graph_args)

_W4 = slice(1, 9)  # the weight's parts among the 4-bit op's inputs
_BIAS_4BIT, _SCALING_4BIT = 9, 14


def forward_4bit(x: Tensor, codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                 nested_code: Optional[Tensor], offset: Optional[Tensor], code_table: Tensor, out_features: int,
                 blocksize: int, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 weight_norm: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor], keep_z: bool,
                 norm_gradient: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z or an empty tensor) on a 4-bit W0: the 4-bit op's forward entry point."""
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return _forward(Base4bit(w4, x.shape[1]), x, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p,
                    seed, keep_z)


def _forward_4bit_fake(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize,
                       bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, keep_z, norm_gradient):
    return _outputs_fake(x, out_features, lora_A, keep_z)


def backward_4bit(grad_y: Tensor, x: Tensor, codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                  nested_code: Optional[Tensor], offset: Optional[Tensor], code_table: Tensor, out_features: int,
                  blocksize: int, lora_A: Tensor, lora_B: Tensor, xa: Tensor, z: Tensor, magnitude: Tensor,
                  weight_norm: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor], need_dx: bool,
                  need_dm: bool, norm_gradient: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, dA, dB, dm or an empty tensor) on a 4-bit W0."""
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return _backward(Base4bit(w4, x.shape[1]), grad_y, x, lora_A, lora_B, xa, z, magnitude, weight_norm, scaling,
                     dropout_p, seed, need_dx, need_dm, norm_gradient)


def _backward_4bit_fake(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                        blocksize, lora_A, lora_B, xa, z, magnitude, weight_norm, scaling, dropout_p, seed, need_dx,
                        need_dm, norm_gradient):
    return _backward_outputs_fake(grad_y, x, lora_A, lora_B, magnitude, need_dx, need_dm)


def _setup_context_4bit(ctx, inputs, output):
    x, (lora_A, lora_B, magnitude, weight_norm) = inputs[0], inputs[10:14]
    _, xa, z = output
    # the packed weight (held by the layer), never a dequantized copy
    ctx.save_for_backward(x, *inputs[1:7], lora_A, lora_B, magnitude, weight_norm, xa, z, inputs[16])
    ctx.out_features, ctx.blocksize = inputs[7], inputs[8]
    ctx.scaling, ctx.dropout_p, ctx.norm_gradient = inputs[_SCALING_4BIT], inputs[15], inputs[18]
    ctx.mark_non_differentiable(xa, z)


def _gradients_4bit(ctx, grad_outputs, run_backward):
    """The gradients of the 4-bit op's 19 inputs: x, bias, lora_A, lora_B and magnitude."""
    grad_y = grad_outputs[0]
    x, *parts, lora_A, lora_B, magnitude, weight_norm, xa, z, seed = ctx.saved_tensors
    w4 = (*parts, ctx.out_features, ctx.blocksize)
    need = ctx.needs_input_grad
    need_x, need_a, need_b, need_m = need[0], need[10], need[11], need[12]
    grads = [None] * 19
    if need[_BIAS_4BIT]:
        grads[_BIAS_4BIT] = grad_y.sum(0)
    if torch.is_grad_enabled():
        wanted = {i: t for i, t, n in ((0, x, need_x), (10, lora_A, need_a), (11, lora_B, need_b),
                                       (12, magnitude, need_m)) if n}
        found = _reference_gradients(ctx, grad_y, Base4bit(w4, x.shape[1]), x, lora_A, lora_B, magnitude,
                                     weight_norm, seed, wanted)
        for i, g in found.items():
            grads[i] = g
        return tuple(grads)
    dx, dA, dB, dm = _lora_gradients(ctx, grad_y.contiguous(), w4, run_backward, x, lora_A, lora_B, xa, z, magnitude,
                                     weight_norm, seed, need_x, need_m)
    for i, g, n in ((0, dx, need_x), (10, dA, need_a), (11, dB, need_b), (12, dm, need_m)):
        grads[i] = g if n else None
    return tuple(grads)


def _graph_args_4bit(args):
    return (*args[:_SCALING_4BIT], scaling_graph_input(args[0], args[_SCALING_4BIT]), *args[_SCALING_4BIT + 1:])


dora_linear_4bit_op = define_op(
    "dora_linear_4bit", forward_4bit, _forward_4bit_fake,
    backward=Backward(impl=backward_4bit, fake=_backward_4bit_fake, setup_context=_setup_context_4bit,
                      gradients=_gradients_4bit),
    graph_args=_graph_args_4bit,
)

if _mask_kernel_for("cpu"):
    @torch.library.register_fake("lora_kernels::dropout_mask")
    def _(x, dropout_p, seed):
        return x.new_empty(x.shape, dtype=torch.float32)
