"""The fused LoRA linear op on a 4-bit base (QLoRA): its implementations per backend and its one definition.

    lora_linear_4bit_op(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize,
                        bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y [M, out], xa [M, r])

The weight arrives as its parts (Weight4bit.kernel_args(): tensors and ints), so that it passes through
torch.library like any argument; everything else is lora_linear's op (ops/lora_linear.py): the scaling as a float
or a 0-d tensor, the seed as a 0-d int64 tensor or None, the same saved state (x, xa, seed: never drop(x), never
the dequantized weight) and the same gradients. reference.lora_linear_4bit is the spec.

Backends: cpu (lora_kernels._C: csrc/lora_linear_4bit.cpp, csrc/cpu/weight4bit.cpp), triton (the fused GEMMs of
ops/triton_lora_linear.py dequantizing W0 a tile at a time in their K loops; 16-bit x under auto) and reference
(which dequantizes the whole weight: it is the spec, and what float32 runs on a GPU).

    forward(x, w4, bias, lora_A, lora_B, scaling, p, seed) -> (y, xa)
    backward(grad_y, x, w4, lora_A, lora_B, xa, scaling, p, seed, need_dx) -> (dx or [0], dA, dB)
    base_forward(x, w4, bias) -> x W0ᵀ + b [M, out]     base_backward(grad, x, w4) -> grad W0 [M, in]
    dequantize(w4, in_features, dtype) -> W0 [out, in]

with w4 the weight's eight parts as a tuple. The base products and the dequantization serve what computes around
the LoRA kernels on a 4-bit W0 (DoRA's second product with dropout, its row norms: ops/dora_linear.py);
dequantize_rows dequantizes a block of rows (never the whole weight at once).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backends import (FLOAT32_ADAPTERS_ON_HALF, HALF, HALF_AND_FLOAT32, Implementation, compiled_extension,
                        implementation, register, triton_release)
from .definition import Backward, define_op, seed_value
from .lora_linear import _dropout, _kernel_scaling, scaling_graph_input

OP = "lora_linear_4bit"


class ReferenceBackend:
    """reference.py in the backends' calling convention."""

    @staticmethod
    def forward(x, w4, bias, lora_A, lora_B, scaling, p, seed):
        y, xa = reference.lora_linear_4bit(x, *w4, bias, lora_A, lora_B, scaling, p, seed_value(seed))
        return y.contiguous(), xa.contiguous()

    @staticmethod
    def backward(grad_y, x, w4, lora_A, lora_B, xa, scaling, p, seed, need_dx):
        dx, dA, dB = reference.lora_linear_4bit_backward(grad_y, x, *w4, lora_A, lora_B, xa, scaling, p,
                                                         seed_value(seed))
        return (dx.contiguous() if need_dx else x.new_empty(0)), dA.contiguous(), dB.contiguous()

    @staticmethod
    def base_forward(x, w4, bias):
        weight = ReferenceBackend.dequantize(w4, x.shape[1], x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def base_backward(grad, x, w4):
        return grad @ ReferenceBackend.dequantize(w4, x.shape[1], grad.dtype)

    @staticmethod
    def dequantize(w4, in_features, dtype):
        codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize = w4
        return reference.dequantize_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                                         in_features, blocksize, dtype)


def _zero_adapter(x: Tensor, w4) -> tuple[Tensor, Tensor]:
    """A rank-1 adapter of zeros in x's dtype: the fused kernels with it compute the base product alone (its LoRA
    stage costs M·(in + out) flops)."""
    return x.new_zeros(1, x.shape[1]), x.new_zeros(w4[6], 1)


class CompiledBackend:
    """lora_kernels._C's CPU kernels (a scaling in device memory is read here: CPU tensors only).

    Its float32 base product streams the packed weight (panels dequantized to float32, exact, float32 FMAs): DoRA's
    W0 Aᵀ takes it (FLOAT32_BASE_PRODUCT) instead of dequantizing blocks of rows into memory first."""

    FLOAT32_BASE_PRODUCT = True

    @staticmethod
    def forward(x, w4, bias, lora_A, lora_B, scaling, p, seed):
        return torch.ops.lora_kernels.fused_forward_4bit(x, *w4, bias, lora_A, lora_B, float(scaling), p,
                                                         seed_value(seed))

    @staticmethod
    def gained_forward(x, w4, bias, lora_A, lora_B, scaling, gain):
        """(y, xa): y = g ⊙ (x W0ᵀ + s·(x Aᵀ) Bᵀ) + b [M, out] without dropout (QDoRA's forward), g [out] applied
        in the kernel's epilogue; adapters in x's dtype."""
        return torch.ops.lora_kernels.fused_forward_4bit(x, *w4, bias, lora_A, lora_B, float(scaling), 0.0, 0, gain)

    @staticmethod
    def backward(grad_y, x, w4, lora_A, lora_B, xa, scaling, p, seed, need_dx):
        return torch.ops.lora_kernels.fused_backward_4bit(grad_y, x, *w4, lora_A, lora_B, xa, float(scaling), p,
                                                          seed_value(seed), need_dx)

    @staticmethod
    def base_forward(x, w4, bias):
        return torch.ops.lora_kernels.fused_forward_4bit(x, *w4, bias, *_zero_adapter(x, w4), 0.0, 0.0, 0)[0]

    @staticmethod
    def base_backward(grad, x, w4):
        zero_A, zero_B = _zero_adapter(x, w4)
        return torch.ops.lora_kernels.fused_backward_4bit(grad, x, *w4, zero_A, zero_B, x.new_zeros(x.shape[0], 1),
                                                          0.0, 0.0, 0, True)[0]

    @staticmethod
    def dequantize(w4, in_features, dtype):
        return torch.ops.lora_kernels.dequantize_4bit(*w4[:6], w4[6], in_features, w4[7], dtype)


register(Implementation(OP, "reference", "lora_kernels.ops.lora_linear_4bit:ReferenceBackend",
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(OP, "cpu", "lora_kernels.ops.lora_linear_4bit:CompiledBackend", devices=("cpu",),
                        dtypes=HALF_AND_FLOAT32, mixed=FLOAT32_ADAPTERS_ON_HALF))
# The fused Triton GEMMs dequantize W0's tiles in their K loops, looking the codes up with tl.gather (Triton 3.2 and
# later; with an older Triton the reference serves). As for lora_linear, auto takes them for 16-bit x (float32
# adapters included); float32 goes to the reference (the weight dequantized, then cuBLAS).
TRITON_4BIT = triton_release() >= (3, 2)
if TRITON_4BIT:
    register(Implementation(OP, "triton", "lora_kernels.ops.triton_lora_linear:Weight4bitBackend", devices=("cuda",),
                            dtypes=HALF_AND_FLOAT32, auto_dtypes=HALF, mixed=FLOAT32_ADAPTERS_ON_HALF))


def rows_per_block(in_features: int, blocksize: int, elements: int = 1 << 20) -> int:
    """Rows of a 4-bit weight per block of about `elements` elements, such that every block starts a scale block
    (and a byte): a multiple of blocksize / gcd(in_features, blocksize)."""
    align = blocksize // math.gcd(max(1, in_features), blocksize)
    return max(align, elements // max(1, in_features) // align * align)


def dequantize_rows(w4, in_features: int, rows: slice, dtype: torch.dtype) -> Tensor:
    """W0[rows] [rows, in] in dtype (float32, bfloat16 or float16), dequantized by the 4-bit op's backend for the
    weight's device (the reference's bit for bit). rows.start * in_features must be a multiple of the blocksize
    (blocks from rows_per_block are). Double-quantized scales are decoded for these rows only."""
    codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize = w4
    r0, r1 = rows.start, min(rows.stop, out_features)
    e0, e1 = r0 * in_features, r1 * in_features
    if e0 % blocksize:
        raise ValueError(f"dequantize_rows: row {r0} does not start a scale block of {blocksize}")
    b0, b1 = e0 // blocksize, -(-e1 // blocksize)
    if nested_absmax is None:
        scales = absmax[b0:b1]
    else:  # reference.block_scales of these blocks (the same two float32 roundings)
        blocks = torch.arange(b0, b1, device=absmax.device) // reference.NESTED_BLOCKSIZE
        scales = nested_code[absmax[b0:b1].long()] * nested_absmax[blocks] + offset
    part = (codes[e0 // 2:(e1 + 1) // 2], scales, None, None, None, code_table, r1 - r0, blocksize)
    return implementation(OP, codes.device, dtype, dtype).dequantize(part, in_features, dtype)


def forward(x: Tensor, codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
            offset: Optional[Tensor], code_table: Tensor, out_features: int, blocksize: int, bias: Optional[Tensor],
            lora_A: Tensor, lora_B: Tensor, scaling: Tensor, dropout_p: float, seed: Optional[Tensor]
            ) -> tuple[Tensor, Tensor]:
    """(y, xa) on the backend selected for this call (the op's forward entry point)."""
    p, seed = _dropout(dropout_p, seed)
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return implementation(OP, x.device, x.dtype, lora_A.dtype).forward(x, w4, bias, lora_A, lora_B,
                                                                       _kernel_scaling(scaling), p, seed)


def _forward_fake(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize, bias,
                  lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], out_features), lora_A.new_empty(x.shape[0], lora_A.shape[0])


def backward(grad_y: Tensor, x: Tensor, codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
             nested_code: Optional[Tensor], offset: Optional[Tensor], code_table: Tensor, out_features: int,
             blocksize: int, lora_A: Tensor, lora_B: Tensor, xa: Tensor, scaling: Tensor, dropout_p: float,
             seed: Optional[Tensor], need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, dA, dB) on the backend selected for this call."""
    p, seed = _dropout(dropout_p, seed)
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return implementation(OP, x.device, x.dtype, lora_A.dtype).backward(grad_y, x, w4, lora_A, lora_B, xa,
                                                                        _kernel_scaling(scaling), p, seed, need_dx)


def _backward_fake(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize,
                   lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


_W4 = slice(1, 9)  # the weight's parts among the op's inputs
_BIAS, _A, _B = 9, 10, 11


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, seed = inputs[0], inputs[_A], inputs[_B], inputs[14]
    _, xa = output
    codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize = inputs[_W4]
    # x, xa [M, r], the seed and the packed weight (already held by the layer): no dequantized copy is kept
    ctx.save_for_backward(x, codes, absmax, nested_absmax, nested_code, offset, code_table, lora_A, lora_B, xa, seed)
    ctx.out_features, ctx.blocksize = out_features, blocksize
    ctx.scaling, ctx.dropout_p = inputs[12], inputs[13]
    ctx.mark_non_differentiable(xa)


def _gradients(ctx, grad_outputs, run_backward):
    """The gradients of every input: x, bias, lora_A and lora_B (the 4-bit weight is frozen)."""
    grad_y = grad_outputs[0]
    x, codes, absmax, nested_absmax, nested_code, offset, code_table, lora_A, lora_B, xa, seed = ctx.saved_tensors
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, ctx.out_features, ctx.blocksize)
    need = ctx.needs_input_grad
    grads = [None] * 15
    if torch.is_grad_enabled():  # a graph of the backward (double backward): the reference, differentiated
        wrt = [(i, t) for i, t in ((0, x), (_A, lora_A), (_B, lora_B)) if need[i]]
        if wrt:
            p, seed = _dropout(ctx.dropout_p, seed)
            y, _ = reference.lora_linear_4bit(x, *w4, None, lora_A, lora_B, _kernel_scaling(ctx.scaling), p,
                                              seed_value(seed))
            for (i, _), g in zip(wrt, torch.autograd.grad(y, [t for _, t in wrt], grad_y, create_graph=True)):
                grads[i] = g
    else:
        grad_y = grad_y.contiguous()
        dx, dA, dB = run_backward(grad_y, x, *w4, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed, need[0])
        grads[0], grads[_A], grads[_B] = (dx if need[0] else None), (dA if need[_A] else None), \
            (dB if need[_B] else None)
    if need[_BIAS]:
        grads[_BIAS] = grad_y.sum(0)
    return tuple(grads)


def _graph_args(args):
    """Under torch.compile the scaling must be a graph input (a tensor), as for lora_linear (ops/lora_linear.py)."""
    return (*args[:12], scaling_graph_input(args[0], args[12]), *args[13:])


lora_linear_4bit_op = define_op(
    OP, forward, _forward_fake,
    backward=Backward(impl=backward, fake=_backward_fake, setup_context=_setup_context, gradients=_gradients),
    graph_args=_graph_args,
)

if compiled_extension() is not None:  # fakes of the C++ kernels, so that opcheck and torch.compile see through them
    @torch.library.register_fake("lora_kernels::fused_forward_4bit")
    def _(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize, bias, lora_A,
          lora_B, scaling, dropout_p, seed, gain=None):
        return _forward_fake(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                             blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed)

    @torch.library.register_fake("lora_kernels::fused_backward_4bit")
    def _(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize, lora_A,
          lora_B, xa, scaling, dropout_p, seed, need_dx):
        return _backward_fake(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                              blocksize, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)

    @torch.library.register_fake("lora_kernels::dequantize_4bit")
    def _(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, in_features, blocksize, dtype):
        return codes.new_empty((out_features, in_features), dtype=dtype)


# ---- many adapters in one batch on one 4-bit base (the serving case) --------------------------------------------
#
#   lora_linear_multi_4bit_op(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
#                             blocksize, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed)
#       -> (y [M, out], xa [M, r_max])
#
# lora_linear_multi's op (ops/lora_linear_multi.py) with the weight's parts in place of `weight`; its spec is
# reference.lora_linear_multi on the weight dequantized in x's dtype.

MULTI_OP = "lora_linear_multi_4bit"


def _dense(x, w4):
    """The spec's W0: the whole weight dequantized in x's dtype (the reference backend only)."""
    return ReferenceBackend.dequantize(w4, x.shape[1], x.dtype)


class MultiReferenceBackend:
    @staticmethod
    def forward(x, w4, *rest):
        from .lora_linear_multi import ReferenceBackend as Dense

        return Dense.forward(x, _dense(x, w4), *rest)

    @staticmethod
    def backward(grad_y, x, w4, *rest):
        from .lora_linear_multi import ReferenceBackend as Dense

        return Dense.backward(grad_y, x, _dense(x, w4), *rest)


class MultiCompiledBackend:
    @staticmethod
    def forward(x, w4, *rest):
        *head, seed = rest
        return torch.ops.lora_kernels.multi_forward_4bit(x, *w4, *head, seed_value(seed))

    @staticmethod
    def backward(grad_y, x, w4, *rest):
        *head, seed, need_dx = rest
        return torch.ops.lora_kernels.multi_backward_4bit(grad_y, x, *w4, *head, seed_value(seed), need_dx)


register(Implementation(MULTI_OP, "reference", "lora_kernels.ops.lora_linear_4bit:MultiReferenceBackend",
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(MULTI_OP, "cpu", "lora_kernels.ops.lora_linear_4bit:MultiCompiledBackend", devices=("cpu",),
                        dtypes=HALF_AND_FLOAT32, mixed=FLOAT32_ADAPTERS_ON_HALF))
if TRITON_4BIT:
    register(Implementation(MULTI_OP, "triton", "lora_kernels.ops.triton_lora_linear_multi:Weight4bitBackend",
                            devices=("cuda",), dtypes=HALF_AND_FLOAT32, auto_dtypes=HALF,
                            mixed=FLOAT32_ADAPTERS_ON_HALF))


def multi_forward(x: Tensor, codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                  nested_code: Optional[Tensor], offset: Optional[Tensor], code_table: Tensor, out_features: int,
                  blocksize: int, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
                  adapter_ids: Tensor, ranks: Optional[Tensor], dropouts: Optional[Tensor], seed: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor]:
    from .lora_linear_multi import _dropout as multi_dropout

    p, seed = multi_dropout(dropouts, seed, lora_A.shape[0])
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return implementation(MULTI_OP, x.device, x.dtype, lora_A.dtype).forward(
        x, w4, bias, lora_A, lora_B, scalings, adapter_ids, ranks, p, seed)


def _multi_forward_fake(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize,
                        bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
    return x.new_empty(x.shape[0], out_features), lora_A.new_empty(x.shape[0], lora_A.shape[1])


def multi_backward(grad_y: Tensor, x: Tensor, codes: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                   nested_code: Optional[Tensor], offset: Optional[Tensor], code_table: Tensor, out_features: int,
                   blocksize: int, lora_A: Tensor, lora_B: Tensor, xa: Tensor, scalings: Tensor, adapter_ids: Tensor,
                   ranks: Optional[Tensor], dropouts: Optional[Tensor], seed: Optional[Tensor], need_dx: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    from .lora_linear_multi import _dropout as multi_dropout

    p, seed = multi_dropout(dropouts, seed, lora_A.shape[0])
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize)
    return implementation(MULTI_OP, x.device, x.dtype, lora_A.dtype).backward(
        grad_y, x, w4, lora_A, lora_B, xa, scalings, adapter_ids, ranks, p, seed, need_dx)


def _multi_backward_fake(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                         blocksize, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _multi_setup_context(ctx, inputs, output):
    x = inputs[0]
    # x, the packed weight, the adapters, xa and the routing: never drop(x), never the dequantized weight
    ctx.save_for_backward(x, *inputs[1:7], *inputs[_A:], output[1])
    ctx.out_features, ctx.blocksize = inputs[7], inputs[8]
    ctx.mark_non_differentiable(output[1])


def _multi_gradients(ctx, grad_outputs, run_backward):
    """The gradients of every input: x, bias, lora_A and lora_B (the 4-bit weight is frozen)."""
    grad_y = grad_outputs[0]
    x, codes, absmax, nested_absmax, nested_code, offset, code_table, lora_A, lora_B, scalings, adapter_ids, ranks, \
        dropouts, seed, xa = ctx.saved_tensors
    w4 = (codes, absmax, nested_absmax, nested_code, offset, code_table, ctx.out_features, ctx.blocksize)
    need = ctx.needs_input_grad
    grads = [None] * 17
    if torch.is_grad_enabled():  # double backward: the reference, differentiated
        from .lora_linear_multi import _dropout as multi_dropout

        wrt = [(i, t) for i, t in ((0, x), (_A, lora_A), (_B, lora_B)) if need[i]]
        if wrt:
            p, seed = multi_dropout(dropouts, seed, lora_A.shape[0])
            y, _ = reference.lora_linear_multi(x, _dense(x, w4), None, lora_A, lora_B, scalings, adapter_ids, ranks,
                                               p, seed_value(seed))
            found = torch.autograd.grad(y, [t for _, t in wrt], grad_y, create_graph=True, allow_unused=True)
            for (i, t), g in zip(wrt, found):
                grads[i] = g if g is not None else torch.zeros_like(t)
    else:
        dx, dA, dB = run_backward(grad_y.contiguous(), x, *w4, lora_A, lora_B, xa, scalings, adapter_ids, ranks,
                                  dropouts, seed, need[0])
        grads[0], grads[_A], grads[_B] = (dx if need[0] else None), (dA if need[_A] else None), \
            (dB if need[_B] else None)
    if need[_BIAS]:
        grads[_BIAS] = grad_y.sum(0)
    return tuple(grads)


lora_linear_multi_4bit_op = define_op(
    MULTI_OP, multi_forward, _multi_forward_fake,
    backward=Backward(impl=multi_backward, fake=_multi_backward_fake, setup_context=_multi_setup_context,
                      gradients=_multi_gradients),
)

if compiled_extension() is not None:
    @torch.library.register_fake("lora_kernels::multi_forward_4bit")
    def _(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize, bias, lora_A,
          lora_B, scalings, adapter_ids, ranks, dropouts, seed):
        return _multi_forward_fake(x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features,
                                   blocksize, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed)

    @torch.library.register_fake("lora_kernels::multi_backward_4bit")
    def _(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize, lora_A,
          lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx):
        return _multi_backward_fake(grad_y, x, codes, absmax, nested_absmax, nested_code, offset, code_table,
                                    out_features, blocksize, lora_A, lora_B, xa, scalings, adapter_ids, ranks,
                                    dropouts, seed, need_dx)
