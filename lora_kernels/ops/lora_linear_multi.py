"""Many adapters in one batch (segmented LoRA): its implementations per backend and its one definition.

    lora_linear_multi_op(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed)
        -> (y [M, out], xa [M, r_max])

x [M, in]; lora_A [n, r_max, in], lora_B [n, out, r_max], scalings [n] (a tensor: new alphas do not
recompile), adapter_ids [M] int64 in [-1, n) (-1: the base layer only), ranks [n] int64 in [1, r_max]
or None, dropouts [n] (each adapter's dropout probability, float64 on the CPU) with a seed, or None
without one (so that no CPU tensor enters a compiled graph that does not drop: Inductor would not use
CUDA graphs for it).
reference.lora_linear_multi is the spec. Only x, xa and the dropout seed are saved for the
backward, as for lora_linear.

Every backend implements:

    forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed) -> (y, xa)
    backward(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx)
        -> (dx [M, in] or [0], dA [n, r_max, in], dB [n, out, r_max])

with seed a 0-d int64 tensor drawn on x's device (read there by Triton, as a number by the others) or
None when nothing drops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backends import (FLOAT32_ADAPTERS_ON_HALF, HALF, HALF_AND_FLOAT32, Implementation, compiled_extension,
                        implementation, register)
from .definition import Backward, define_op, seed_value

OP = "lora_linear_multi"


def _dropout(dropouts: Optional[Tensor], seed: Optional[Tensor], n: int) -> tuple[Tensor, Optional[Tensor]]:
    """(dropouts, seed) as the backends take them: all zero when there is no seed (dropout off)."""
    if seed is None or dropouts is None:
        return torch.zeros(n, dtype=torch.float64), None
    return dropouts, seed


class ReferenceBackend:
    """reference.py in the backends' calling convention."""

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
        _check_ids_and_ranks(adapter_ids, ranks, lora_A)
        y, xa = reference.lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts,
                                            seed_value(seed))
        return y.contiguous(), xa.contiguous()

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx):
        dx, dA, dB = reference.lora_linear_multi_backward(grad_y, x, weight, lora_A, lora_B, xa, scalings,
                                                          adapter_ids, ranks, dropouts, seed_value(seed))
        return (dx.contiguous() if need_dx else x.new_empty(0)), dA.contiguous(), dB.contiguous()


def _check_ids_and_ranks(adapter_ids: Tensor, ranks: Optional[Tensor], lora_A: Tensor) -> None:
    """The value checks (they read the tensors: the C++ kernels make the same checks on the host)."""
    n, r_max = lora_A.shape[:2]
    if adapter_ids.numel() and not (-1 <= int(adapter_ids.min()) and int(adapter_ids.max()) < n):
        raise ValueError(f"adapter_ids must be in [-1, {n}) (n = lora_A.shape[0] adapters), got values in "
                         f"[{int(adapter_ids.min())}, {int(adapter_ids.max())}]")
    if ranks is not None and ranks.numel() and not (1 <= int(ranks.min()) and int(ranks.max()) <= r_max):
        raise ValueError(f"ranks must be in [1, r_max={r_max}], got values in [{int(ranks.min())}, {int(ranks.max())}]")


class CompiledBackend:
    """lora_kernels._C (csrc/lora_linear_multi.cpp): rows grouped by adapter on the host, each adapter's A and B
    read once, the base GEMM over the whole batch."""

    @staticmethod
    def forward(*args):
        *head, seed = args
        return torch.ops.lora_kernels.multi_forward(*head, seed_value(seed))

    @staticmethod
    def backward(*args):
        *head, seed, need_dx = args
        return torch.ops.lora_kernels.multi_backward(*head, seed_value(seed), need_dx)


register(Implementation(OP, "reference", "lora_kernels.ops.lora_linear_multi:ReferenceBackend",
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(OP, "cpu", "lora_kernels.ops.lora_linear_multi:CompiledBackend", devices=("cpu",),
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
register(Implementation(OP, "cuda", "lora_kernels.ops.lora_linear_multi:CompiledBackend", devices=("cuda",),
                        mixed=FLOAT32_ADAPTERS_ON_HALF))
# As for lora_linear: auto takes Triton for 16-bit batches (float32 adapters included) and cuBLAS (the cuda
# backend) for float32; the Triton launchers group the rows on the GPU, with no host sync.
register(Implementation(OP, "triton", "lora_kernels.ops.triton_lora_linear_multi", devices=("cuda",),
                        dtypes=HALF_AND_FLOAT32, auto_dtypes=HALF, mixed=FLOAT32_ADAPTERS_ON_HALF))


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
            adapter_ids: Tensor, ranks: Optional[Tensor], dropouts: Optional[Tensor], seed: Optional[Tensor]
            ) -> tuple[Tensor, Tensor]:
    """(y, xa) on the backend selected for x's device and dtype (the op's forward entry point)."""
    p, seed = _dropout(dropouts, seed, lora_A.shape[0])
    return implementation(OP, x.device, x.dtype, lora_A.dtype).forward(
        x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, p, seed)


def _forward_fake(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[1])


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, scalings: Tensor,
             adapter_ids: Tensor, ranks: Optional[Tensor], dropouts: Optional[Tensor], seed: Optional[Tensor],
             need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or an empty tensor, dA, dB) on the backend selected for x's device and dtype."""
    p, seed = _dropout(dropouts, seed, lora_A.shape[0])
    return implementation(OP, x.device, x.dtype, lora_A.dtype).backward(
        grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, p, seed, need_dx)


def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scalings, adapter_ids, ranks, dropouts, seed)
    ctx.mark_non_differentiable(output[1])


_NO_GRADIENT = (None,) * 5  # scalings, adapter_ids, ranks, dropouts, seed


def _gradients(ctx, grad_outputs, run_backward):
    """The gradients of (x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed)."""
    grad_y = grad_outputs[0]
    x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():  # a graph of the backward is wanted (double backward): plain PyTorch ops
        return _differentiable_gradients(ctx, grad_y)
    grad_y = grad_y.contiguous()
    dx, dA, dB = run_backward(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed,
                              need_x)
    d_weight = grad_y.t() @ x if need_w else None
    d_bias = grad_y.sum(0) if need_b else None
    return (dx if need_x else None, d_weight, d_bias, dA if need_a else None, dB if need_b_lora else None,
            *_NO_GRADIENT)


def _differentiable_gradients(ctx, grad_y):
    """Double backward: reference.lora_linear_multi recomputed from the saved inputs and differentiated
    with create_graph=True (as lora_linear does)."""
    x, weight, lora_A, lora_B, _, scalings, adapter_ids, ranks, dropouts, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    wanted = [(i, t) for i, t in zip((0, 1, 3, 4), (x, weight, lora_A, lora_B)) if need[i]]
    grads = {}
    if wanted:
        p, seed = _dropout(dropouts, seed, lora_A.shape[0])
        y, _ = reference.lora_linear_multi(x, weight, None, lora_A, lora_B, scalings, adapter_ids, ranks, p,
                                           seed_value(seed))
        found = torch.autograd.grad(y, [t for _, t in wanted], grad_y, create_graph=True, allow_unused=True)
        grads = {i: g if g is not None else torch.zeros_like(t) for (i, t), g in zip(wanted, found)}
    d_bias = grad_y.sum(0) if need[2] else None
    return grads.get(0), grads.get(1), d_bias, grads.get(3), grads.get(4), *_NO_GRADIENT


lora_linear_multi_op = define_op(
    OP, forward, _forward_fake,
    backward=Backward(impl=backward, fake=_backward_fake, setup_context=_setup_context, gradients=_gradients),
)

if compiled_extension() is not None:  # fakes of the C++ kernels, so that opcheck and torch.compile see through them
    @torch.library.register_fake("lora_kernels::multi_forward")
    def _(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed):
        return _forward_fake(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed)

    @torch.library.register_fake("lora_kernels::multi_backward")
    def _(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed, need_dx):
        return _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts, seed,
                              need_dx)
