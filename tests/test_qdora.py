"""QDoRA: DoRA on a 4-bit base (bitsandbytes' NF4/FP4 layout). dora_linear on a Weight4bit against the float64
oracle (reference.dora_linear on the weight dequantized in x's dtype) on every backend, outputs and every gradient;
the row norm from the packed weight (cancelling rows included); LoRALinear4bit(use_dora=True) (a fresh layer is the
base layer, merge_and_unload, requantized merge, state dict, torch.compile); PEFT QDoRA models patched, and QDoRA
adapter files both ways; bad input."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference, testing
from lora_kernels.functional import draw_seed
from lora_kernels.ops.dora_linear import dora_linear_4bit_op
from lora_kernels.ops.lora_linear_4bit import TRITON_4BIT, dequantize_rows, rows_per_block
from lora_kernels.weight4bit import Weight4bit

from conftest import DTYPES, compiled_backends
from test_weight4bit import _qlora_base, assert_same_gradients

SCALING = 1.5
NAMES = ("x", "lora_A", "lora_B", "magnitude", "bias")
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (./run.sh setup installs it)")
# (leading dims of x, in, out, r, blocksize, double_quant): decode (M <= 16) and panel/tile paths, rows that do not
# start a scale block (in % blocksize != 0), an empty batch, 3-D x, ranks past 16
SHAPES = [((0,), 96, 33, 4, 64, True), ((1,), 129, 37, 3, 64, True), ((37,), 129, 37, 16, 32, False),
          ((5, 7), 64, 70, 8, 128, True), ((40,), 128, 48, 20, 64, True)]
TRITON_SHAPES = [((1,), 129, 37, 3, 64, True), ((5, 7), 64, 70, 8, 128, True), ((20,), 128, 33, 4, 64, False)]
KERNEL_BACKENDS = ["reference"] + [b for b in compiled_backends() if b == "cpu" or (b == "triton" and TRITON_4BIT)]


def _cases():
    for backend in KERNEL_BACKENDS:
        for shape in TRITON_SHAPES if backend == "triton" else SHAPES:
            yield backend, shape


def _inputs(lead, in_f, out_f, r, blocksize, double_quant, dtype, adapter_dtype=None, quant_type="nf4", seed=3):
    """A 4-bit weight, x, bias, an adapter and a magnitude m = ‖W0 + s·BA‖ · (1 + N(0, 0.2²)) (a trained gain)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    w4 = Weight4bit.quantize(torch.randn(out_f, in_f, generator=g) * 0.05, blocksize, quant_type, double_quant)
    t = {"x": torch.randn(*lead, in_f, generator=g).to(dtype), "bias": (torch.randn(out_f, generator=g) * 0.1).to(dtype),
         "lora_A": (torch.randn(r, in_f, generator=g) * 0.1).to(adapter_dtype),
         "lora_B": (torch.randn(out_f, r, generator=g) * 0.1).to(adapter_dtype)}
    norm = reference.dora_weight_norm(w4.dequantize(torch.float32).double(), t["lora_A"].double(),
                                      t["lora_B"].double(), SCALING)
    t["magnitude"] = (norm * (1 + 0.2 * torch.randn(out_f, generator=g, dtype=torch.float64))).to(adapter_dtype)
    return w4, t


def _run(w4, t, dropout_p, oracle=None):
    """y and the gradients of NAMES under a fixed dropout seed. oracle: None (ours, on the Weight4bit), "plain"
    (reference.dora_linear on the weight dequantized in x's dtype) or "exact" (the same in float64)."""
    cast = (lambda v: v.double()) if oracle == "exact" else (lambda v: v)
    leaves = {k: cast(v).detach().clone().requires_grad_() for k, v in t.items()}
    torch.manual_seed(1234)
    if oracle is None:
        y = lk.dora_linear(leaves["x"], w4, leaves["bias"], leaves["lora_A"], leaves["lora_B"], leaves["magnitude"],
                           SCALING, dropout_p, training=True)
    else:
        seed = int(draw_seed()) if dropout_p else None
        x2d = leaves["x"].reshape(-1, leaves["x"].shape[-1])
        # the norm is of the weight's float32 values (exact), whatever x's dtype (ops/dora_linear.py)
        norm = reference.dora_weight_norm(cast(w4.dequantize(torch.float32)), leaves["lora_A"].detach(),
                                          leaves["lora_B"].detach(), SCALING)
        y = reference.dora_linear(x2d, cast(w4.dequantize(t["x"].dtype)), leaves["bias"], leaves["lora_A"],
                                  leaves["lora_B"], leaves["magnitude"], SCALING, dropout_p, seed, weight_norm=norm)
        y = y.view(*leaves["x"].shape[:-1], w4.out_features)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad(y, [leaves[k] for k in NAMES], grad_y)


def _check(w4, t, dropout_p):
    y, grads = _run(w4, t, dropout_p)
    y_exact, grads_exact = _run(w4, t, dropout_p, "exact")
    y_plain, grads_plain = _run(w4, t, dropout_p, "plain")
    testing.assert_all_match_reference(["y"] + ["d" + n for n in NAMES], (y, *grads), (y_exact, *grads_exact),
                                       (y_plain, *grads_plain))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,shape", list(_cases()), ids=str)
def test_qdora_matches_reference(backend, shape, dtype, dropout_p, use_backend, monkeypatch):
    use_backend(backend)
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")  # the triton backend's own 4-bit GEMMs
    _check(*_inputs(*shape, dtype), dropout_p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_qdora_float32_adapter_and_magnitude_on_a_16bit_compute_dtype(backend, dtype, use_backend, monkeypatch):
    """PEFT's QDoRA default: float32 adapters and magnitude, 16-bit compute; FP4 too."""
    use_backend(backend)
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")
    # (7,) x 64 -> 40, r = 3: the GPU check's dry-run shape, where an oracle taking the norm of W0 rounded to 16 bits
    # differs from ours (the norm of the exact values) beyond dA's and dB's float32 budgets
    for lead, in_f, out_f, r, quant_type in (((37,), 128, 37, 4, "nf4"), ((3,), 128, 37, 4, "fp4"),
                                             ((7,), 64, 40, 3, "nf4")):
        w4, t = _inputs(lead, in_f, out_f, r, 64, True, dtype, adapter_dtype=torch.float32, quant_type=quant_type)
        for p in (0.0, 0.3):
            _check(w4, t, p)
        y, grads = _run(w4, t, 0.3)
        assert y.dtype == dtype and all(g.dtype == torch.float32 for g in grads[1:4])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_norm_of_the_packed_weight_including_cancelling_rows(backend, use_backend):
    """The norm from the 4-bit weight's blocks of rows equals the norm of its float32 dequantization (to float32
    rounding), also for rows where W0 + s·BA cancels to ~1e-4 of its scale (computed densely) and rows where s·BA
    is 1000x W0; against the float64 oracle."""
    use_backend(backend)
    out_f, in_f, r, s = 64, 192, 8, 2.0
    g = torch.Generator().manual_seed(5)
    w4 = Weight4bit.quantize(torch.randn(out_f, in_f, generator=g) * 0.05, 64, "nf4", True)
    W0 = w4.dequantize(torch.float32)
    A = torch.randn(r, in_f, generator=g) * 0.1
    B = torch.randn(out_f, r, generator=g) * 0.1
    # rows 0..3: s·B_o A = −W0_o (1 + 1e-4): A's first rows are those rows of W0 (r > 4)
    A[:4] = W0[:4]
    B[:4] = 0
    B[:4, :4] = -torch.eye(4) * (1 + 1e-4) / s
    B[10:12] *= 1000
    ours = lk.dora_weight_norm(w4, A, B, s)
    oracle = reference.dora_weight_norm(W0.double(), A.double(), B.double(), s)
    dense = reference.dora_weight_norm(W0, A, B, s).double()
    budget = 4 * (dense - oracle).abs() + 16 * torch.finfo(torch.float32).eps * oracle
    assert bool(((ours.double() - oracle).abs() <= budget).all()), (ours.double() - oracle).abs().max()
    torch.testing.assert_close(ours, lk.dora_weight_norm(W0, A, B, s), rtol=2e-6, atol=0)


@pytest.mark.parametrize("in_f,blocksize", [(4096, 64), (129, 64), (100, 128), (7, 32)])
def test_blocks_of_rows_dequantize_as_the_whole_weight(in_f, blocksize):
    """dequantize_rows over rows_per_block's blocks (each starting a scale block, double-quantized scales decoded
    for those rows only) is the whole weight's dequantization bit for bit."""
    out_f = 300 if in_f < 4096 else 24
    w4 = Weight4bit.quantize(torch.randn(out_f, in_f) * 0.05, blocksize, "nf4", True)
    per_block = rows_per_block(in_f, blocksize, elements=5000)
    assert (per_block * in_f) % blocksize == 0
    blocks = [dequantize_rows(w4.kernel_args(), in_f, slice(r0, r0 + per_block), torch.float32)
              for r0 in range(0, out_f, per_block)]
    assert torch.equal(torch.cat(blocks), w4.dequantize(torch.float32))
    with pytest.raises(ValueError, match="scale block"):
        if (in_f % blocksize) != 0:
            dequantize_rows(w4.kernel_args(), in_f, slice(1, 2), torch.float32)
        else:
            raise ValueError("rows that do not start a scale block: none here")


@pytest.mark.parametrize("norm_gradient", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p, norm_gradient):
    """The detached norm (a constant for the numerical gradient too), and norm_gradient=True (the norm recomputed
    from the perturbed inputs: the full derivative)."""
    w4, t = _inputs((3,), 64, 9, 2, 64, True, torch.float64)
    seed = torch.tensor(77, dtype=torch.int64)
    w4_args = w4.kernel_args()
    fixed = lk.dora_weight_norm(w4, t["lora_A"], t["lora_B"], SCALING)

    def f(x, lora_A, lora_B, magnitude, bias):
        norm = lk.dora_weight_norm(w4, lora_A.detach(), lora_B.detach(), SCALING) if norm_gradient else fixed
        return dora_linear_4bit_op(x, *w4_args, bias, lora_A, lora_B, magnitude, norm, SCALING, dropout_p,
                                   seed if dropout_p else None, True, norm_gradient)[0]

    assert torch.autograd.gradcheck(f, tuple(t[k].detach().clone().requires_grad_() for k in NAMES))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend, use_backend):
    if backend not in KERNEL_BACKENDS:
        pytest.skip(f"{backend} backend not available")
    use_backend(backend)
    s = torch.tensor(SCALING, dtype=torch.float64)
    for dtype, adapter_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32)):
        w4, t = _inputs((5,), 64, 9, 2, 64, True, dtype, adapter_dtype=adapter_dtype)
        norm = lk.dora_weight_norm(w4, t["lora_A"], t["lora_B"], SCALING)
        for p, seed in ((0.0, None), (0.2, torch.tensor(5, dtype=torch.int64))):
            args = (t["x"].requires_grad_(), *w4.kernel_args(), t["bias"], t["lora_A"].requires_grad_(),
                    t["lora_B"].requires_grad_(), t["magnitude"].requires_grad_(), norm, s, p, seed, True, False)
            torch.library.opcheck(dora_linear_4bit_op.custom_op, args)


def test_norm_gradient_on_a_4bit_base_matches_autograd_through_the_norm():
    w4, t = _inputs((6,), 64, 20, 4, 64, True, torch.float64)
    W0 = w4.dequantize(torch.float32).double()
    ours = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    theirs = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    y = lk.dora_linear(ours["x"], w4, ours["bias"], ours["lora_A"], ours["lora_B"], ours["magnitude"], SCALING,
                       norm_gradient=True)
    expected = reference.dora_linear(theirs["x"], W0, theirs["bias"], theirs["lora_A"], theirs["lora_B"],
                                     theirs["magnitude"], SCALING, norm_gradient=True)
    torch.testing.assert_close(y, expected)
    for got, want in zip(torch.autograd.grad(y.square().sum(), [ours[k] for k in NAMES]),
                         torch.autograd.grad(expected.square().sum(), [theirs[k] for k in NAMES])):
        torch.testing.assert_close(got, want)


def test_bad_input_is_refused_by_name():
    w4, t = _inputs((3,), 64, 9, 2, 64, True, torch.float32)
    with pytest.raises(ValueError, match="magnitude must be"):
        lk.dora_linear(t["x"], w4, t["bias"], t["lora_A"], t["lora_B"], t["magnitude"][:5], SCALING)
    with pytest.raises(TypeError, match="magnitude must have lora_A's dtype"):
        lk.dora_linear(t["x"], w4, t["bias"], t["lora_A"], t["lora_B"], t["magnitude"].double(), SCALING)
    with pytest.raises(ValueError, match="lora_B"):
        lk.dora_weight_norm(w4, t["lora_A"], t["lora_B"][:4], SCALING)


# ---- the layer ------------------------------------------------------------------------------------------------


def _layer(dtype=torch.float32, **options):
    torch.manual_seed(0)
    return lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 96), r=4, lora_alpha=8, use_dora=True,
                                      adapter_dtype=dtype, compute_dtype=dtype, **options)


def _trained(layer):
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(layer.out_features).to(layer.lora_magnitude))
    return layer


def test_fresh_qdora_layer_is_the_base_layer_and_trains_every_part():
    layer = _layer()
    x = torch.randn(5, 128)
    qlora = lk.LoRALinear4bit(layer.base_weight(), layer.bias, r=4, lora_alpha=8)
    assert torch.equal(layer(x), qlora(x))  # m = ‖W0‖, B = 0: g = 1 exactly
    _trained(layer)
    layer.train()
    layer(x).square().sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} >= {"lora_A", "lora_B", "lora_magnitude"}
    assert layer.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qdora_eval_keeps_the_gain_and_gives_the_bits_of_the_op(dtype, monkeypatch):
    """As for a dense W0 (test_dora.py): a forward without gradient reuses the cached g, and returns the op's bits."""
    from lora_kernels.ops import dora_linear as dora_ops

    layer = _trained(_layer(dtype)).eval()
    calls = []
    original = dora_ops._gain
    monkeypatch.setattr(dora_ops, "_gain", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(3, 128, dtype=dtype)
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert not calls
    with_grad = layer(x)
    assert calls and torch.equal(first, second) and torch.equal(first, with_grad.detach())
    with torch.no_grad():
        layer.lora_magnitude.mul_(0.5)
        assert not torch.equal(layer(x), first)


def test_qdora_layer_merges_and_unloads():
    layer = _trained(_layer()).eval()
    x = torch.randn(6, 128)
    y = layer(x)
    dense = layer.merge_and_unload()
    assert type(dense) is torch.nn.Linear
    torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-5)
    codes = layer.weight.detach().clone()
    layer.merge(requantize=True)  # g ⊙ (W0 + s·BA), requantized: within the 4-bit error it records
    bound = layer.merge_error * x.abs().sum(1).max() * 1.01
    assert (layer(x) - y).abs().max() <= bound
    layer.unmerge()
    assert torch.equal(layer.weight, codes) and torch.equal(layer(x), y)


def test_qdora_state_dict_round_trip_and_torch_compile():
    layer = _trained(_layer())
    x = torch.randn(4, 128)
    y = layer(x)
    state = layer.state_dict()
    assert "lora_magnitude" in state and "weight.absmax" in state
    other = _layer()
    other.load_state_dict(state)
    assert torch.equal(other(x), y)
    compiled = torch.compile(other, fullgraph=True)
    torch.testing.assert_close(compiled(x), y)
    other.train()
    compiled(x).sum().backward()
    assert other.lora_magnitude.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_qdora_layer_with_float32_adapters_on_bfloat16_matches_the_oracle(dropout):
    torch.manual_seed(0)
    layer = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 96), r=4, lora_alpha=4 * SCALING, use_dora=True,
                                       compute_dtype=torch.bfloat16, adapter_dtype=torch.float32,
                                       lora_dropout=dropout)
    _trained(layer).train()
    assert layer.lora_magnitude.dtype == torch.float32
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    t = {"x": x, "bias": layer.bias.detach().to(torch.bfloat16), "lora_A": layer.lora_A.detach(),
         "lora_B": layer.lora_B.detach(), "magnitude": layer.lora_magnitude.detach()}
    w4 = layer.base_weight()
    torch.manual_seed(1234)
    y = layer(x)
    torch.manual_seed(1234)
    y_ours, _ = _run(w4, t, dropout)
    torch.testing.assert_close(y, y_ours, rtol=0, atol=0)
    y_exact, _ = _run(w4, t, dropout, "exact")
    y_plain, _ = _run(w4, t, dropout, "plain")
    testing.assert_all_match_reference(["y"], (y,), (y_exact,), (y_plain,))


# ---- PEFT QDoRA models ----------------------------------------------------------------------------------------


def _qdora_peft(tmp_path, compute_dtype, dropout=0.0):

    peft = pytest.importorskip("peft")
    base = _qlora_base(compute_dtype, tmp_path / "base")

    def build():
        model = base()
        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                           use_dora=True, lora_dropout=dropout))
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude" in name:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g).to(p))
                elif "lora_B" in name:
                    p.normal_(0, 0.05, generator=g)
        return model

    return base, build


@needs_bnb
@pytest.mark.parametrize("compute_dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=str)
def test_patched_peft_qdora_model_gives_peft_outputs_and_gradients(compute_dtype, tolerance, tmp_path,
                                                                    monkeypatch):
    """A transformers QLoRA model with PEFT DoRA adapters (use_dora=True on bitsandbytes Linear4bit layers): every
    layer is patched and runs dora_linear on the 4-bit weight; logits and every gradient (magnitudes included) are
    PEFT's within the compute dtype's rounding."""
    from lora_kernels.peft import patch_peft_model

    _, build = _qdora_peft(tmp_path, compute_dtype)
    ours, theirs = build(), build()
    report = patch_peft_model(ours)
    assert len(report.patched) == 14 and not report.skipped, report
    calls = []
    original = lk.peft.cached_dora_linear
    monkeypatch.setattr(lk.peft, "cached_dora_linear", lambda *a, **k: calls.append(isinstance(a[2], Weight4bit))
                        or original(*a, **k))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert len(calls) == 14 and all(calls)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=tolerance, atol=tolerance)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    grads = assert_same_gradients(ours, theirs, tolerance)
    assert any("lora_magnitude" in n for n in grads)


@needs_bnb
def test_qdora_adapter_files_both_ways_and_merge_and_unload(tmp_path):
    """A PEFT QDoRA adapter into a bitsandbytes 4-bit model (LoRALinear4bit(use_dora=True) layers), written back
    for PeftModel.from_pretrained: PEFT's logits both ways; merge_and_unload gives PEFT's merged logits."""
    from lora_kernels.peft import load_peft_adapter, save_peft_adapter

    peft = pytest.importorskip("peft")
    base, build = _qdora_peft(tmp_path, torch.float32, dropout=0.1)
    model = build()
    model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(ids).logits
        ours = load_peft_adapter(base(), tmp_path / "peft").eval()
        layer = ours.model.layers[0].mlp.down_proj
        assert isinstance(layer, lk.LoRALinear4bit) and layer.use_dora and layer.lora_dropout == 0.1
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        save_peft_adapter(ours, tmp_path / "ours")
        again = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
        assert again.peft_config["default"].use_dora
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)
        merged = lk.merge_and_unload(ours)
        assert not any(isinstance(m, lk.LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_inject_lora_use_dora_on_a_quantized_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    x = torch.randn(7, 64)
    lk.inject_lora(model, "all-linear", r=4, quantize="nf4")
    expected = model(x)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    lk.inject_lora(model, "all-linear", r=4, quantize="nf4", use_dora=True)
    layers = [m for m in model if isinstance(m, lk.LoRALinear4bit)]
    assert len(layers) == 2 and all(layer.use_dora for layer in layers)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A", "0.lora_B", "0.lora_magnitude", "2.lora_A", "2.lora_B", "2.lora_magnitude"]


@needs_bnb
def test_patched_peft_qdora_layer_under_torch_compile_fullgraph():
    """A PEFT DoRA layer on a bitsandbytes Linear4bit, patched, compiled with fullgraph=True: PEFT's output, the
    eager output exactly, and the magnitude trains (the norm is computed in the graph by the 4-bit norm op)."""
    peft = pytest.importorskip("peft")
    from benchmarks.providers import peft_linear4bit
    from lora_kernels.peft import patch_peft_model

    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64)
    layer = peft_linear4bit(base, Weight4bit.quantize(base.weight.detach(), 64, "nf4", True), 8, 16, use_dora=True)
    assert isinstance(layer, peft.tuners.lora.bnb.Linear4bit)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    model = torch.nn.Sequential(layer)
    x = torch.randn(5, 128)
    expected = model(x)
    assert len(patch_peft_model(model).patched) == 1
    eager = model(x)
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    assert torch.equal(y, eager)
    y.square().sum().backward()
    assert layer.lora_magnitude_vector["default"].weight.grad is not None
