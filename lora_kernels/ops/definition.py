"""One definition of an op: its torch.library custom op (fake + registered autograd) for
torch.compile, its eager autograd.Function, and the routing between them and a plain call.

    op = define_op("lora_linear", forward, forward_fake,
                   backward=Backward(impl=..., fake=..., setup_context=..., gradients=...),
                   graph_args=...)
    y, xa = op(x, weight, ...)

How a call is routed (decided here, once, for every op):
- under torch.compile: the custom op, which Dynamo traces without a graph break;
  `graph_args` first turns arguments that must be graph inputs into tensors;
- eager, with a gradient to compute: the autograd.Function, which runs the same
  implementation without a dispatcher round trip (65–140 µs per call on CPU,
  measured: benchmarks/NOTES.md);
- eager, nothing to differentiate: the implementation itself, no autograd
  bookkeeping at all;
- an op that mutates an argument always goes through its custom op, whose
  dispatcher bumps the argument's version counter (autograd then notices an
  in-place change of a tensor it saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

NAMESPACE = "lora_kernels"


@dataclass(frozen=True)
class Backward:
    """How an op differentiates.

    impl / fake: the backward entry point (its kernels chosen by backend) and its
      fake; it becomes the custom op `<name>_backward`.
    setup_context(ctx, inputs, output): saves what the backward needs.
    gradients(ctx, grad_outputs, run_backward): the gradients of every input,
      where run_backward is `impl` in eager mode and its custom op when compiled.
    """

    impl: Callable
    fake: Callable
    setup_context: Callable
    gradients: Callable


class DefinedOp:
    """A callable op with one implementation entry point and every way torch runs it (see module docstring)."""

    def __init__(self, name: str, impl: Callable, fake: Callable, mutates_args: Sequence[str] = (),
                 backward: Backward | None = None, graph_args: Callable | None = None):
        self.name = name
        self.impl = impl
        self.mutates = bool(mutates_args)
        self.graph_args = graph_args
        self.custom_op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(impl)
        self.custom_op.register_fake(fake)
        self.backward_op = None
        self.function = None
        if backward is not None:
            self.backward_op = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", mutates_args=())(backward.impl)
            self.backward_op.register_fake(backward.fake)
            backward_op = self.backward_op

            def compiled_backward(ctx, *grad_outputs):
                return backward.gradients(ctx, grad_outputs, backward_op)

            self.custom_op.register_autograd(compiled_backward, setup_context=backward.setup_context)
            self.function = _eager_function(name, impl, backward)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.custom_op(*(self.graph_args(args) if self.graph_args else args))
        if self.mutates:
            return self.custom_op(*args)
        if self.function is not None and torch.is_grad_enabled() and any(
                isinstance(a, Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return self.impl(*args)


def define_op(name: str, impl: Callable, fake: Callable, *, mutates_args: Sequence[str] = (),
              backward: Backward | None = None, graph_args: Callable | None = None) -> DefinedOp:
    """Define op `lora_kernels::<name>` (and `<name>_backward`); see DefinedOp."""
    return DefinedOp(name, impl, fake, mutates_args, backward, graph_args)


def _eager_function(name: str, impl: Callable, backward: Backward) -> type[torch.autograd.Function]:
    """The eager twin of the custom op's autograd: same implementation, same saved state, same gradients.

    forward takes ctx (the old style) on purpose: with a separate setup_context,
    which torch.func transforms require, torch 2.14's Function.apply binds the
    arguments through inspect.signature on every call (+140 µs per training step
    at M = 1 on the CPU, measured: benchmarks/NOTES.md).
    """

    def forward(ctx, *args):
        output = impl(*args)
        backward.setup_context(ctx, args, output)
        return output

    def backward_(ctx, *grad_outputs):
        return backward.gradients(ctx, grad_outputs, backward.impl)

    class_name = "".join(part.capitalize() for part in name.split("_")) + "Function"
    return type(class_name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_)})


def seed_value(seed: Tensor | None) -> int:
    """A dropout seed (0-d int64 tensor, any device) as a number, for the backends that take one; 0 for None."""
    return int(seed) if seed is not None else 0
