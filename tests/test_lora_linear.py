"""lora_linear: every backend against reference.py, outputs and gradients, all dtypes, odd shapes."""

from __future__ import annotations

import pytest
import torch

from lora_kernels import lora_linear, reference
from lora_kernels.functional import draw_seed

from conftest import DEVICE, DTYPES, assert_matches_reference, compiled_backends, make_lora_inputs

SCALING = 2.0
# (leading dims of x, in_features, out_features, r): zero rows, one row, odd sizes,
# ranks 1..64, 3-D input.
SHAPES = [
    ((0,), 33, 70, 3),
    ((1,), 33, 70, 1),
    ((37,), 70, 33, 16),
    ((1000,), 100, 65, 64),
    ((4, 9), 33, 70, 3),
]
# The Triton interpreter is slow: its own small odd shapes (M = 1, 7, 37).
TRITON_SHAPES = [((1,), 33, 70, 1), ((7,), 70, 100, 3), ((37,), 100, 33, 16), ((3, 5), 33, 70, 3)]


def _cases():
    for backend in ["reference"] + compiled_backends():
        for shape in TRITON_SHAPES if backend == "triton" else SHAPES:
            yield backend, shape


def _run(fn, inputs, dropout_p, training, grad_y_seed=1):
    """y and the gradients (x, lora_A, lora_B, bias) of fn under a fixed dropout seed."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in inputs.items()}
    torch.manual_seed(1234)
    y = fn(leaves, dropout_p, training)
    g = torch.Generator().manual_seed(grad_y_seed)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    wrt = [leaves[k] for k in ("x", "lora_A", "lora_B", "bias") if leaves[k] is not None]
    grads = torch.autograd.grad(y, wrt, grad_y) if y.numel() else [torch.zeros_like(t) for t in wrt]
    return y, grads


def _ours(t, dropout_p, training):
    return lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, dropout_p, training)


def _reference(t, dropout_p, training):
    """reference.lora_linear with the seed lora_linear draws after torch.manual_seed(1234)."""
    torch.manual_seed(1234)
    seed = int(draw_seed()) if training and dropout_p > 0 else None
    x2d = t["x"].reshape(-1, t["x"].shape[-1])
    y, _ = reference.lora_linear(x2d, t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, dropout_p, seed)
    return y.view(*t["x"].shape[:-1], t["weight"].shape[0])


def _check_against_reference(inputs, dropout_p, training=True):
    y, grads = _run(_ours, inputs, dropout_p, training)
    y_exact, grads_exact = _run(_reference, {k: v.double() if v is not None else None for k, v in inputs.items()},
                                dropout_p, training)
    y_plain, grads_plain = _run(_reference, inputs, dropout_p, training)
    assert_matches_reference(y, y_exact, y_plain, "y")
    for name, ours, exact, plain in zip(("dx", "dA", "dB", "dbias"), grads, grads_exact, grads_plain):
        assert_matches_reference(ours, exact, plain, name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", list(_cases()), ids=str)
def test_matches_reference(backend, shape, dtype, dropout_p, use_backend):
    use_backend(backend)
    lead, in_f, out_f, r = shape
    _check_against_reference(make_lora_inputs(lead, in_f, out_f, r, dtype), dropout_p)


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_non_contiguous_x_and_no_bias(backend, use_backend):
    use_backend(backend)
    inputs = make_lora_inputs((7, 2), 33, 70, 3, torch.float32, bias=False)
    # every other column of a wider tensor, then transposed leading dims: strided in every dim
    wide = torch.randn(2, 7, 66, dtype=torch.float32, device=DEVICE)
    inputs["x"] = wide[..., ::2].transpose(0, 1)
    assert not inputs["x"].is_contiguous()
    _check_against_reference(inputs, 0.25)


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_eval_mode_ignores_dropout(backend, use_backend):
    use_backend(backend)
    inputs = make_lora_inputs((5,), 33, 70, 3, torch.float32)
    y_eval, _ = _run(_ours, inputs, 0.5, training=False)
    y_nodrop, _ = _run(_ours, inputs, 0.0, training=True)
    torch.testing.assert_close(y_eval, y_nodrop)


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_double_backward_raises_instead_of_returning_wrong_gradients(backend, use_backend):
    """The fused kernels have no derivatives of their own: differentiating the backward must fail loudly."""
    use_backend(backend)
    t = make_lora_inputs((5,), 33, 70, 4, torch.float32)
    for name in ("x", "lora_A", "lora_B"):
        t[name].requires_grad_(True)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 2.0)
    (grad_x,) = torch.autograd.grad(y.pow(2).sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.pow(2).sum().backward()


def test_trainable_weight_gets_its_gradient():
    t = make_lora_inputs((6,), 33, 70, 3, torch.float64)
    w = t["weight"].clone().requires_grad_(True)
    w_ref = t["weight"].clone().requires_grad_(True)
    y = lora_linear(t["x"], w, t["bias"], t["lora_A"], t["lora_B"], SCALING)
    y_ref, _ = reference.lora_linear(t["x"], w_ref, t["bias"], t["lora_A"], t["lora_B"], SCALING)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.skipif("cpu" not in compiled_backends(), reason="lora_kernels._C not built")
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p, use_backend):
    use_backend("cpu")
    t = make_lora_inputs((5,), 7, 6, 2, torch.float64)
    args = [t[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "lora_A", "lora_B")]

    def fn(x, weight, bias, lora_A, lora_B):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return lora_linear(x, weight, bias, lora_A, lora_B, 1.5, dropout_p, training=True)

    assert torch.autograd.gradcheck(fn, args)
