"""The fused LoRA linear op: its implementations per backend and its one definition.

    lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y [M, out], xa [M, r])

x is 2-D here (functional.lora_linear checks arguments and flattens leading dims).
`scaling` is a float, or a 0-d tensor: LoRALinear passes its tensor under torch.compile
(a graph input: loading an adapter with another alpha does not recompile) and on a GPU.
A CPU tensor is read here; one on x's CUDA device goes to the kernels, which read it in
device memory (no host sync; a replayed CUDA graph sees its current value). `seed` is a 0-d
int64 tensor drawn on x's device (functional.draw_seed), or None when dropout is off; the
backward regenerates the forward's mask from it, so only x, xa [M, r] and the seed are saved.
Triton reads it in device memory: a captured CUDA graph draws a new seed, hence a new mask, at
every replay. The C++ backends take it as a number (one host read).

Every backend implements the same two functions (reference.py is their spec), with
scaling a float or a 0-d tensor on x's device and seed a 0-d int64 tensor or None (p = 0):

    forward(x, weight, bias, lora_A, lora_B, scaling, p: float, seed) -> (y, xa)
    backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p: float, seed, need_dx: bool)
        -> (dx [M, in] or [0], dA [r, in], dB [out, r])

d_weight (only if the weight requires grad) and d_bias are one ATen op each, here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .. import gpu_paths
from ..backends import (FLOAT32_ADAPTERS_ON_HALF, HALF, HALF_AND_FLOAT32, Implementation, available_implementation,
                        compiled_extension, implementation, register, requested_backend)
from .definition import Backward, define_op, seed_value

OP = "lora_linear"


class ReferenceBackend:
    """reference.py in the backends' calling convention."""

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed):
        y, xa = reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed_value(seed))
        return y.contiguous(), xa.contiguous()

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed, need_dx):
        dx, dA, dB = reference.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p,
                                                    seed_value(seed))
        return (dx.contiguous() if need_dx else x.new_empty(0)), dA.contiguous(), dB.contiguous()


class CompiledBackend:
    """lora_kernels._C (csrc/lora_linear.cpp): the dispatcher runs the CPU or CUDA kernel by the tensors' device.

    The C++ kernels take the scaling as a number (cuBLAS's alpha). A scaling in device memory is
    folded into B instead, by one small kernel and no host read: s·xa Bᵀ = xa (sB)ᵀ, and with sB
    the backward's gb, dx and dA come out scaled; only dB = s·dyᵀ xa is scaled afterwards. sB is
    rounded to B's dtype (float32 in auto, which sends 16-bit tensors to Triton; a float16 sB can overflow).
    """

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, gain=None):
        seed = seed_value(seed)
        if isinstance(scaling, Tensor):
            return torch.ops.lora_kernels.fused_forward(x, weight, bias, lora_A, lora_B * scaling, 1.0, p, seed, gain)
        return torch.ops.lora_kernels.fused_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, gain)

    @staticmethod
    def gained_forward(x, weight, bias, lora_A, lora_B, scaling, gain):
        """(y, xa): y = g ⊙ (x W0ᵀ + s·(x Aᵀ) Bᵀ) + b [M, out] without dropout, g [out] applied in the kernel's
        epilogue (DoRA's forward, ops/dora_linear.py); adapters in x's dtype."""
        return CompiledBackend.forward(x, weight, bias, lora_A, lora_B, scaling, 0.0, None, gain)

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed, need_dx):
        seed = seed_value(seed)
        if isinstance(scaling, Tensor):
            dx, dA, dB = torch.ops.lora_kernels.fused_backward(grad_y, x, weight, lora_A, lora_B * scaling, xa, 1.0,
                                                               p, seed, need_dx)
            return dx, dA, dB.mul_(scaling)
        return torch.ops.lora_kernels.fused_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed,
                                                     need_dx)


# float32 adapters on a 16-bit base (reference.lora_linear's "mixed precision") run on every backend.
register(Implementation(OP, "reference", "lora_kernels.ops.lora_linear:ReferenceBackend",
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(OP, "cpu", "lora_kernels.ops.lora_linear:CompiledBackend", devices=("cpu",),
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(OP, "cuda", "lora_kernels.ops.lora_linear:CompiledBackend", devices=("cuda",),
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
# Triton's dots are float32 at most. auto sends float32 to cuBLAS (the cuda backend): Triton's fp32 GEMM
# configs sit at the 255-register cap (benchmarks/gpu_compile_check.py, sm_90), where cuBLAS's SGEMM is the
# tuned baseline; a forced triton still runs float32. For 16-bit calls without dropout auto chooses between
# the two per shape (_backend, gpu_paths); with dropout or float32 adapters it takes Triton.
register(Implementation(OP, "triton", "lora_kernels.ops.triton_lora_linear", devices=("cuda",),
                        dtypes=HALF_AND_FLOAT32, auto_dtypes=HALF, mixed=FLOAT32_ADAPTERS_ON_HALF))


def _dropout(dropout_p: float, seed: Optional[Tensor]) -> tuple[float, Optional[Tensor]]:
    """(p, seed) as the backends take them: p = 0 when there is no seed (dropout off)."""
    return (dropout_p, seed) if seed is not None else (0.0, None)


def _kernel_scaling(scaling):
    """The scaling as the backends take it: a float, or a 0-d tensor on x's device (read there, not here)."""
    if isinstance(scaling, Tensor) and scaling.device.type != "cpu":
        return scaling
    return float(scaling)


def _backend(step: str, x: Tensor, weight: Tensor, lora_A: Tensor, p: float):
    """The implementation for this call: on a GPU under auto, Triton or cuBLAS by shape (gpu_paths) when both
    can run it; otherwise the registry's choice for x's device and dtype."""
    if x.is_cuda and requested_backend() == "auto":
        name = gpu_paths.path_for(step, x.device.type, x.dtype, lora_A.dtype, p > 0.0, x.shape[0], weight.shape[0],
                                  x.shape[1], lora_A.shape[0])
        chosen = available_implementation(OP, name) if name is not None else None
        if chosen is not None:
            return chosen
    return implementation(OP, x.device, x.dtype, lora_A.dtype)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
            dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y, xa) on the backend selected for this call (the op's forward entry point)."""
    p, seed = _dropout(dropout_p, seed)
    return _backend("forward", x, weight, lora_A, p).forward(x, weight, bias, lora_A, lora_B,
                                                             _kernel_scaling(scaling), p, seed)


def _forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[0])


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
             scaling: Tensor, dropout_p: float, seed: Optional[Tensor], need_dx: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, dA, dB) on the backend selected for this call."""
    p, seed = _dropout(dropout_p, seed)
    return _backend("backward", x, weight, lora_A, p).backward(grad_y, x, weight, lora_A, lora_B, xa,
                                                               _kernel_scaling(scaling), p, seed, need_dx)


def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, xa = output
    # x, xa [M, r] and the seed: never the dropped copy of x. scaling stays as it
    # came (float in eager, tensor for the custom ops) for the matching backward.
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.mark_non_differentiable(xa)


def _gradients(ctx, grad_outputs, run_backward):
    """The gradients of (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed).

    When a graph of the backward is being built (create_graph=True: grad mode is on
    here), the kernels, which have no derivatives of their own, are not used.
    """
    grad_y = grad_outputs[0]
    if torch.is_grad_enabled():
        return _differentiable_gradients(ctx, grad_y)
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
    grad_y = grad_y.contiguous()
    dx, dA, dB = run_backward(grad_y, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed, need_x)
    # The frozen-weight case is the point of LoRA; a trainable weight still gets its gradient.
    d_weight = grad_y.t() @ x if need_w else None
    d_bias = grad_y.sum(0) if need_b else None
    return (dx if need_x else None, d_weight, d_bias, dA if need_a else None, dB if need_b_lora else None,
            None, None, None)


def _differentiable_gradients(ctx, grad_y):
    """Double backward: the first derivatives as a graph of plain PyTorch ops (reference.py's forward,
    recomputed from the saved inputs and differentiated with create_graph=True), so that a gradient
    penalty or a Hessian-vector product through the layer is exact. Slower than the kernels; only
    taken when a graph of the backward is asked for."""
    x, weight, lora_A, lora_B, _, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
    wrt = [(i, t) for i, (t, need) in enumerate(zip((x, weight, lora_A, lora_B), (need_x, need_w, need_a, need_b_lora)))
           if need]
    grads = [None] * 4
    if wrt:
        p, seed = _dropout(ctx.dropout_p, seed)
        y, _ = reference.lora_linear(x, weight, None, lora_A, lora_B, _kernel_scaling(ctx.scaling), p,
                                     seed_value(seed))
        found = torch.autograd.grad(y, [t for _, t in wrt], grad_y, create_graph=True)
        for (i, _), g in zip(wrt, found):
            grads[i] = g
    d_bias = grad_y.sum(0) if need_b else None
    return grads[0], grads[1], d_bias, grads[2], grads[3], None, None, None


def _graph_args(args):
    """Under torch.compile the scaling must be a graph input (a tensor). A float becomes one by a
    multiplication, which Dynamo keeps symbolic (torch.tensor(scaling) would specialise on the
    value and recompile for every new alpha), on x's device when that is a GPU (a CPU tensor in
    the graph would keep Inductor from using CUDA graphs)."""
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = args
    return x, weight, bias, lora_A, lora_B, scaling_graph_input(x, scaling), dropout_p, seed


def scaling_graph_input(x: Tensor, scaling):
    """The scaling as a 0-d float64 tensor for a compiled graph (see _graph_args); a tensor passes as it is."""
    if isinstance(scaling, Tensor):
        return scaling
    device = x.device if x.is_cuda else torch.device("cpu")
    return torch.ones((), dtype=torch.float64, device=device) * scaling


lora_linear_op = define_op(
    OP, forward, _forward_fake,
    backward=Backward(impl=backward, fake=_backward_fake, setup_context=_setup_context, gradients=_gradients),
    graph_args=_graph_args,
)

if compiled_extension() is not None:  # fakes of the C++ kernels, so that opcheck and torch.compile see through them
    @torch.library.register_fake("lora_kernels::fused_forward")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gain=None):
        return _forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)

    @torch.library.register_fake("lora_kernels::fused_backward")
    def _(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
        return _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)
