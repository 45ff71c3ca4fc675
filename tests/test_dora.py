"""DoRA: dora_linear on every backend against reference.py (float64 oracle), outputs and every gradient, all
dtypes, dropout, odd shapes; the row norm's accuracy where W0 and s·BA cancel; merge/unmerge; LoRALinear(use_dora);
opcheck, gradcheck, torch.compile; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels import reference, testing
from lora_kernels.functional import draw_seed
from lora_kernels.ops.dora_linear import dora_linear_op
from lora_kernels.weight4bit import Weight4bit

from conftest import DEVICE, DTYPES, compiled_backends, make_lora_inputs

SCALING = 1.5
SHAPES = [((0,), 33, 70, 3), ((1,), 33, 70, 1), ((37,), 70, 33, 16), ((300,), 100, 65, 64), ((4, 9), 33, 70, 3)]
TRITON_SHAPES = [((1,), 33, 70, 1), ((7,), 70, 100, 3), ((3, 5), 33, 40, 3)]
NAMES = ("x", "lora_A", "lora_B", "magnitude", "bias")


def _cases():
    for backend in ["reference"] + compiled_backends():
        for shape in TRITON_SHAPES if backend == "triton" else SHAPES:
            yield backend, shape


def make_dora_inputs(lead, in_f, out_f, r, dtype, adapter_dtype=None, bias=True, seed=0):
    """make_lora_inputs plus a magnitude m = ‖W0 + s·BA‖ · (1 + N(0, 0.2²)): a trained-looking gain g ≠ 1."""
    t = make_lora_inputs(lead, in_f, out_f, r, dtype, bias=bias, seed=seed)
    if adapter_dtype is not None:
        t["lora_A"], t["lora_B"] = t["lora_A"].to(adapter_dtype), t["lora_B"].to(adapter_dtype)
    norm = reference.dora_weight_norm(t["weight"].double(), t["lora_A"].double(), t["lora_B"].double(), SCALING)
    g = torch.Generator().manual_seed(seed + 1)
    jitter = 1 + 0.2 * torch.randn(out_f, generator=g, dtype=torch.float64)
    t["magnitude"] = (norm.cpu() * jitter).to(device=t["lora_A"].device, dtype=t["lora_A"].dtype)
    return t


def _run(fn, inputs, dropout_p, training=True):
    leaves = {k: v.detach().clone().requires_grad_(k != "weight") if v is not None else None
              for k, v in inputs.items()}
    torch.manual_seed(1234)
    y = fn(leaves, dropout_p, training)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    wrt = [leaves[k] for k in NAMES if leaves[k] is not None]
    return y, torch.autograd.grad(y, wrt, grad_y)


def _ours(t, dropout_p, training):
    return lk.dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], SCALING,
                          dropout_p, training)


def _reference(t, dropout_p, training):
    torch.manual_seed(1234)
    seed = int(draw_seed()) if training and dropout_p > 0 else None
    x2d = t["x"].reshape(-1, t["x"].shape[-1])
    y = reference.dora_linear(x2d, t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], SCALING,
                              dropout_p, seed)
    return y.view(*t["x"].shape[:-1], t["weight"].shape[0])


def _check(inputs, dropout_p, training=True):
    y, grads = _run(_ours, inputs, dropout_p, training)
    exact = {k: v.double() if v is not None else None for k, v in inputs.items()}
    y_exact, grads_exact = _run(_reference, exact, dropout_p, training)
    y_plain, grads_plain = _run(_reference, inputs, dropout_p, training)
    names = ["y"] + ["d" + n for n in NAMES if inputs[n] is not None]
    testing.assert_all_match_reference(names, (y, *grads), (y_exact, *grads_exact), (y_plain, *grads_plain))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", list(_cases()), ids=str)
def test_matches_reference(backend, shape, dtype, dropout_p, use_backend):
    use_backend(backend)
    lead, in_f, out_f, r = shape
    _check(make_dora_inputs(lead, in_f, out_f, r, dtype), dropout_p)


@pytest.mark.parametrize("shape", [((9,), 40, 36, 4), ((7,), 33, 40, 3), ((2, 5), 64, 48, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_float32_adapter_and_magnitude_on_16bit_base(backend, dtype, shape, use_backend):
    """PEFT's default: dA, dB and dm as accurate as float32 allows (g ⊙ dy is never rounded to 16 bits)."""
    use_backend(backend)
    lead, in_f, out_f, r = shape
    inputs = make_dora_inputs(lead, in_f, out_f, r, dtype, adapter_dtype=torch.float32)
    _check(inputs, 0.0)
    _check(inputs, 0.3)
    y, grads = _run(_ours, inputs, 0.3)
    assert y.dtype == dtype and grads[1].dtype == grads[2].dtype == grads[3].dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_eval_ignores_dropout_and_no_grad_matches(backend, use_backend):
    use_backend(backend)
    t = make_dora_inputs((5,), 33, 70, 3, torch.float32)
    y_eval = _ours(t, 0.5, False)
    with torch.no_grad():  # the in-place epilogue of a call that keeps nothing for backward
        y_nograd = _ours(t, 0.0, True)
    y_train = _run(_ours, t, 0.0)[0]
    torch.testing.assert_close(y_eval, y_train)
    torch.testing.assert_close(y_nograd, y_train)


def _norm_oracle(weight, lora_A, lora_B, s):
    return reference.dora_weight_norm(weight.double(), lora_A.double(), lora_B.double(), s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_norm_accuracy_when_w0_and_s_ba_cancel_or_s_ba_dominates(dtype):
    """Rows where W0 + s·BA nearly vanishes (cancellation in n² = ‖W0‖² + 2s W0·BA + s²‖BA‖²) and rows where s·BA
    is 1000× W0: each row's norm within a few times the error of the dense computation in the same dtype."""
    out_f, in_f, r, s = 64, 96, 8, 2.0
    g = torch.Generator().manual_seed(3)
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    W[:16] = -s * (B[:16] @ A) + 1e-4 * torch.randn(16, in_f, generator=g, dtype=torch.float64)  # near zero
    W[16:24] = 0.0  # W0 row zero: n = |s|·‖B_o A‖
    W[24:32] *= 1e-3  # s·BA dominates
    adapter = torch.float32 if dtype == torch.bfloat16 else dtype
    Wd, Ad, Bd = W.to(dtype), A.to(adapter), B.to(adapter)
    exact = _norm_oracle(Wd, Ad, Bd, s)
    ours = lk.dora_weight_norm(Wd, Ad, Bd, s).double()
    dense = reference.dora_weight_norm(Wd.to(adapter), Ad, Bd, s).double()  # plain PyTorch in the working dtype
    eps = torch.finfo(adapter).eps
    budget = 4 * (dense - exact).abs() + 16 * eps * exact
    assert torch.isfinite(ours).all()
    bad = (ours - exact).abs() > budget
    assert not bad.any(), f"rows {bad.nonzero().flatten().tolist()}: {(ours - exact)[bad]} vs budget {budget[bad]}"


def test_zero_init_b_gives_exactly_the_base_layer():
    torch.manual_seed(0)
    layer = lk.LoRALinear(33, 70, r=4, lora_alpha=8, use_dora=True, device=DEVICE)
    x = torch.randn(2, 5, 33, device=DEVICE)
    base = F.linear(x, layer.weight, layer.bias)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), base, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(layer.lora_magnitude, torch.linalg.vector_norm(layer.weight, dim=1))


def _trained_dora_layer(dtype=torch.float32, adapter_dtype=None, **options):
    torch.manual_seed(0)
    layer = lk.LoRALinear(40, 36, r=4, lora_alpha=8, use_dora=True, device=DEVICE, dtype=dtype,
                          adapter_dtype=adapter_dtype, **options)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_merge_matches_forward_and_unmerge_restores(dtype):
    layer = _trained_dora_layer(dtype)
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 40, device=DEVICE, dtype=dtype)
    layer.eval()
    y = layer(x)
    layer.merge()
    expected = reference.dora_merge(w0, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling)
    # accumulated in float32 (float64): a few roundings of the terms' scale g·(|W0| + |s·BA|), one to dtype
    lora = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    gain = (expected.double().norm(dim=1) / (w0.double() + lora).norm(dim=1))[:, None]
    terms = gain * (w0.double().abs() + lora.abs())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    budget = testing.ulp(expected, dtype) + 4 * testing.ulp(terms, acc)
    assert ((layer.weight.double() - expected.double()).abs() <= budget).all()
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol * y.abs().max().item())
    layer.unmerge()
    # unmerge: W / g − s·BA, a few roundings of the same terms' scale
    budget = 2 * testing.ulp(w0, dtype) + 4 * testing.ulp(terms / gain, acc) + 2 * testing.ulp(expected / gain, dtype)
    assert ((layer.weight.double() - w0.double()).abs() <= budget).all()
    torch.testing.assert_close(layer(x), y, rtol=tol, atol=tol * y.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exact_merge_restores_bit_for_bit(dtype):
    layer = _trained_dora_layer(dtype)
    weight = layer.weight.detach().clone()
    w0 = weight.clone()
    merged = lk.dora_merge_(weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling, exact=True)
    assert not torch.equal(weight, w0)
    lk.dora_unmerge_(weight, layer.lora_A, layer.lora_B, layer.scaling, merged)
    assert torch.equal(weight, w0)


def test_merge_refuses_what_cannot_be_unmerged_and_safe_leaves_weight():
    layer = _trained_dora_layer()
    weight = layer.weight.detach().clone()
    magnitude = layer.lora_magnitude.detach().clone()
    magnitude[3] = 0.0
    with pytest.raises(ValueError, match="zero or not finite"):
        lk.dora_merge_(weight, layer.lora_A, layer.lora_B, magnitude, layer.scaling)
    assert torch.equal(weight, layer.weight)
    # a merged row's norm is its magnitude: a float16 weight overflows where m is past float16's range
    half = _trained_dora_layer(torch.float16, adapter_dtype=torch.float32)
    weight = half.weight.detach().clone()
    magnitude = half.lora_magnitude.detach().clone()
    magnitude[3] = 1e6
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        lk.dora_merge_(weight, half.lora_A, half.lora_B, magnitude, half.scaling, safe=True)
    assert torch.equal(weight, half.weight)


def test_merged_state_dict_holds_w0_and_load_remerges():
    layer = _trained_dora_layer()
    w0 = layer.weight.detach().clone()
    layer.merge()
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude"}
    torch.testing.assert_close(state["weight"], w0)
    fresh = lk.LoRALinear(40, 36, r=4, lora_alpha=8, use_dora=True, device=DEVICE)
    fresh.load_state_dict(state)
    x = torch.randn(3, 40, device=DEVICE)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=1e-5, atol=1e-5)


def test_scaling_change_while_merged_remerges():
    layer = _trained_dora_layer()
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.scaling = 5.0
    expected = reference.dora_merge(w0, layer.lora_A, layer.lora_B, layer.lora_magnitude, 5.0)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_eval_caches_the_norm_until_something_changes(monkeypatch):
    from lora_kernels.ops import dora_linear as dora_ops

    layer = _trained_dora_layer().eval()
    calls = []
    original = dora_ops.dora_weight_norm_op.impl
    monkeypatch.setattr(dora_ops.dora_weight_norm_op, "impl", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(4, 40, device=DEVICE)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
        assert len(calls) == 1 and torch.equal(y1, y2)
        layer.lora_B.add_(0.1)  # an in-place change (what an optimizer step does): the cache must notice
        y3 = layer(x)
        assert len(calls) == 2
        layer.scaling = 3.0
        y4 = layer(x)
        assert len(calls) == 3
    expected = reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude,
                                     3.0)
    torch.testing.assert_close(y4, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y3, y1)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.float16, None), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_eval_keeps_the_gain_and_gives_the_bits_of_the_op(backend, dtype, adapter_dtype, fan_in_fan_out, use_backend,
                                                          monkeypatch):
    """A forward without gradient (eval, generation) takes g = m / n from the layer's cache (no gain computed per
    call) and returns what the op computes for the same call with gradient, bit for bit; a changed magnitude (an
    optimizer step) or weight gives a new g."""
    from lora_kernels.ops import dora_linear as dora_ops

    use_backend(backend)
    layer = _trained_dora_layer(dtype, adapter_dtype, fan_in_fan_out=fan_in_fan_out).eval()
    calls = []
    original = dora_ops._gain
    monkeypatch.setattr(dora_ops, "_gain", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 3, 40, device=DEVICE, dtype=dtype)

    def check_against_the_op() -> torch.Tensor:
        with torch.no_grad():
            first, second = layer(x), layer(x)
        assert not calls, "a forward without gradient computed the gain"
        with_grad = layer(x)  # the op (the magnitude requires grad: z is kept for dm)
        assert calls and with_grad.requires_grad
        calls.clear()
        assert torch.equal(first, second) and torch.equal(first, with_grad.detach())
        expected = reference.dora_linear(x, layer.base_weight(), layer.bias, layer.lora_A, layer.lora_B,
                                         layer.lora_magnitude, layer.scaling)
        tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
        torch.testing.assert_close(first, expected, rtol=tol, atol=tol * expected.abs().max().item())
        return first

    y1 = check_against_the_op()
    with torch.no_grad():
        layer.lora_magnitude.mul_(1.5)
    y2 = check_against_the_op()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    y3 = check_against_the_op()
    assert not torch.equal(y1, y2) and not torch.equal(y2, y3)


def test_norm_cache_does_not_take_another_tensor_at_the_same_address_for_its_own():
    """A tensor freed and another allocated at its address with the same version counter (an allocator reusing
    memory) must not be served the old tensor's norm: the cache knows the tensors themselves, not only their
    addresses and versions. Made deterministic here with two tensors on one storage."""
    from lora_kernels.dora import DoRANormCache

    torch.manual_seed(0)
    weight, lora_B = torch.randn(36, 40), torch.randn(36, 4)
    storage_of = lambda t: torch.empty(0).set_(t.untyped_storage(), 0, t.shape, t.stride())
    cached_A = torch.randn(4, 40)
    other_A = storage_of(cached_A)  # same address, its own version counter
    writer = storage_of(cached_A)
    while other_A._version < cached_A._version:
        other_A.add_(0)
    while cached_A._version < other_A._version:
        cached_A.add_(0)
    cache = DoRANormCache()
    cache.norm(weight, cached_A, lora_B, 2.0)
    writer.mul_(3.0)  # new values, written through a third tensor: neither version counter moves
    assert other_A.data_ptr() == cached_A.data_ptr() and other_A._version == cached_A._version
    norm = cache.norm(weight, other_A, lora_B, 2.0)
    torch.testing.assert_close(norm, lk.dora_weight_norm(weight, other_A, lora_B, 2.0), rtol=0, atol=0)


def test_training_reuses_the_norm_between_optimizer_steps_only(monkeypatch):
    """Gradient accumulation: forwards between two optimizer steps share one norm; after a step (A, B changed in
    place) the next forward recomputes it, and the outputs and gradients are the reference's."""
    from lora_kernels.ops import dora_linear as dora_ops

    layer = _trained_dora_layer().train()
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B, layer.lora_magnitude], lr=0.1)
    calls = []
    original = dora_ops.dora_weight_norm_op.impl
    monkeypatch.setattr(dora_ops.dora_weight_norm_op, "impl", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(4, 40, device=DEVICE)
    for step in range(3):
        optimizer.zero_grad()
        for _ in range(2):  # two micro-batches
            layer(x).square().sum().backward()
        assert len(calls) == step + 1
        leaves = {n: getattr(layer, n).detach().clone().requires_grad_() for n in ("lora_A", "lora_B", "lora_magnitude")}
        ref = reference.dora_linear(x, layer.weight, layer.bias, leaves["lora_A"], leaves["lora_B"],
                                    leaves["lora_magnitude"], layer.scaling)
        (2 * ref.square().sum()).backward()
        for name, leaf in leaves.items():
            torch.testing.assert_close(getattr(layer, name).grad, leaf.grad, rtol=1e-4, atol=1e-5)
        optimizer.step()


def test_training_step_matches_peft_formula_and_trains_magnitude():
    layer = _trained_dora_layer(lora_dropout=0.0)
    x = torch.randn(6, 40, device=DEVICE)
    y = layer.train()(x)
    y.square().sum().backward()
    leaves = {n: getattr(layer, n).detach().clone().requires_grad_() for n in ("lora_A", "lora_B", "lora_magnitude")}
    ref = reference.dora_linear(x, layer.weight, layer.bias, leaves["lora_A"], leaves["lora_B"],
                                leaves["lora_magnitude"], layer.scaling)
    ref.square().sum().backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(getattr(layer, name).grad, leaf.grad, rtol=1e-4, atol=1e-5)
    assert layer.weight.grad is None


@pytest.mark.parametrize("norm_gradient", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p, norm_gradient):
    """The detached norm (a constant for the numerical gradient too), and norm_gradient=True (the norm recomputed
    from the perturbed inputs: the full derivative)."""
    t = make_dora_inputs((6,), 7, 5, 2, torch.float64)
    seed = torch.tensor(77, dtype=torch.int64)
    fixed = lk.dora_weight_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)

    def fn(x, weight, bias, A, B, m):
        norm = lk.dora_weight_norm(weight.detach(), A.detach(), B.detach(), SCALING) if norm_gradient else fixed
        return dora_linear_op(x, weight, bias, A, B, m, norm, SCALING, dropout_p, seed if dropout_p else None,
                              True, norm_gradient)[0]

    args = tuple(t[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "lora_A", "lora_B",
                                                                  "magnitude"))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_opcheck(backend, use_backend):
    if backend == "triton":
        pytest.skip("opcheck's many calls are too slow under Triton's interpreter")
    use_backend(backend)
    s = torch.tensor(SCALING, dtype=torch.float64)
    for dtype, adapter_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32)):
        t = make_dora_inputs((5,), 12, 10, 3, dtype, adapter_dtype=adapter_dtype)
        norm = lk.dora_weight_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)
        for p, seed in ((0.0, None), (0.2, torch.tensor(5, dtype=torch.int64))):
            args = (t["x"].requires_grad_(), t["weight"], t["bias"], t["lora_A"].requires_grad_(),
                    t["lora_B"].requires_grad_(), t["magnitude"].requires_grad_(), norm, s, p, seed, True, False)
            torch.library.opcheck(dora_linear_op.custom_op, args)
            torch.library.opcheck(dora_linear_op.custom_op, (*args[:-1], True))


def test_torch_compile_fullgraph_module_forward_and_backward():
    layer = _trained_dora_layer(lora_dropout=0.1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    torch.manual_seed(5)
    y = compiled(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude)] + [x.grad.clone()]
    for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
        p.grad = None
    x.grad = None
    torch.manual_seed(5)
    y_eager = layer(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, e in zip(grads, [p.grad for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude)] + [x.grad]):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_norm_gradient_matches_autograd_through_the_norm(backend, dtype, use_backend):
    """norm_gradient=True: every gradient equals autograd's through ‖W0 + s·BA‖ (float64 oracle), a trainable
    weight's too; the layer option does the same."""
    use_backend(backend)
    adapter = torch.float32 if dtype == torch.bfloat16 else None
    t = make_dora_inputs((2, 7), 24, 20, 4, dtype, adapter_dtype=adapter)

    def ours(v, p, training):
        return lk.dora_linear(v["x"], v["weight"], v["bias"], v["lora_A"], v["lora_B"], v["magnitude"], SCALING, p,
                              training, norm_gradient=True)

    def theirs(v, p, training):
        torch.manual_seed(1234)
        seed = int(draw_seed()) if training and p > 0 else None
        x2d = v["x"].reshape(-1, v["x"].shape[-1])
        y = reference.dora_linear(x2d, v["weight"], v["bias"], v["lora_A"], v["lora_B"], v["magnitude"], SCALING, p,
                                  seed, norm_gradient=True)
        return y.view(*v["x"].shape[:-1], v["weight"].shape[0])

    for p in (0.0, 0.25):
        leaves = lambda src: {k: v.detach().clone().requires_grad_() for k, v in src.items()}  # noqa: E731
        mine, exact = leaves(t), leaves({k: v.double() for k, v in t.items()})
        plain = leaves(t)
        outs = []
        for fn, v in ((ours, mine), (theirs, exact), (theirs, plain)):
            torch.manual_seed(1234)
            y = fn(v, p, True)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
            names = ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")
            outs.append([y, *torch.autograd.grad(y, [v[n] for n in names], g)])
        testing.assert_all_match_reference(("y", "dx", "dweight", "dA", "dB", "dm", "dbias"), *outs)
    layer = _trained_dora_layer()
    layer.dora_norm_gradient = True
    x = torch.randn(3, 40, device=DEVICE)
    layer(x).square().sum().backward()
    leaves = {n: getattr(layer, n).detach().clone().requires_grad_() for n in ("lora_A", "lora_B", "lora_magnitude")}
    reference.dora_linear(x, layer.weight, layer.bias, leaves["lora_A"], leaves["lora_B"], leaves["lora_magnitude"],
                          layer.scaling, norm_gradient=True).square().sum().backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(getattr(layer, name).grad, leaf.grad, rtol=1e-4, atol=1e-5)


def test_double_backward_matches_reference():
    t = make_dora_inputs((5,), 12, 10, 3, torch.float64)

    def penalty(fn):
        leaves = {k: v.detach().clone().requires_grad_(k in NAMES) for k, v in t.items()}
        torch.manual_seed(1234)  # the seed _reference draws
        y = fn(leaves)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), leaves["x"], create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [leaves[k] for k in NAMES], allow_unused=True)

    ours = penalty(lambda v: _ours(v, 0.3, True))
    exact = penalty(lambda v: _reference(v, 0.3, True))
    for name, a, b in zip(NAMES, ours, exact):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_bad_input_is_refused_by_name_and_changes_nothing():
    t = make_dora_inputs((5,), 12, 10, 3, torch.float32)
    m = t["magnitude"]
    for bad, message in ((m[:-1], "magnitude must be \\[out_features=10\\]"),
                         (m.double(), "magnitude must have lora_A's dtype"),
                         (m[None], "magnitude"),
                         (m.to(torch.int64), "magnitude")):
        with pytest.raises((ValueError, TypeError), match=message):
            lk.dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], bad, SCALING)
    with pytest.raises(ValueError, match="weight_norm"):
        lk.dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], m, SCALING,
                       weight_norm=torch.ones(9))
    layer = _trained_dora_layer()
    with pytest.raises(ValueError, match="DoRA"):
        layer.switch_adapter(layer.lora_A.detach(), layer.lora_B.detach())
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        lk.LoRAConfig(use_dora="yes")


@pytest.mark.skipif(not hasattr(torch.ops.lora_kernels, "dora_gain_gradients"), reason="lora_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cpu_gain_gradient_kernel_matches_aten_and_a_float64_oracle(dtype):
    """csrc/cpu/dora_gain.cpp (the cpu backend's backward epilogue): g ⊙ dy bit for bit AtenGain's (in dy's dtype
    and in float32, a float32 z for float32 adapters), Σ_rows dy ⊙ z at least as close to a float64 oracle as
    ATen's sum; the same bits on one thread and on two; odd shapes, an empty batch, a decode step, many rows."""
    from lora_kernels.ops.dora_linear import AtenGain

    kernel = torch.ops.lora_kernels.dora_gain_gradients
    g = torch.Generator().manual_seed(9)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for M, N in ((0, 33), (1, 70), (37, 129), (1000, 67), (2048, 1024)):
        gain = (0.5 + torch.rand(N, generator=g)).to(wide)
        dy = torch.randn(M, N, generator=g).to(dtype)
        for out_dtype in dict.fromkeys((dtype, wide)):
            for z in (torch.randn(M, N, generator=g).to(dtype), torch.randn(M, N, generator=g).to(wide), None):
                want_scaled, want_sum = AtenGain.dora_gain_gradients(dy, z, gain, out_dtype)
                got_scaled, got_sum = kernel(dy, z, gain, out_dtype)
                assert got_scaled.dtype == out_dtype and torch.equal(got_scaled, want_scaled)
                if z is None:
                    assert got_sum.numel() == 0
                    continue
                oracle = (dy.double() * z.double()).sum(0)
                assert got_sum.dtype == wide and got_sum.shape == (N,)
                scale = (dy.double().abs() * z.double().abs()).sum(0).max().item() if M else 1.0
                ours_error = (got_sum.double() - oracle).abs().max().item() if M else 0.0
                aten_error = (want_sum.double() - oracle).abs().max().item() if M else 0.0
                assert ours_error <= max(aten_error, 4 * M * torch.finfo(wide).eps * scale), (M, N, out_dtype)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    one_thread = kernel(dy, z, gain, out_dtype)
                finally:
                    torch.set_num_threads(threads)
                assert torch.equal(one_thread[0], got_scaled) and torch.equal(one_thread[1], got_sum)
    with pytest.raises(RuntimeError, match="gain must be"):
        kernel(torch.randn(3, 4, dtype=dtype), None, torch.ones(5, dtype=wide), dtype)
    with pytest.raises(RuntimeError, match="z must be"):
        kernel(torch.randn(3, 4, dtype=dtype), torch.randn(4, 3, dtype=dtype), torch.ones(4, dtype=wide), dtype)


@pytest.mark.skipif(not hasattr(torch.ops.lora_kernels, "fused_forward"), reason="lora_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_fused_forward_gain_epilogue_is_the_lora_forward_then_atens_epilogue(dtype):
    """The C++ fused forwards' gain (DoRA's forward without gradient on the cpu backend, dense and 4-bit W0):
    y = g ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b bit for bit what the LoRA forward without bias followed by AtenGain's epilogue
    gives (so eval, generation and a call with gradient agree), xa unchanged; a float32 gain on 16-bit y; bias or
    none; an empty batch; and a bad gain refused by name with the inputs untouched."""
    from lora_kernels.ops.dora_linear import AtenGain

    ops = torch.ops.lora_kernels
    g = torch.Generator().manual_seed(3)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    quantized = dtype != torch.float64 and hasattr(ops, "fused_forward_4bit")
    for M, in_f, out_f, r in ((0, 33, 70, 3), (1, 64, 70, 1), (37, 128, 33, 16), (300, 64, 129, 8)):
        x = torch.randn(M, in_f, generator=g).to(dtype)
        W = (torch.randn(out_f, in_f, generator=g) * 0.1).to(dtype)
        A = (torch.randn(r, in_f, generator=g) * 0.1).to(dtype)
        B = (torch.randn(out_f, r, generator=g) * 0.1).to(dtype)
        gain = (0.5 + torch.rand(out_f, generator=g)).to(wide)
        w4 = Weight4bit.quantize(W.float(), 64, "nf4", True).kernel_args() if quantized else None
        for bias in (torch.randn(out_f, generator=g).to(dtype), None):
            want_z, want_xa = ops.fused_forward(x, W, None, A, B, 1.5, 0.0, 0)
            want = AtenGain.dora_gained(want_z, gain, bias, dtype, in_place=True)
            got, got_xa = ops.fused_forward(x, W, bias, A, B, 1.5, 0.0, 0, gain)
            assert got.dtype == dtype and torch.equal(got, want) and torch.equal(got_xa, want_xa), (M, bias is None)
            if w4 is not None:
                z4, xa4 = ops.fused_forward_4bit(x, *w4, None, A, B, 1.5, 0.0, 0)
                want4 = AtenGain.dora_gained(z4, gain, bias, dtype, in_place=True)
                got4, got_xa4 = ops.fused_forward_4bit(x, *w4, bias, A, B, 1.5, 0.0, 0, gain)
                assert torch.equal(got4, want4) and torch.equal(got_xa4, xa4), (M, bias is None)
    kept = [t.clone() for t in (x, W, A, B)]
    for bad, message in ((torch.ones(out_f + 1, dtype=wide), "gain must be"),
                         (torch.ones(out_f, dtype=torch.int32), "gain must be floating point")):
        with pytest.raises(RuntimeError, match=message):
            ops.fused_forward(x, W, None, A, B, 1.5, 0.0, 0, bad)
    if dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(RuntimeError, match="a gain needs lora_A and lora_B in x's dtype"):
            ops.fused_forward(x, W, None, A.float(), B.float(), 1.5, 0.0, 0, gain)
    assert all(torch.equal(a, b) for a, b in zip(kept, (x, W, A, B)))


@pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gain_kernels_match_aten(dtype):
    """ops/triton_dora's one-pass epilogues against the ATen ones (AtenGain): y = g ⊙ z + b (bias or none, in
    place or not, a float32 z for float32 adapters), g ⊙ dy (in dy's dtype and in float32) and Σ_rows dy ⊙ z; odd
    shapes, an empty batch, rows of several tiles; each output within one rounding of dtype."""
    from lora_kernels.ops import triton_dora
    from lora_kernels.ops.dora_linear import AtenGain

    g = torch.Generator().manual_seed(8)
    for M, N in ((0, 33), (1, 70), (37, 129), (70, 33)):
        gain = 1 + 0.3 * torch.randn(N, generator=g)
        bias = torch.randn(N, generator=g).to(dtype)
        for z_dtype in (dtype, torch.float32):
            z = torch.randn(M, N, generator=g).to(z_dtype)
            for b in (bias, None):
                for in_place in (False, True):
                    want = AtenGain.dora_gained(z.clone(), gain, b, dtype, in_place)
                    got = triton_dora.dora_gained(z.clone(), gain, b, dtype, in_place)
                    assert got.dtype == dtype and got.shape == (M, N)
                    torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=1e-6)
        dy = torch.randn(M, N, generator=g).to(dtype)
        for out_dtype in (dtype, torch.float32):
            for z in (torch.randn(M, N, generator=g).to(dtype), torch.randn(M, N, generator=g), None):
                want_scaled, want_sum = AtenGain.dora_gain_gradients(dy, z, gain, out_dtype)
                got_scaled, got_sum = triton_dora.dora_gain_gradients(dy, z, gain, out_dtype)
                torch.testing.assert_close(got_scaled, want_scaled, rtol=torch.finfo(out_dtype).eps, atol=1e-6)
                if z is None:
                    assert got_sum is None
                else:
                    torch.testing.assert_close(got_sum, want_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")
def test_triton_backend_runs_the_gain_in_the_gemm_and_the_gradient_kernel(use_backend, monkeypatch):
    """On the triton backend DoRA's forward is the fused GEMM with the gain in its epilogue (y and z from one
    accumulator, no pass of its own over y), in training and in eval (the same bits), and its backward's epilogue
    the one-pass gradient kernel; dense and 4-bit W0."""
    from lora_kernels.ops import triton_dora, triton_lora_linear as lin

    use_backend("triton")
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")
    calls = []
    four_bit = lin.Weight4bitBackend
    for module, name in ((triton_dora, "dora_gained"), (triton_dora, "dora_gain_gradients"),
                         (lin, "gained_forward"), (lin, "gained_forward_keeping_z"),
                         (four_bit, "gained_forward"), (four_bit, "gained_forward_keeping_z")):
        original = getattr(module, name)
        prefix = "4bit " if module is four_bit else ""
        monkeypatch.setattr(module, name, staticmethod(
            lambda *a, _f=original, _n=prefix + name, **k: calls.append(_n) or _f(*a, **k)))
    t = make_dora_inputs((7,), 64, 40, 3, torch.bfloat16)
    for weight, prefix in ((t["weight"], ""), (Weight4bit.quantize(t["weight"].float(), 32, "nf4", True), "4bit ")):
        calls.clear()
        args = (t["x"], weight, t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], SCALING)
        trained = lk.dora_linear(*(a.detach().requires_grad_(a.dtype != torch.uint8 and a is not weight)
                                   if isinstance(a, torch.Tensor) else a for a in args))
        trained.backward(torch.ones_like(trained))
        with torch.no_grad():
            evaluated = lk.dora_linear(*args)
        assert calls == [prefix + "gained_forward_keeping_z", "dora_gain_gradients", prefix + "gained_forward"]
        assert torch.equal(trained.detach(), evaluated)


@pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gemm_gain_epilogue_matches_a_float64_oracle(dtype, monkeypatch):
    """The fused GEMM's DoRA epilogue (ops/triton_lora_linear: gained_forward, gained_forward_keeping_z) on every
    path it has: decode (the shrink in the K loop), decode split over K (the finish kernel's epilogue), the large-M
    GEMM, and a 4-bit W0 at decode and large M (its tiles computed transposed); bias or none, the scaling as a
    number or a 0-d tensor. y = g ⊙ z + b and z = x W0ᵀ + s·(x Aᵀ) Bᵀ within the dtype rule of a float64 oracle,
    xa the LoRA forward's, y the same bits with and without z."""
    from lora_kernels.ops import triton_lora_linear as lin

    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")
    g = torch.Generator().manual_seed(21)
    in_f, out_f, r = 64, 40, 5
    for M, splits, quantized in ((1, 1, False), (16, 1, False), (9, 3, False), (37, 1, False), (3, 1, True),
                                 (37, 1, True)):
        monkeypatch.setattr(lin.gpu_paths, "decode_splits", lambda *a, _n=splits: _n)
        x = torch.randn(M, in_f, generator=g).to(dtype)
        W = torch.randn(out_f, in_f, generator=g) / 8
        w4 = Weight4bit.quantize(W, 32, "nf4", True) if quantized else None
        W = (w4.dequantize(torch.float32) if quantized else W).to(dtype)
        A = (torch.randn(r, in_f, generator=g) / 8).to(dtype)
        B = (torch.randn(out_f, r, generator=g) / 8).to(dtype)
        gain = 0.5 + torch.rand(out_f, generator=g)
        for bias, scaling in ((torch.randn(out_f, generator=g).to(dtype), 1.5), (None, torch.tensor(0.75))):
            s = float(scaling)
            if quantized:
                w4_args = w4.kernel_args()
                y, xa = lin.Weight4bitBackend.gained_forward(x, w4_args, bias, A, B, scaling, gain)
                y_z, xa_z, z = lin.Weight4bitBackend.gained_forward_keeping_z(x, w4_args, bias, A, B, scaling, gain)
                _, want_xa = lin.Weight4bitBackend.forward(x, w4_args, None, A, B, scaling, 0.0, None)
            else:
                y, xa = lin.gained_forward(x, W, bias, A, B, scaling, gain)
                y_z, xa_z, z = lin.gained_forward_keeping_z(x, W, bias, A, B, scaling, gain)
                _, want_xa = lin.forward(x, W, None, A, B, scaling, 0.0, None)
            assert torch.equal(y, y_z) and torch.equal(xa, xa_z) and torch.equal(xa, want_xa), (M, splits, quantized)

            def oracle(wide):
                z_ = wide(x) @ wide(W).t() + s * (wide(x) @ wide(A).t()) @ wide(B).t()
                y_ = z_ * wide(gain) + (wide(bias) if bias is not None else 0)
                return y_, z_

            exact = oracle(lambda t: t.double())
            plain = tuple(t.to(dtype) for t in oracle(lambda t: t.to(dtype)))
            testing.assert_all_match_reference([f"y M={M} splits={splits} nf4={quantized}", "z"], (y, z), exact,
                                               plain)
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_dropout_forward_reads_w0_once_for_both_products(quantized, monkeypatch):
    """With dropout PEFT's function needs x W0ᵀ and x̃ W0ᵀ: one base product of [x; x̃] stacked (each W0 tile, or a
    4-bit W0's codes, read once for both), whose halves are the two products; the op still matches the reference."""
    from lora_kernels.ops import dora_linear as dora_ops

    t = make_dora_inputs((6,), 64, 40, 3, torch.float32)
    weight = Weight4bit.quantize(t["weight"], 32, "nf4", False) if quantized else t["weight"]
    base_class = dora_ops.Base4bit if quantized else dora_ops.DenseBase
    rows = []
    original = base_class.product
    monkeypatch.setattr(base_class, "product", lambda self, x, *a: rows.append(x.shape[0]) or original(self, x, *a))
    torch.manual_seed(1234)
    y = lk.dora_linear(t["x"], weight, t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], SCALING, 0.3, True)
    assert rows == [12]  # one product, of the 6 rows of x and the 6 of x̃
    dense = weight.dequantize(torch.float32) if quantized else t["weight"]
    torch.manual_seed(1234)
    seed = int(draw_seed())
    want = reference.dora_linear(t["x"].double(), dense.double(), t["bias"].double(), t["lora_A"].double(),
                                 t["lora_B"].double(), t["magnitude"].double(), SCALING, 0.3, seed)
    torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)
