"""The fused LoRA linear: backend dispatch, custom ops for torch.compile, autograd.

    forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y [M, out], xa [M, r])
    backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)
        -> (dx [M, in] or [0], dA [r, in], dB [out, r])

x is 2-D here (functional.lora_linear flattens leading dims and checks arguments).
`scaling` is a float in eager mode; the custom ops take it as a 0-d float64 CPU
tensor, so that torch.compile sees a graph input rather than a constant and
loading an adapter with another alpha does not recompile.
`seed` is a 0-d int64 CPU tensor, or None when dropout is off; the backward gets
the same seed and regenerates the same mask, so only x, xa [M, r] and the seed
are saved. dx, dA and dB come from the backend; d_weight (only if the weight
requires grad) and d_bias are one ATen op each.

Two entry points share `forward` / `backward`:
- the custom ops lora_kernels::lora_linear_fwd / _bwd (torch.library: fake
  tensors, registered autograd), which torch.compile traces without graph breaks;
- LoRALinearFunction, a plain autograd.Function used in eager mode. The custom-op
  dispatcher costs ~65 µs per call when the weight streams through the caches
  (CPU, M=1, 4096x4096: benchmarks/NOTES.md), 2.5% of that layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backends import select_backend


def _triton():
    from . import triton_lora_linear  # imported on first use: triton is optional

    return triton_lora_linear


def forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: Optional[Tensor]):
    """(y, xa) on the backend selected for x's device and dtype."""
    backend = select_backend(x.device, x.dtype)
    seed_value = int(seed) if seed is not None else 0
    p = dropout_p if seed is not None else 0.0
    if backend in ("cpu", "cuda"):
        return torch.ops.lora_kernels.fused_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed_value)
    if backend == "triton":
        return _triton().forward(x, weight, bias, lora_A, lora_B, scaling, p, seed_value)
    y, xa = reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed_value)
    return y.contiguous(), xa.contiguous()


def backward(grad_y, x, weight, lora_A, lora_B, xa, scaling: float, dropout_p: float, seed: Optional[Tensor],
             need_dx: bool):
    """(dx or an empty tensor, dA, dB) on the backend selected for x's device and dtype."""
    backend = select_backend(x.device, x.dtype)
    seed_value = int(seed) if seed is not None else 0
    p = dropout_p if seed is not None else 0.0
    if backend in ("cpu", "cuda"):
        return torch.ops.lora_kernels.fused_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed_value,
                                                     need_dx)
    if backend == "triton":
        return _triton().backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed_value, need_dx)
    dx, dA, dB = reference.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, p, seed_value)
    dx = dx.contiguous() if need_dx else x.new_empty(0)
    return dx, dA.contiguous(), dB.contiguous()


def _input_grads(needs_input_grad, grad_y, x, dx, dA, dB):
    """The gradient tuple for (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)."""
    need_x, need_w, need_b, need_a, need_b_lora = needs_input_grad[:5]
    # The frozen-weight case is the point of LoRA; a trainable weight still gets its gradient.
    d_weight = grad_y.t() @ x if need_w else None
    d_bias = grad_y.sum(0) if need_b else None
    return (dx if need_x else None, d_weight, d_bias, dA if need_a else None, dB if need_b_lora else None,
            None, None, None)


# ---------------------------------------------------------------------------
# custom ops (torch.compile)


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    return forward(x, weight, bias, lora_A, lora_B, float(scaling), dropout_p, seed)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    xa: Tensor,
    scaling: Tensor,
    dropout_p: float,
    seed: Optional[Tensor],
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return backward(grad_y, x, weight, lora_A, lora_B, xa, float(scaling), dropout_p, seed, need_dx)


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx):
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


def _backward_from_context(ctx, grad_y, run_backward):
    """The input gradients from what _setup_context saved; run_backward is `backward` or its custom op.

    When a graph of the backward is being built (create_graph=True: grad mode is on
    here), the kernels, which have no derivatives of their own, are not used.
    """
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, grad_y)
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    dx, dA, dB = run_backward(grad_y, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed,
                              ctx.needs_input_grad[0])
    return _input_grads(ctx.needs_input_grad, grad_y, x, dx, dA, dB)


def _differentiable_backward(ctx, grad_y):
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
        scaling = ctx.scaling.item() if isinstance(ctx.scaling, Tensor) else ctx.scaling
        p = ctx.dropout_p if seed is not None else 0.0
        y, _ = reference.lora_linear(x, weight, None, lora_A, lora_B, scaling, p, int(seed) if seed is not None else None)
        found = torch.autograd.grad(y, [t for _, t in wrt], grad_y, create_graph=True)
        for (i, _), g in zip(wrt, found):
            grads[i] = g
    d_bias = grad_y.sum(0) if need_b else None
    return grads[0], grads[1], d_bias, grads[2], grads[3], None, None, None


def _custom_op_backward(ctx, grad_y, _grad_xa):
    return _backward_from_context(ctx, grad_y, lora_linear_bwd)


lora_linear_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# eager autograd


class LoRALinearFunction(torch.autograd.Function):
    """Eager-mode twin of the custom ops: same forward/backward, no dispatcher round trip.

    forward takes ctx (the old style) on purpose: with a separate setup_context,
    which torch.func transforms require, torch 2.14's Function.apply binds the
    arguments through inspect.signature on every call, +140 µs per training step
    at M = 1 on the CPU measured (benchmarks/NOTES.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y, xa = forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed), (y, xa))
        return y, xa

    @staticmethod
    def backward(ctx, grad_y, _grad_xa):
        return _backward_from_context(ctx, grad_y, backward)
