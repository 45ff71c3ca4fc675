"""lora_linear: every backend against reference.py, outputs and gradients, all dtypes, odd shapes."""

from __future__ import annotations

import pytest
import torch

from lora_kernels import lora_linear, reference, testing
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
# Ranks above the kernels' rank chunk (64) run in several chunks: r = 80 at decode size, r = 130 at prefill.
TRITON_SHAPES = [((0,), 33, 70, 3), ((1,), 33, 70, 1), ((7,), 70, 100, 3), ((37,), 100, 33, 16), ((3, 5), 33, 70, 3),
                 ((5,), 40, 36, 80), ((20,), 33, 40, 130)]


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
    grads = torch.autograd.grad(y, wrt, grad_y)  # zero rows too: their backward must give zero gradients
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
    names = ("y", "dx", "dA", "dB", "dbias")[:1 + len(grads)]
    testing.assert_all_match_reference(names, (y, *grads), (y_exact, *grads_exact), (y_plain, *grads_plain))


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


def _plain_lora(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0):
    """The textbook formula in plain PyTorch ops (what PEFT computes), differentiable to any order."""
    dropped = x if keep is None else x * keep.to(x.dtype) / (1 - p)
    return x @ weight.t() + bias + scaling * (dropped @ lora_A.t()) @ lora_B.t()


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("upstream", ["constant", "dependent"])
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_double_backward_matches_plain_pytorch(backend, upstream, dropout_p, use_backend):
    """A gradient penalty through the layer: second derivatives reach x, A, B and bias exactly as
    through plain PyTorch, whether or not the upstream gradient itself depends on the inputs
    (y.sum() gives a constant one, which once_differentiable used to let through silently)."""
    use_backend(backend)
    t = make_lora_inputs((5,), 33, 70, 4, torch.float32)
    names = ("x", "bias", "lora_A", "lora_B")

    def penalty_grads(fn, tensors):
        leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in tensors.items()}
        torch.manual_seed(7)
        y = fn(leaves)
        out = y.sum() if upstream == "constant" else y.pow(2).sum()
        (grad_x,) = torch.autograd.grad(out, leaves["x"], create_graph=True)
        assert grad_x.requires_grad, "the first derivative lost its graph"
        penalty = grad_x.pow(2).sum() + out
        return torch.autograd.grad(penalty, [leaves[k] for k in names], allow_unused=True)

    ours = penalty_grads(lambda v: lora_linear(v["x"], v["weight"], v["bias"], v["lora_A"], v["lora_B"], SCALING,
                                               dropout_p, training=True), t)
    torch.manual_seed(7)
    seed = int(draw_seed()) if dropout_p else None
    keep = reference.dropout_mask(seed, 5, 33, dropout_p) if dropout_p else None
    exact = penalty_grads(lambda v: _plain_lora(v["x"], v["weight"], v["bias"], v["lora_A"], v["lora_B"], SCALING,
                                                keep, dropout_p), {k: v.double() for k, v in t.items()})
    for name, g, e in zip(names, ours, exact):
        e = torch.zeros_like(e) if e is None else e
        g = torch.zeros_like(e) if g is None else g
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"d penalty / d {name}: {m}")


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_float16_large_scaling_keeps_lora_intermediates_in_float32(backend, use_backend):
    """x = 4, A = 1, B = 2⁻¹², s = 3000, in = 16: s·xa = 192000 overflows float16 but y = 46.875 does not.
    In the backward, dy B with a tiny B sinks into float16's subnormals unless kept in float32."""
    use_backend(backend)
    x = torch.full((3, 16), 4.0, dtype=torch.float16, device=DEVICE)
    weight = torch.zeros(8, 16, dtype=torch.float16, device=DEVICE)
    lora_A = torch.ones(2, 16, dtype=torch.float16, device=DEVICE)
    lora_B = torch.full((8, 2), 2.0**-13, dtype=torch.float16, device=DEVICE)
    y = lora_linear(x, weight, None, lora_A, lora_B, 3000.0)
    assert torch.equal(y, torch.full_like(y, 46.875)), y

    g = torch.Generator().manual_seed(0)
    t = {k: v.to(DEVICE) for k, v in dict(
        x=torch.randn(9, 16, generator=g), weight=torch.randn(8, 16, generator=g) / 4,
        lora_A=torch.randn(2, 16, generator=g) / 4, lora_B=torch.randn(8, 2, generator=g) * 2.0**-14).items()}
    grad_y = torch.randn(9, 8, generator=g).to(DEVICE) * 2.0**-6

    def grads(dtype, fn):
        leaves = {k: v.to(dtype).requires_grad_(k != "weight") for k, v in t.items()}
        fn(leaves).backward(grad_y.to(dtype))
        return [leaves[k].grad.double() for k in ("x", "lora_A", "lora_B")]

    ours = grads(torch.float16, lambda v: lora_linear(v["x"], v["weight"], None, v["lora_A"], v["lora_B"], 3000.0))
    exact = grads(torch.float64, lambda v: _plain_lora(v["x"], v["weight"], 0.0, v["lora_A"], v["lora_B"], 3000.0))
    for name, o, e in zip(("dx", "dA", "dB"), ours, exact):
        rel = ((o - e).abs().max() / e.abs().max()).item()
        assert rel < 4e-3, f"{name}: relative error {rel:.2e} (16-bit intermediates give ~7e-2)"


@pytest.mark.parametrize("where", ["x", "lora_A", "lora_B"])
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_zero_scaling_still_propagates_nan(backend, where, use_backend):
    """scaling = 0 multiplies the LoRA term, as in F.linear-style arithmetic: 0 · NaN is NaN.
    (BLAS skips a product whose alpha is 0, which used to hide it on the cpu backend.)"""
    use_backend(backend)
    t = make_lora_inputs((5,), 12, 10, 3, torch.float32)
    t[where][1, 2] = float("nan")
    leaves = {k: v.clone().requires_grad_(k != "weight") for k, v in t.items()}
    y = lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], 0.0)
    leaves64 = {k: v.double().requires_grad_(k != "weight") for k, v in t.items()}
    expected = _plain_lora(leaves64["x"], leaves64["weight"], leaves64["bias"], leaves64["lora_A"],
                           leaves64["lora_B"], 0.0)
    assert torch.equal(y.isnan(), expected.isnan()) and expected.isnan().any()
    grad_y = torch.ones_like(y)
    y.backward(grad_y)
    expected.backward(grad_y.double())
    for k in ("x", "lora_A", "lora_B"):
        assert torch.equal(leaves[k].grad.isnan(), leaves64[k].grad.isnan()), f"d{k}: NaN pattern differs"


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")  # the interpreter computes the Inf/NaN asked for, and numpy warns
@pytest.mark.parametrize("rows", [1, 20], ids=["decode", "prefill"])
@pytest.mark.parametrize("r", [3, 16])
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_infinite_input_gives_the_references_inf_and_nan_pattern(backend, r, rows, use_backend):
    """+Inf in x: the output has Inf/NaN exactly where the float64 formula has them, and the
    other entries are right (zero-padded rank lanes must not turn 0·Inf into NaN across a row)."""
    use_backend(backend)
    t = make_lora_inputs((rows,), 33, 20, r, torch.float32)
    t["weight"] = t["weight"].abs()  # all-positive columns: x·W0 is +Inf, never Inf - Inf
    t["lora_B"] = t["lora_B"].abs()
    t["lora_A"] = t["lora_A"].abs()
    t["x"][0, 5] = float("inf")
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING)
    expected = _plain_lora(*(t[k].double() for k in ("x", "weight", "bias", "lora_A", "lora_B")), SCALING)
    assert torch.equal(y.isnan(), expected.isnan()), "NaN where the formula has none"
    assert torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(y.double()[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_zero_in_features_returns_the_bias(backend, use_backend):
    """in_features = 0 is an empty sum, as F.linear has it: y = bias; gradients are empty or zero."""
    use_backend(backend)
    x = torch.randn(2, 3, 0, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 0, device=DEVICE)
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    lora_A = torch.randn(2, 0, device=DEVICE, requires_grad=True)
    lora_B = torch.randn(5, 2, device=DEVICE, requires_grad=True)
    y = lora_linear(x, weight, bias, lora_A, lora_B, SCALING)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))
    y.sum().backward()
    assert x.grad.shape == x.shape and lora_A.grad.shape == lora_A.shape
    assert torch.equal(lora_B.grad, torch.zeros_like(lora_B)) and torch.equal(bias.grad, torch.full_like(bias, 6.0))


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


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend", [b for b in ["reference"] + compiled_backends() if b != "triton"])
def test_float64_is_float64_accurate(backend, dropout_p, use_backend):
    """float64 output and gradients agree with the float64 reference to float64 precision, dropout included
    (a float32 1/(1-p) in the cpu mask used to leave errors of ~1e-8)."""
    use_backend(backend)
    inputs = make_lora_inputs((23,), 40, 31, 5, torch.float64)
    y, grads = _run(_ours, inputs, dropout_p, training=True)
    y_ref, grads_ref = _run(_reference, inputs, dropout_p, training=True)
    for name, ours, ref in zip(("y", "dx", "dA", "dB", "dbias"), (y, *grads), (y_ref, *grads_ref)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


# -- float32 adapters on a 16-bit base (PEFT's default for float16/bfloat16 models) ---------------------

def _mixed_backends():
    return ["reference"] + compiled_backends()


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [((37,), 70, 33, 16), ((4, 9), 33, 70, 3), ((1,), 33, 70, 1), ((0,), 33, 70, 3)],
                         ids=str)
@pytest.mark.parametrize("backend", _mixed_backends())
def test_float32_adapters_on_half_base_match_the_reference(backend, shape, dtype, dropout_p, use_backend):
    """Outputs in the base dtype, float32 gradients for A and B, each within the rule against a float64 oracle."""
    use_backend(backend)
    lead, in_f, out_f, r = shape
    inputs = make_lora_inputs(lead, in_f, out_f, r, dtype)
    inputs["lora_A"], inputs["lora_B"] = (make_lora_inputs(lead, in_f, out_f, r, torch.float32, seed=5)[k]
                                          for k in ("lora_A", "lora_B"))
    y, grads = _run(_ours, inputs, dropout_p, True)
    assert y.dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32 and grads[0].dtype == dtype
    _check_against_reference(inputs, dropout_p)


@pytest.mark.parametrize("backend", _mixed_backends())
def test_float32_adapters_keep_their_precision(backend, use_backend):
    """The LoRA branch is computed from the float32 A and B, not from copies rounded to bfloat16:
    with W0 = 0 and no bias, y is the LoRA term rounded once to bfloat16 (half an ulp), where
    bfloat16 copies of A and B would be off by several ulp."""
    use_backend(backend)
    inputs = make_lora_inputs((64,), 48, 40, 8, torch.bfloat16, bias=False)
    x, weight = inputs["x"], torch.zeros_like(inputs["weight"])
    g = torch.Generator().manual_seed(3)
    lora_A = (torch.randn(8, 48, dtype=torch.float64, generator=g) / 7).float()
    lora_B = (torch.randn(40, 8, dtype=torch.float64, generator=g) / 3).float()
    exact = 1.7 * (x.double() @ lora_A.double().t()) @ lora_B.double().t()
    magnitude = 1.7 * (x.double().abs() @ lora_A.double().abs().t()) @ lora_B.double().abs().t()
    y = lora_linear(x, weight, None, lora_A, lora_B, 1.7)
    # half an ulp of bfloat16, plus float32's own rounding of the sums (cancellation included)
    bound = 0.5 * testing.ulp(exact, torch.bfloat16) + 1e-5 * magnitude
    assert ((y.double() - exact).abs() <= bound).all()
    y_rounded = lora_linear(x, weight, None, lora_A.bfloat16(), lora_B.bfloat16(), 1.7)
    assert ((y_rounded.double() - exact).abs() > bound).sum() > 10  # what the test would catch


def test_mixed_adapter_dtypes_are_refused_by_name():
    inputs = make_lora_inputs((3,), 16, 8, 2, torch.bfloat16)
    with pytest.raises(TypeError, match="lora_B must have lora_A's dtype"):
        lora_linear(inputs["x"], inputs["weight"], None, inputs["lora_A"].float(), inputs["lora_B"], 1.0)
    with pytest.raises(TypeError, match=r"lora_A must have x's dtype torch.float32, got torch.float64"):
        lora_linear(inputs["x"].float(), inputs["weight"].float(), None, inputs["lora_A"].double(),
                    inputs["lora_B"].double(), 1.0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("rows", [3, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_scaling_read_from_memory_gives_the_floats_results(backend, dtype, rows, dropout_p, use_backend):
    """During CUDA-graph capture and under torch.compile on a GPU, the backends get the scaling as a
    0-d tensor on x's device and read it there (a replayed graph sees its current value). Here a CPU
    tensor is handed to each backend directly, as the op hands it a GPU one: Triton and the reference
    only read s from elsewhere (bit for bit the float's results, and an in-place change is seen);
    the C++ kernels fold it into B (within the float64 oracle's budget)."""
    from lora_kernels.backends import implementation

    use_backend(backend)
    t = make_lora_inputs((rows,), 70, 33, 16, dtype, bias=True, seed=rows)
    x, w, b, A, B = t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]
    grad_y = make_lora_inputs((rows,), 33, 1, 1, dtype, seed=rows + 1)["x"]
    impl = implementation("lora_linear", x.device, dtype)
    seed = 77 if dropout_p else 0

    def run(scaling):
        y, xa = impl.forward(x, w, b, A, B, scaling, dropout_p, seed)
        return (y, xa, *impl.backward(grad_y, x, w, A, B, xa, scaling, dropout_p, seed, True))

    in_memory = torch.tensor(SCALING, dtype=torch.float64)
    ours, as_float = run(in_memory), run(SCALING)
    exact = [v.double() for v in reference.lora_linear(*(v.double() for v in (x, w, b, A, B)), SCALING, dropout_p,
                                                        seed if dropout_p else None)]
    exact += reference.lora_linear_backward(grad_y.double(), x.double(), w.double(), A.double(), B.double(), exact[1],
                                            SCALING, dropout_p, seed if dropout_p else None)
    for name, got, float_got, oracle in zip(("y", "xa", "dx", "dA", "dB"), ours, as_float, exact):
        if backend in ("triton", "reference"):
            assert torch.equal(got, float_got), name
        else:
            assert_matches_reference(got, oracle, float_got, name)
    in_memory.fill_(-0.5)  # what a replayed graph sees after layer.scaling = -0.5
    for name, got, float_got in zip(("y", "xa", "dx", "dA", "dB"), run(in_memory), run(-0.5)):
        if backend in ("triton", "reference"):
            assert torch.equal(got, float_got), name
        else:
            torch.testing.assert_close(got, float_got, msg=name)


def test_argument_checks_never_read_a_device_scaling():
    """A scaling on the GPU is checked for shape, dtype and device only: reading its value would wait for the
    GPU on every call and fail inside CUDA-graph capture. Meta tensors stand in for GPU ones (any read raises)."""
    from lora_kernels import validation

    meta = dict(device="meta")
    args = (torch.empty(5, 8, **meta), torch.empty(6, 8, **meta), torch.empty(6, **meta), torch.empty(2, 8, **meta),
            torch.empty(6, 2, **meta), torch.empty((), dtype=torch.float64, **meta), 0.1)
    assert validation.plain_valid_call(*args)
    assert len(validation.check_and_autocast(*args)) == 5


@pytest.mark.skipif("cpu" not in compiled_backends(), reason="needs lora_kernels._C")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread here")
def test_cpu_kernels_run_on_several_threads_with_the_same_bits(use_backend):
    """The CPU kernels' parallel regions run on ATen's threads (the extension built with OpenMP: without it every
    region ran on one thread, and with it the regions' ATen calls must see the caller's grad mode), and a result
    never depends on how many threads ran it: dropout forward and backward (row blocks in shares), 4-bit decode,
    panels and dx, merge."""
    import lora_kernels
    from lora_kernels import Weight4bit, merge_

    assert lora_kernels._C.parallel_threads() == min(2, torch.get_num_threads())
    use_backend("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 96, generator=g, requires_grad=True)
    weight, bias = torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    A, B = torch.randn(8, 96, generator=g, requires_grad=True), torch.randn(80, 8, generator=g, requires_grad=True)
    w4 = Weight4bit.quantize(torch.randn(80, 96, generator=g), 64, "nf4", True)
    delta = (torch.randn(8, 96, generator=g), torch.randn(80, 8, generator=g))

    def results():
        out = []
        for w, rows in ((weight, 1500), (w4, 1500), (w4, 3)):
            torch.manual_seed(7)
            y = lora_linear(x[:rows], w, bias, A, B, 2.0, dropout_p=0.25, training=True)
            out += [y, *torch.autograd.grad((y * y).sum(), (x, A, B))]
        merged = weight.clone()
        merge_(merged, *delta, 3.0)
        return out + [merged]

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = results()
        torch.set_num_threads(previous)
        several = results()
    finally:
        torch.set_num_threads(previous)
    for i, (a, b) in enumerate(zip(one, several)):
        assert torch.equal(a, b), f"result {i} differs between 1 and {previous} threads"


_REGION_COUNTER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long regions = 0;
typedef void (*parallel_fn)(void (*)(void*), void*, unsigned, unsigned);
void GOMP_parallel(void (*body)(void*), void* data, unsigned threads, unsigned flags) {
  static parallel_fn next = 0;
  if (!next) next = (parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
  ++regions;
  next(body, data, threads, flags);
}
long parallel_regions(void) { return regions; }
"""

_COUNT_REGIONS = r"""
import ctypes, sys, torch
import lora_kernels
from lora_kernels import Weight4bit
counter = ctypes.CDLL(sys.argv[1])
counter.parallel_regions.restype = ctypes.c_long
ops = torch.ops.lora_kernels

def regions(call):
    before = counter.parallel_regions()
    call()
    return counter.parallel_regions() - before

if regions(lora_kernels._C.parallel_threads) != 1:
    print("no-libgomp")
    sys.exit(0)
g = torch.Generator().manual_seed(0)
weight = torch.randn(1024, 1024, generator=g) / 32
A, B = torch.randn(16, 1024, generator=g) / 32, torch.randn(1024, 16, generator=g) / 32
w4 = Weight4bit.quantize(weight, 64, "nf4", True)
packed = (*w4.kernel_args()[:6], 1024, 64)
for rows in (1, 16):
    x, dy = torch.randn(rows, 1024, generator=g), torch.randn(rows, 1024, generator=g)
    for p in (0.0, 0.1):
        y, xa = ops.fused_forward(x, weight, None, A, B, 2.0, p, 5)
        print("dense", rows, p, regions(lambda: ops.fused_forward(x, weight, None, A, B, 2.0, p, 5)),
              regions(lambda: ops.fused_backward(dy, x, weight, A, B, xa, 2.0, p, 5, True)),
              regions(lambda: x @ weight.t()), regions(lambda: dy @ weight))
        y, xa = ops.fused_forward_4bit(x, *packed, None, A, B, 2.0, p, 5)
        print("nf4", rows, p, regions(lambda: ops.fused_forward_4bit(x, *packed, None, A, B, 2.0, p, 5)),
              regions(lambda: ops.fused_backward_4bit(dy, x, *packed, A, B, xa, 2.0, p, 5, True)), 1, 1)
"""


@pytest.mark.skipif("cpu" not in compiled_backends(), reason="needs lora_kernels._C")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread here")
def test_a_small_batch_runs_one_parallel_region_per_direction(tmp_path):
    """At a few rows the LoRA branch's products are ~10-100 us each: run threaded, each is a parallel region of
    its own (MKL's or ATen's) whose end waits for every thread, a time slice each on a busy machine (issue 18:
    a 4-bit decode train step 15x slower beside two busy processes). They run on the calling thread; a forward
    and a backward then hold one region each (the base product: BLAS or the 4-bit kernel), dense or 4-bit, with
    and without dropout. Counted by interposing OpenMP's GOMP_parallel (libgomp, torch's runtime on Linux). The
    base product's own count is MKL's business: one region on the Intel Xeon and the Zen 2 EPYC, two for an sgemm of
    8 to 64 rows on a Zen 5 EPYC (MKL 2024.2, 2026-12-07); the call may hold what its base product alone does."""
    import os
    import shutil
    import subprocess
    import sys

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux to build the region counter")
    (tmp_path / "counter.c").write_text(_REGION_COUNTER)
    counter = tmp_path / "counter.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(tmp_path / "counter.c"), "-o", str(counter), "-ldl"],
                   check=True)
    (tmp_path / "count.py").write_text(_COUNT_REGIONS)
    env = dict(os.environ, LD_PRELOAD=str(counter))
    out = subprocess.run([sys.executable, str(tmp_path / "count.py"), str(counter)], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if out[0] == "no-libgomp":
        pytest.skip("torch's OpenMP runtime is not libgomp here")
    lines = [line.split() for line in out if line]
    assert len(lines) == 8, out
    for kind, rows, p, forward, backward, base_forward, base_backward in lines:
        assert int(forward) <= max(1, int(base_forward)) and int(backward) <= max(1, int(base_backward)), \
            f"{kind} M={rows} p={p}: {forward} / {backward} regions (the base products alone: {base_forward} / " \
            f"{base_backward})"
