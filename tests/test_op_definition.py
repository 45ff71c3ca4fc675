"""The per-op backend registry and the op-definition helper, on a toy op defined the way every op is:
a spec, implementations per backend, one registration, one define_op call."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lora_kernels import backends
from lora_kernels.ops.definition import Backward, define_op

TOY = "toy_scaled_square"  # y = s · x², dy/dx = 2 s x


class ToyReference:
    calls = 0

    @staticmethod
    def forward(x, s):
        ToyReference.calls += 1
        return s * x * x


backends.register(backends.Implementation(TOY, "reference", "test_op_definition:ToyReference"))


def _forward(x: Tensor, s: Tensor) -> Tensor:
    return backends.implementation(TOY, x.device, x.dtype).forward(x, float(s))


def _backward(grad_y: Tensor, x: Tensor, s: Tensor) -> Tensor:
    return 2.0 * float(s) * x * grad_y


def _setup_context(ctx, inputs, output):
    x, s = inputs
    ctx.save_for_backward(x)
    ctx.s = s


def _gradients(ctx, grad_outputs, run_backward):
    (x,) = ctx.saved_tensors
    return run_backward(grad_outputs[0], x, ctx.s), None


def _graph_args(args):
    x, s = args
    return x, s if isinstance(s, Tensor) else torch.ones((), dtype=torch.float64) * s


toy_op = define_op(TOY, _forward, lambda x, s: torch.empty_like(x),
                   backward=Backward(impl=_backward, fake=lambda g, x, s: torch.empty_like(x),
                                     setup_context=_setup_context, gradients=_gradients),
                   graph_args=_graph_args)


def test_a_new_op_runs_eager_with_grad_and_compiled():
    x = torch.randn(5, requires_grad=True)
    ToyReference.calls = 0
    with torch.no_grad():
        torch.testing.assert_close(toy_op(x, 3.0), 3.0 * x * x)
    assert ToyReference.calls == 1, "no-grad calls run the implementation itself"
    y = toy_op(x, 3.0)
    assert type(y.grad_fn).__name__.startswith("ToyScaledSquareFunction"), y.grad_fn
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, 6.0 * x)

    compiled = torch.compile(lambda t, s: toy_op(t, s), fullgraph=True, backend="aot_eager")
    y = compiled(x, 2.0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, 4.0 * x)
    torch.library.opcheck(toy_op.custom_op, (x.detach().requires_grad_(), torch.tensor(2.0, dtype=torch.float64)))


def test_forcing_a_backend_that_lacks_the_op_says_so(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    if "cpu" not in backends.available_backends():
        pytest.skip("lora_kernels._C not built")
    with pytest.raises(RuntimeError, match=f"the cpu backend has no implementation of {TOY}"):
        toy_op(torch.randn(3), 2.0)


def test_available_backends_per_op():
    assert backends.available_backends(TOY) == ["reference"]
    for op in ("lora_linear", "merge"):
        assert set(backends.available_backends(op)) == set(backends.available_backends())


@pytest.mark.skipif("triton" not in backends.available_backends(), reason="triton not available here")
def test_dtypes_are_per_op(monkeypatch):
    """Triton's lora_linear has no float64 (its dots are float32 at most), its merge has."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="float64"):
        backends.select("lora_linear", device, torch.float64)
    assert backends.select("merge", device, torch.float64)[0] == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.select("lora_linear", device, torch.float64)[0] != "triton"


def test_unknown_op_and_unknown_backend_are_clear_errors(monkeypatch):
    with pytest.raises(KeyError, match="no implementation of op 'nope'"):
        backends.select("nope", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register(backends.Implementation(TOY, "tpu", "x"))
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.select(TOY, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True), ("3.2.0", "2.5.0", True),  # int() of a 1-element array: numpy 2.4 refuses
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.8.0", "2.5.1", False), ("3.10.0", "2.4.0rc1", False),
])
def test_triton_interpreter_versions_that_cannot_work_are_named(triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter fails inside every kernel with a loop under numpy >= 2.4: the triton
    backend is then unavailable under TRITON_INTERPRET=1, with a reason that names both versions and a fix."""
    problem = backends.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert triton_version in problem and numpy_version in problem and "triton>=3.7 or numpy<2.4" in problem
