"""4-bit base weights (QLoRA): bitsandbytes' layout byte for byte, the dequantization bit for bit, and lora_linear
on a Weight4bit against reference.py on every backend and CPU ISA, outputs and gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference, testing
from lora_kernels.functional import draw_seed
from lora_kernels.ops.lora_linear_4bit import TRITON_4BIT  # tl.gather: Triton 3.2 and later
from lora_kernels.weight4bit import Weight4bit, code_table, dynamic_code

from conftest import DEVICE, DTYPES, assert_matches_reference, compiled_backends

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (./run.sh setup installs it)")
ISAS = ["avx512", "avx2", "scalar"]  # forced through LORA_KERNELS_CPU_ISA (a lower one than the CPU's is honoured)
# (out, in): in not a multiple of the blocksize, blocks across rows, an odd element count, a single element
WEIGHT_SHAPES = [(37, 129), (64, 64), (5, 7), (300, 1000), (1, 1), (33, 96)]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _bnb_reference_kernel(op):
    """bitsandbytes' reference (PyTorch) backend of `op`, which its CUDA kernels follow: its CPU library kernels
    differ in two places (test_bnb_cpu_library_differences)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return lambda *args: op.redispatch(keys, *args)


# ---- the layout, against bitsandbytes --------------------------------------------------------------------------


@needs_bnb
def test_tables_are_bitsandbytes():
    import bitsandbytes.functional as F

    assert torch.equal(code_table("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_code(), F.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_writes_bitsandbytes_bytes(dtype, blocksize, quant_type, double_quant):
    import bitsandbytes.functional as F

    quantize_blockwise = _bnb_reference_kernel(torch.ops.bitsandbytes.quantize_blockwise.default)
    for shape in WEIGHT_SHAPES:
        w = _weight(shape, dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        ours = Weight4bit.quantize(w, blocksize, quant_type, double_quant)
        assert torch.equal(ours.codes, packed.view(-1)), shape
        assert ours.shape == tuple(state.shape) and ours.dtype == state.dtype
        if not double_quant:
            assert torch.equal(ours.absmax, state.absmax), shape
            continue
        assert torch.equal(ours.offset, state.offset)
        # the library kernel stores 0 where the reference stores its 1e-38 floor (an all-zero partial block)
        torch.testing.assert_close(ours.nested_absmax, state.state2.absmax, rtol=0, atol=1e-37)
        _, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, blocksize, quant_type, torch.uint8)
        codes, nested_absmax = quantize_blockwise(absmax - absmax.mean(), F.create_dynamic_map(), 256)
        assert torch.equal(ours.absmax, codes) and torch.equal(ours.nested_absmax, nested_absmax), shape


@needs_bnb
def test_bnb_cpu_library_differences():
    """What bitsandbytes 0.50's CPU library does differently from its own reference backend (and from us), pinned
    so that a change on either side is noticed: (1) its 8-bit search codes ~0.1% of double-quantized scales one
    step off near midpoints; (2) its dequantize_4bit is wrong when a block spans rows (blocksize > in_features)."""
    import bitsandbytes.functional as F

    w = _weight((257, 3001))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = Weight4bit.quantize(w, 64, "nf4", True)
    steps = (state.absmax.int() - ours.absmax.int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
    # the values we decode from bitsandbytes' own bytes are its dequantize_4bit's, bit for bit
    theirs = Weight4bit.from_bnb(_Params(packed, state))
    assert torch.equal(theirs.dequantize(torch.float32), F.dequantize_4bit(packed, state))
    w = _weight((64, 64))
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4")
    dequantize = _bnb_reference_kernel(torch.ops.bitsandbytes.dequantize_4bit.default)
    ref = dequantize(packed, state.absmax, 128, "nf4", (64, 64), torch.float32)
    assert torch.equal(Weight4bit.quantize(w, 128).dequantize(torch.float32), ref)


class _Params:
    """The two attributes of a bitsandbytes Params4bit that from_bnb reads."""

    def __init__(self, data, quant_state):
        self.data, self.quant_state = data, quant_state


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_is_bitsandbytes_bit_for_bit(blocksize, quant_type, double_quant):
    import bitsandbytes.functional as F

    dequantize = _bnb_reference_kernel(torch.ops.bitsandbytes.dequantize_4bit.default)
    for shape in WEIGHT_SHAPES:
        packed, state = F.quantize_4bit(_weight(shape), blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        ours = Weight4bit.from_bnb(_Params(packed, state))
        scales = ours.scales()
        if double_quant:  # bitsandbytes' decoding of double-quantized scales
            nested = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
            assert torch.equal(scales, nested)
        for dtype in DTYPES:
            expected = dequantize(packed, scales, blocksize, quant_type, shape, dtype)
            assert torch.equal(ours.dequantize(dtype), expected), (shape, dtype)
            if shape[1] % blocksize == 0:  # the public function (its CPU library kernel) too, where that one is right
                state.dtype = dtype
                assert torch.equal(ours.dequantize(dtype), F.dequantize_4bit(packed, state)), (shape, dtype)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_round_trip_shares_memory(double_quant):
    import bitsandbytes as bnb

    # in_features a multiple of the blocksize: bitsandbytes' CPU kernels are wrong when blocks span rows
    layer = bnb.nn.Linear4bit(128, 33, bias=True, compress_statistics=double_quant, quant_type="nf4",
                              compute_dtype=torch.float32)
    layer.load_state_dict({"weight": _weight((33, 128)), "bias": torch.zeros(33)})
    layer = layer.to("cpu")  # bitsandbytes quantizes on the move
    ours = Weight4bit.from_bnb(layer.weight)
    assert ours.codes.data_ptr() == layer.weight.data.data_ptr()
    assert ours.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    back = ours.to_bnb()
    assert back.data.data_ptr() == layer.weight.data.data_ptr()
    x = torch.randn(5, 128)
    assert torch.equal(bnb.functional.dequantize_4bit(back.data, back.quant_state), ours.dequantize(torch.float32))
    # the state dict bitsandbytes writes, read by us; ours, read by bitsandbytes' QuantState
    state = layer.state_dict()
    assert torch.equal(Weight4bit.from_state_dict(state).dequantize(), ours.dequantize())
    entries = ours.state_dict_entries("weight")
    assert set(entries) == {k for k in state if k.startswith("weight")}
    # what transformers does with a saved 4-bit checkpoint: Params4bit.from_prequantized
    loaded = bnb.nn.Params4bit.from_prequantized(
        entries["weight"], {k.removeprefix("weight."): v for k, v in entries.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(loaded.data, loaded.quant_state), ours.dequantize())
    torch.testing.assert_close(layer(x), x @ ours.dequantize().t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_nbytes_per_weight():
    w4 = Weight4bit.quantize(_weight((512, 1024)), 64, "nf4", double_quant=True)
    assert w4.nbytes() / (512 * 1024) <= 0.517
    assert Weight4bit.quantize(_weight((512, 1024)), 64).nbytes() / (512 * 1024) == 0.5625


# ---- the CPU kernels' dequantization -------------------------------------------------------------------------


@pytest.mark.skipif(lk.compiled_extension() is None, reason="lora_kernels._C is not built")
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_dequantize_is_the_reference_bit_for_bit(isa, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_ISA", isa)
    for shape in WEIGHT_SHAPES:
        for blocksize, double_quant in ((32, False), (64, True), (128, False)):
            w4 = Weight4bit.quantize(_weight(shape), blocksize, "nf4", double_quant)
            for dtype in DTYPES:
                ours = torch.ops.lora_kernels.dequantize_4bit(*w4.kernel_args()[:6], *shape, blocksize, dtype)
                assert torch.equal(ours, w4.dequantize(dtype)), (shape, blocksize, dtype)


@pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_dequantize_is_the_reference_bit_for_bit(quant_type):
    """The fused GEMMs' tile dequantization (triton_common.dequantized_tile), whole: every element, both tile
    paths (aligned rows and blocks across rows), a weight with more than 256 blocks (several nested scales)."""
    from lora_kernels.ops.triton_lora_linear import dequantize_4bit as triton_dequantize

    for shape in WEIGHT_SHAPES[:3] + [(80, 256), (1, 1)]:
        for blocksize, double_quant in ((32, True), (64, True), (128, False)):
            w4 = Weight4bit.quantize(_weight(shape), blocksize, quant_type, double_quant).to(DEVICE)
            for dtype in DTYPES:
                ours = triton_dequantize(w4.kernel_args(), shape[1], dtype)
                assert torch.equal(ours, w4.dequantize(dtype)), (shape, blocksize, dtype)
                if lk.compiled_extension() is not None and DEVICE == "cpu":  # and the CPU kernels' own
                    cpu = torch.ops.lora_kernels.dequantize_4bit(*w4.kernel_args()[:6], *shape, blocksize, dtype)
                    assert torch.equal(ours, cpu), (shape, blocksize, dtype)


# ---- lora_linear on a 4-bit weight ------------------------------------------------------------------------------

SCALING = 1.5
# (leading dims of x, in, out, r, blocksize, double_quant)
# M = 1, 3, 15 and 16 take the fused decode path (up to 16 rows: every row-group kernel, 16 = AVX-512's widest), the
# others the panels
SHAPES = [((0,), 96, 33, 4, 64, True), ((1,), 129, 37, 3, 64, True), ((37,), 129, 37, 16, 32, False),
          ((5, 7), 64, 70, 8, 128, True), ((3,), 1000, 300, 4, 64, False), ((15,), 256, 40, 4, 64, True),
          ((2, 8), 128, 33, 4, 128, False), ((2,), 256, 80, 4, 32, True), ((40,), 128, 48, 8, 64, True),
          ((3, 7), 256, 40, 16, 32, False)]
# The Triton interpreter is slow: its cases leave out the 1000-wide one. The others cover the same paths: rows that
# start a scale block (in % blocksize == 0: the fused GEMMs, decode at M <= 16 and the large-M tiles) and rows
# that do not (Triton dequantizes those weights first)
TRITON_SHAPES = [s for s in SHAPES if s[1] * s[2] <= 50_000]


def _inputs(lead, in_f, out_f, r, blocksize, double_quant, dtype, adapter_dtype=None):
    g = torch.Generator().manual_seed(3)
    adapter_dtype = adapter_dtype or dtype
    w4 = Weight4bit.quantize((torch.randn(out_f, in_f, generator=g) * 0.05), blocksize, "nf4", double_quant)
    return {"x": torch.randn(*lead, in_f, generator=g).to(dtype), "weight": w4,
            "bias": (torch.randn(out_f, generator=g) * 0.1).to(dtype),
            "lora_A": (torch.randn(r, in_f, generator=g) * 0.1).to(adapter_dtype),
            "lora_B": (torch.randn(out_f, r, generator=g) * 0.1).to(adapter_dtype)}


def _run(t, dropout_p, oracle=None):
    """y and the gradients of (x, lora_A, lora_B, bias) under a fixed dropout seed. oracle: None (ours), "plain"
    (the reference on the weight dequantized in x's dtype) or "exact" (the same in float64)."""
    cast = (lambda v: v.double()) if oracle == "exact" else (lambda v: v)
    leaves = {k: cast(v).detach().clone().requires_grad_() for k, v in t.items() if k != "weight"}
    torch.manual_seed(1234)
    if oracle is None:
        y = lk.lora_linear(leaves["x"], t["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], SCALING,
                           dropout_p, training=True)
    else:
        seed = int(draw_seed()) if dropout_p else None
        weight = cast(t["weight"].dequantize(t["x"].dtype))
        x2d = leaves["x"].reshape(-1, leaves["x"].shape[-1])
        y, _ = reference.lora_linear(x2d, weight, leaves["bias"], leaves["lora_A"], leaves["lora_B"], SCALING,
                                     dropout_p, seed)
        y = y.view(*leaves["x"].shape[:-1], t["weight"].out_features)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad(y, [leaves[k] for k in ("x", "lora_A", "lora_B", "bias")], grad_y)


def _check(t, dropout_p):
    y, grads = _run(t, dropout_p)
    y_exact, grads_exact = _run(t, dropout_p, "exact")
    y_plain, grads_plain = _run(t, dropout_p, "plain")
    assert_matches_reference(y, y_exact, y_plain, "y")
    for name, ours, exact, plain in zip(("dx", "dA", "dB", "dbias"), grads, grads_exact, grads_plain):
        assert_matches_reference(ours, exact, plain, name)


def _backend_isa_cases():
    yield "reference", None
    if "cpu" in compiled_backends():
        for isa in ISAS:
            yield "cpu", isa
    if "triton" in compiled_backends() and TRITON_4BIT:  # a GPU, or the interpreter on CPU tensors
        yield "triton", None


KERNEL_BACKENDS = ["reference"] + [b for b in compiled_backends()
                                   if b == "cpu" or (b == "triton" and TRITON_4BIT)]


def _cases():
    """(backend, variant, shape): the cpu backend per ISA; the triton backend on its fused path for every shape and
    on its dequantize path (W0 dequantized whole, then the 16-bit kernels) for two."""
    for backend, isa in _backend_isa_cases():
        if backend != "triton":
            yield from ((backend, isa, shape) for shape in SHAPES)
        else:
            yield from (("triton", "fused", shape) for shape in TRITON_SHAPES)
            yield from (("triton", "dequantize", shape) for shape in TRITON_SHAPES if shape[0] in ((15,), (40,)))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,variant,shape", list(_cases()), ids=str)
def test_lora_linear_4bit_matches_reference(backend, variant, shape, dtype, dropout_p, use_backend, monkeypatch):
    use_backend(backend)
    if backend == "cpu":
        monkeypatch.setenv("LORA_KERNELS_CPU_ISA", variant)
    elif backend == "triton":
        monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", variant)
    _check(_inputs(*shape, dtype), dropout_p)


@pytest.mark.parametrize("in_features", [129, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float32_adapters_on_a_16bit_compute_dtype(backend, dtype, in_features, use_backend, monkeypatch):
    use_backend(backend)
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")  # the triton backend's own 4-bit GEMMs
    for lead in ((37,), (3,)):  # the large-M and the decode paths
        _check(_inputs(lead, in_features, 37, 4, 64, True, dtype, adapter_dtype=torch.float32), 0.25)


@pytest.mark.skipif("triton" not in compiled_backends() or not TRITON_4BIT, reason="triton backend not available")
@pytest.mark.parametrize("case", range(16))
def test_triton_4bit_kernels_on_random_layers_against_the_float64_oracle(case, use_backend, monkeypatch):
    """Random layers on the triton backend's 4-bit kernels, each path: M from 1 to 40 (decode and large-M tiles),
    out_features of any size, ranks past the 64-rank chunk (r > 64 leaves the decode path), blocksizes 32-128,
    NF4 or FP4, double quantized or not, every dtype (float32 adapters on 16 bits too), dropout, with and without
    bias; the scaling as a number or, as a layer on a GPU passes it, a 0-d tensor read in the kernel."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    g = torch.Generator().manual_seed(1000 + case)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    blocksize = pick([32, 64, 128])
    M, in_f = pick([1, 3, 16, 17, 40]), blocksize * pick([1, 2, 3])
    out_f, r = int(torch.randint(1, 70, (1,), generator=g)), pick([1, 5, 16, 65, 80])
    quant_type, double_quant = pick([("nf4", True), ("nf4", False), ("fp4", True)])
    dtype, adapter_dtype = pick([(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
    p, has_bias, path = pick([0.0, 0.3]), pick([True, False]), ("fused", "dequantize")[case % 2]
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", path)
    w4 = Weight4bit.quantize(torch.randn(out_f, in_f, generator=g) * 0.1, blocksize, quant_type, double_quant)
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    x, grad_y = rand(M, in_f), rand(M, out_f)
    bias = rand(out_f) if has_bias else None
    A, B = rand(r, in_f, dt=adapter_dtype) * 0.2, rand(out_f, r, dt=adapter_dtype) * 0.2
    scaling = 1.75 if case % 4 < 2 else torch.tensor(1.75, dtype=torch.float64)
    seed = torch.tensor(31 + case) if p else None
    y, xa = lin.Weight4bitBackend.forward(x, w4.kernel_args(), bias, A, B, scaling, p, seed)
    dx, dA, dB = lin.Weight4bitBackend.backward(grad_y, x, w4.kernel_args(), A, B, xa, scaling, p, seed, True)
    sv = int(seed) if seed is not None else None
    exact, plain = testing.lora_linear_oracles(grad_y, x, w4.dequantize(dtype), bias, A, B, 1.75, p, sv)
    names = [f"{name} ({M}x{in_f}->{out_f} r={r} {dtype} {path})" for name in testing.LORA_OUTPUTS]
    testing.assert_all_match_reference(names, (y, xa, dx, dA, dB), exact, plain)


@pytest.mark.skipif("triton" not in compiled_backends() or not TRITON_4BIT, reason="triton backend not available")
def test_triton_4bit_decode_split_over_k(monkeypatch, use_backend):
    """The 4-bit decode of a narrow layer split over K (slices of whole dequantized tiles, then the finish kernel),
    outputs and gradients against the reference, with dropout."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")
    monkeypatch.setattr(lin.gpu_paths, "decode_splits", lambda M, N, K, r, w4, sms: 3)
    for dtype in (torch.float32, torch.bfloat16):
        _check(_inputs((5,), 320, 40, 8, 64, True, dtype), 0.25)


def test_triton_4bit_path_follows_the_cost_model_unless_forced(monkeypatch):
    """gpu_paths.path_4bit: the fused 4-bit GEMMs at decode, W0 dequantized whole for training-size batches (the
    roofline model's verdict: every row block re-dequantizes the tiles it reads); the variable overrides it."""
    from lora_kernels import cost_model, gpu_paths

    monkeypatch.delenv("LORA_KERNELS_4BIT_PATH", raising=False)
    assert gpu_paths.path_4bit("forward", 1, 4096, 4096, 16) == "fused"
    assert gpu_paths.path_4bit("forward", 8192, 4096, 4096, 16) == "dequantize"
    for step in ("forward", "backward"):
        for M in (1, 16, 2048):
            fused = cost_model.step_us_4bit(step, "fused", M, 4096, 14336, 16)
            dequantized = min(cost_model.step_us_4bit(step, f"dequantize+{path}", M, 4096, 14336, 16)
                              for path in ("triton", "cuda"))
            assert gpu_paths.path_4bit(step, M, 4096, 14336, 16) == ("fused" if fused <= dequantized else "dequantize")
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")
    assert gpu_paths.path_4bit("forward", 8192, 4096, 4096, 16) == "fused"
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "dense")
    with pytest.raises(ValueError, match="LORA_KERNELS_4BIT_PATH"):
        gpu_paths.path_4bit("forward", 1, 4096, 4096, 16)


def test_decode_takes_the_fused_path_and_matches():
    """M = 1 and 16 float32 (the GEMV that reads the packed weight once) against the panel path at M = 17."""
    t = _inputs((17,), 1000, 300, 4, 64, True, torch.float32)
    with torch.no_grad():
        panels = lk.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING)
        for rows in (1, 16):
            fused = lk.lora_linear(t["x"][:rows], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING)
            torch.testing.assert_close(fused, panels[:rows], rtol=1e-5, atol=1e-5)


def test_weight_is_never_dequantized_whole_by_the_cpu_kernels(monkeypatch):
    """The op never calls Weight4bit.dequantize / reference.dequantize_4bit on the cpu backend."""
    if "cpu" not in compiled_backends():
        pytest.skip("lora_kernels._C is not built")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("the whole weight was dequantized")

    monkeypatch.setattr(reference, "dequantize_4bit", refuse)
    t = _inputs((37,), 129, 37, 4, 64, True, torch.float32)
    x = t["x"].requires_grad_()
    lk.lora_linear(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, 0.1, True).sum().backward()
    assert x.grad is not None


def test_bad_4bit_weights_get_clear_errors():
    w4 = Weight4bit.quantize(_weight((33, 96)), 64, "nf4", True)
    with pytest.raises(ValueError, match="codes must hold"):
        Weight4bit(w4.codes[:-1], w4.absmax, w4.shape, 64, "nf4", torch.float32, w4.nested_absmax, w4.offset)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Weight4bit(w4.codes, w4.absmax, w4.shape, 48)
    with pytest.raises(ValueError, match="absmax must be float32"):
        Weight4bit(w4.codes, w4.absmax, w4.shape, 64)  # uint8 scales without their nested absmax
    with pytest.raises(ValueError, match="absmax must be uint8"):
        Weight4bit(w4.codes, w4.absmax[:-1], w4.shape, 64, "nf4", torch.float32, w4.nested_absmax, w4.offset)
    with pytest.raises(ValueError, match="quant_type"):
        Weight4bit.quantize(_weight((4, 4)), 64, "int4")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Weight4bit.quantize(_weight((4, 4)).double(), 64)
    x, A, B = torch.randn(3, 95), torch.randn(2, 96), torch.randn(33, 2)
    with pytest.raises(ValueError, match="in_features=96"):
        lk.lora_linear(x, w4, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lk.lora_linear(torch.randn(3, 96), w4, None, A, torch.randn(32, 2), 1.0)
    with pytest.raises(ValueError, match="bias"):
        lk.lora_linear(torch.randn(3, 96), w4, torch.randn(32), A, B, 1.0)


@pytest.mark.skipif(lk.compiled_extension() is None, reason="lora_kernels._C is not built")
def test_opcheck_4bit_op():
    from lora_kernels.ops.lora_linear_4bit import lora_linear_4bit_op

    t = _inputs((5,), 96, 33, 4, 64, True, torch.float32)
    args = (t["x"].requires_grad_(), *t["weight"].kernel_args(), t["bias"], t["lora_A"].requires_grad_(),
            t["lora_B"].requires_grad_(), torch.tensor(1.5, dtype=torch.float64), 0.1, draw_seed())
    torch.library.opcheck(lora_linear_4bit_op.custom_op, args)


def test_compiles_fullgraph_without_recompiles_when_the_adapter_changes():
    t = _inputs((5,), 96, 33, 4, 64, True, torch.float32)
    w4 = t["weight"]
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def step(x, bias, A, B, scaling):
        return lk.lora_linear(x, w4, bias, A, B, scaling, 0.1, training=True)

    x = t["x"].requires_grad_()
    for alpha in (1.0, 3.0):
        y = step(x, t["bias"], torch.randn(4, 96), torch.randn(33, 4), torch.tensor(alpha, dtype=torch.float64))
        y.sum().backward()
    assert counts["n"] == 1

    @torch.compile(fullgraph=True, backend=backend)
    def infer(x, A, B, scaling):
        return lk.lora_linear(x, w4, t["bias"], A, B, scaling)

    A, B = torch.randn(4, 96), torch.randn(33, 4)
    torch.testing.assert_close(infer(t["x"], A, B, torch.tensor(2.0, dtype=torch.float64)),
                               lk.lora_linear(t["x"], w4, t["bias"], A, B, 2.0))


# ---- modules and interop ------------------------------------------------------------------------------------


def test_lora_linear4bit_module_trains_merges_and_unloads():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 33)
    layer = lk.LoRALinear4bit.quantize(linear, r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 128)
    w0 = layer.base_weight().dequantize(torch.float32)
    expected = x @ w0.t() + linear.bias + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and layer.bias.grad is not None
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="requantize"):
        layer.merge()
    merged = layer.merge_and_unload()
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    codes = layer.weight.detach().clone()
    exact = merged.weight.detach()
    layer.merge(requantize=True)
    requantized = layer.base_weight().dequantize(torch.float32)
    assert layer.merge_error == float((requantized - exact).abs().max()) > 0
    torch.testing.assert_close(layer(x), x @ requantized.t() + linear.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.state_dict()["weight"], codes)  # the state dict keeps W0's codes
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.scaling = 3.0
    layer.unmerge()
    assert torch.equal(layer.weight, codes) and torch.equal(layer.base_weight().dequantize(), w0)
    layer.adapter_disabled = True
    torch.testing.assert_close(layer(x), x @ w0.t() + linear.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "float32_absmax"])
def test_lora_linear4bit_state_dict_round_trip(double_quant):
    """bitsandbytes' keys only (the scale parameters' own names are not written), read back exactly."""
    torch.manual_seed(0)
    a = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 33), r=4, double_quant=double_quant)
    torch.nn.init.normal_(a.lora_B)
    state = a.state_dict()
    assert not any(k.startswith("weight_") for k in state)
    assert state["weight.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
    b = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 33), r=4, double_quant=double_quant)
    b.load_state_dict(state)
    x = torch.randn(3, 128)
    assert torch.equal(a(x), b(x))
    wrong = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 33), r=4, blocksize=128, double_quant=double_quant)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        wrong.load_state_dict(a.state_dict())


def test_inject_lora_quantize_nf4_without_bitsandbytes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    dense = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    lk.inject_lora(model, "all-linear", r=4, quantize="nf4")
    layers = [m for m in model if isinstance(m, lk.LoRALinear4bit)]
    assert len(layers) == 2
    for layer, w in zip(layers, dense):
        assert torch.equal(layer.base_weight().codes, Weight4bit.quantize(w, 64, "nf4", True).codes)
    x = torch.randn(7, 64)
    model(x).sum().backward()
    assert all(layer.lora_A.grad is not None for layer in layers)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


def _qlora_base(compute_dtype, tmp_path):
    """A builder of a tiny transformers Llama loaded in 4 bits by bitsandbytes (nf4, double quant, on CPU).

    On a CPU with AVX512-BF16, bitsandbytes runs a Linear4bit's forward without gradients in eval mode through
    its own bfloat16 kernel (the weight repacked in place, x rounded to bfloat16: ~1e-3 off the float32
    function); the models built here keep its float32 path, the function PEFT's layers compute everywhere else
    and the one the comparisons hold ours to."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)

    def build():
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization,
                                                              device_map="cpu")
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return model

    return build


def _qlora_models(compute_dtype, tmp_path):
    peft = pytest.importorskip("peft")
    base = _qlora_base(compute_dtype, tmp_path)

    def build():
        model = base()
        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    return build(), build()


@needs_bnb
def test_peft_qlora_adapters_load_into_and_save_from_a_4bit_model(tmp_path):
    """A PEFT QLoRA adapter into a bitsandbytes 4-bit model (LoRALinear4bit layers, sized by the layers' features,
    not by the packed weight's shape), and written back for PeftModel.from_pretrained: PEFT's logits both ways."""
    from lora_kernels.peft import load_peft_adapter, save_peft_adapter

    peft = pytest.importorskip("peft")
    base = _qlora_base(torch.float32, tmp_path / "base")
    model = peft.get_peft_model(base(), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(ids).logits
        plain = base()(ids).logits
        ours = load_peft_adapter(base(), tmp_path / "peft").eval()
        assert isinstance(ours.model.layers[0].mlp.down_proj, lk.LoRALinear4bit)
        got = ours(ids).logits
        assert (expected - plain).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        save_peft_adapter(ours, tmp_path / "ours")
        again = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-4, atol=1e-4)


@needs_bnb
@pytest.mark.parametrize("compute_dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=str)
def test_patch_peft_serves_qlora_layers_as_peft_computes_them(compute_dtype, tolerance, tmp_path):
    """A transformers QLoRA model (BitsAndBytesConfig nf4 + double quant, on CPU) wrapped by PEFT: every LoRA layer
    is patched, and logits and every gradient match PEFT's own (within the compute dtype's rounding)."""
    from lora_kernels.peft import patch_peft_model

    ours, theirs = _qlora_models(compute_dtype, tmp_path)
    report = patch_peft_model(ours)
    assert len(report.patched) == 14 and not report.skipped, report
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=tolerance, atol=tolerance)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    assert_same_gradients(ours, theirs, tolerance)


def assert_same_gradients(ours, theirs, tolerance) -> dict:
    """The same parameters got gradients in both models, each within tolerance of its largest element; returns
    theirs (name -> gradient)."""
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert grads and {n for n, p in ours.named_parameters() if p.grad is not None} == set(grads)
    for name, p in ours.named_parameters():
        if p.grad is not None:
            scale = grads[name].abs().max()
            torch.testing.assert_close(p.grad / scale, grads[name] / scale, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"{name}: {m}")
    return grads


@needs_bnb
def test_lora_from_a_bitsandbytes_linear4bit_shares_it():
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(128, 33, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    base.load_state_dict({"weight": _weight((33, 128)), "bias": torch.zeros(33)})
    base = base.to("cpu")
    layer = lk.LoRALinear.from_linear(base, r=4)
    assert isinstance(layer, lk.LoRALinear4bit) and layer.weight.data_ptr() == base.weight.data_ptr()
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)  # B = 0: the base layer
    unloaded = layer.unload()
    assert type(unloaded) is bnb.nn.Linear4bit
    torch.testing.assert_close(unloaded(x), base(x), rtol=0, atol=0)


# ---- many adapters on one 4-bit base ---------------------------------------------------------------------------


def _multi_run(w4, t, ids, ranks, dropout_p, oracle=None):
    cast = (lambda v: v.double()) if oracle == "exact" else (lambda v: v)
    leaves = {k: cast(v).detach().clone().requires_grad_() for k, v in t.items()}
    scalings = torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64)
    torch.manual_seed(1234)
    if oracle is None:
        y = lk.lora_linear_multi(leaves["x"], w4, leaves["bias"], leaves["lora_A"], leaves["lora_B"], scalings, ids,
                                 ranks, dropout_p, training=True)
    else:
        seed = int(draw_seed()) if dropout_p else None
        dropouts = torch.full((3,), float(dropout_p), dtype=torch.float64)
        y, _ = reference.lora_linear_multi(leaves["x"], cast(w4.dequantize(t["x"].dtype)), leaves["bias"],
                                           leaves["lora_A"], leaves["lora_B"], scalings, ids, ranks, dropouts, seed)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad(y, [leaves[k] for k in ("x", "lora_A", "lora_B", "bias")], grad_y)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "scattered"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("in_f", [129, 128])
def test_lora_linear_multi_on_a_4bit_base(backend, grouped, dtype, dropout_p, in_f, use_backend, monkeypatch):
    use_backend(backend)
    monkeypatch.setenv("LORA_KERNELS_4BIT_PATH", "fused")
    g = torch.Generator().manual_seed(5)
    M, out_f, n, r_max = 37, 37, 3, 8
    w4 = Weight4bit.quantize(torch.randn(out_f, in_f, generator=g) * 0.05, 64, "nf4", True)
    t = {"x": torch.randn(M, in_f, generator=g).to(dtype), "bias": (torch.randn(out_f, generator=g) * 0.1).to(dtype),
         "lora_A": (torch.randn(n, r_max, in_f, generator=g) * 0.1).to(dtype),
         "lora_B": (torch.randn(n, out_f, r_max, generator=g) * 0.1).to(dtype)}
    ids = torch.tensor([a for a in (-1, 0, 1, 2) for _ in range(10)][:M]) if grouped else \
        torch.randint(-1, n, (M,), generator=g)
    ranks = torch.tensor([8, 3, 5])
    y, grads = _multi_run(w4, t, ids, ranks, dropout_p)
    y_exact, grads_exact = _multi_run(w4, t, ids, ranks, dropout_p, "exact")
    y_plain, grads_plain = _multi_run(w4, t, ids, ranks, dropout_p, "plain")
    assert_matches_reference(y, y_exact, y_plain, "y")
    for name, ours, exact, plain in zip(("dx", "dA", "dB", "dbias"), grads, grads_exact, grads_plain):
        assert_matches_reference(ours, exact, plain, name)


def _scales_of(layer) -> dict:
    w4 = layer.base_weight()
    return {"absmax": w4.absmax.clone(), "nested_absmax": w4.nested_absmax.clone(), "offset": w4.offset.clone(),
            "codes": w4.codes.clone()}


def _assert_same_scales(now: dict, before: dict) -> None:
    assert before["nested_absmax"].dtype == torch.float32 and before["absmax"].dtype == torch.uint8
    for name, value in before.items():
        assert now[name].dtype == value.dtype and torch.equal(now[name], value), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtype_casts_keep_the_4bit_scales_in_float32(dtype):
    """layer.half() / .to(bf16) casts the adapter and bias, never the float32 scales (a 16-bit copy would round
    them, and the kernels read them as float32): the cast layer computes what the float32 one does, in dtype."""
    torch.manual_seed(0)
    layer = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 96), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 128)
    expected = layer(x)
    scales = _scales_of(layer)
    cast = layer.half() if dtype == torch.float16 else layer.to(dtype)
    _assert_same_scales(_scales_of(cast), scales)
    assert cast.lora_A.dtype == dtype
    torch.testing.assert_close(cast(x.to(dtype)).float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


# ---- PEFT QLoRA models: torch.compile and mixed batches ------------------------------------------------------


def _graph_ops(captured):
    return [str(n.target) for gm in captured for n in gm.graph.nodes if n.op == "call_function"]


@needs_bnb
def test_patched_qlora_layers_compile_fullgraph_onto_the_4bit_op(tmp_path):
    """A patched PEFT QLoRA layer under torch.compile(fullgraph=True): one graph holding lora_kernels' 4-bit op (not
    bitsandbytes' path), the eager numbers, no recompile when the adapter's values change; the whole model compiles
    too (it raised RecursionError in bitsandbytes' __torch_function__ after a graph break at data_ptr)."""
    from lora_kernels.peft import patch_peft_model

    ours, _ = _qlora_models(torch.float32, tmp_path)
    patch_peft_model(ours)
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 256, requires_grad=True)
    y = compiled(x)
    expected = layer(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.sum(), x)[0], rtol=0, atol=0)
    ops = _graph_ops(captured)
    assert "lora_kernels.lora_linear_4bit.default" in ops and not any("bitsandbytes" in op for op in ops), ops
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert len(captured) == 1  # no recompile

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(ours, backend="eager")(ids).logits, ours(ids).logits,
                                   rtol=1e-5, atol=1e-5)


@needs_bnb
def test_adapter_batch_on_a_patched_qlora_model_serves_each_row_on_its_adapter(tmp_path):
    """adapter_batch on a PEFT QLoRA model: each sample on its adapter through lora_linear_multi on the 4-bit base
    (it served every row on the active adapter: off by 2.4 on a toy model), logits equal to PEFT's own mixed batch
    and, in training, the gradients of PEFT's mixed batch; a batch with an adapter the fused op cannot serve is
    PEFT's layers' mixed batch, never the active adapter for every row."""
    from lora_kernels.peft import adapter_batch, patch_peft_model

    peft = pytest.importorskip("peft")
    ours, theirs = _qlora_models(torch.float32, tmp_path)
    for model in (ours, theirs):
        torch.manual_seed(2)
        model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B.b" in name:
                torch.nn.init.normal_(p, std=0.05)
            p.requires_grad_("lora_" in name)
    patch_peft_model(ours)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "default"]
    theirs.eval()
    out_theirs = theirs(ids, labels=ids, adapter_names=names)
    with adapter_batch(ours.train(), names):
        out_ours = ours(ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-4, atol=1e-4)
    assert (out_ours.logits[0] - theirs(ids[:1], adapter_names=["default"]).logits[0]).abs().max() > 1e-3
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # an adapter the fused op does not serve (its dtype: float64 on a float32 compute dtype): PEFT's mixed batch
    for model in (ours, theirs):
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        layer.lora_A["b"].double()
        layer.lora_B["b"].double()
    with torch.no_grad(), adapter_batch(ours.eval(), names):
        torch.testing.assert_close(ours(ids).logits, theirs(ids, adapter_names=names).logits, rtol=1e-4, atol=1e-4)


# ---- MultiLoRALinear4bit: one 4-bit base, many adapters --------------------------------------------------------


def _multi_pair(dtype=torch.float32, adapter_dtype=None):
    """A MultiLoRALinear4bit and a MultiLoRALinear on its dequantized weight, holding the same two adapters."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(129, 37).to(dtype)
    ours = lk.MultiLoRALinear4bit.quantize(linear, capacity=3, r_max=8, adapter_dtype=adapter_dtype)
    dense = torch.nn.Linear(129, 37).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(ours.base_weight().dequantize(dtype))
        dense.bias.copy_(linear.bias)
    plain = lk.MultiLoRALinear.from_linear(dense, capacity=3, r_max=8, adapter_dtype=adapter_dtype)
    for layer in (ours, plain):
        torch.manual_seed(1)
        layer.add_adapter("a", r=3, lora_alpha=6)
        layer.add_adapter("b", r=8, lora_alpha=4, use_rslora=True)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    return ours, plain


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, None)], ids=str)
def test_multi_lora_linear4bit_is_multi_lora_linear_on_the_dequantized_weight(dtype, adapter_dtype):
    ours, plain = _multi_pair(dtype, adapter_dtype)
    x = torch.randn(6, 129).to(dtype)
    names = ["a", None, "b", "b", "a", None]
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    results = []
    for layer in (ours, plain):
        xg = x.clone().requires_grad_()
        y = layer(xg, adapter_names=names)
        y.float().square().sum().backward()
        results.append((y, xg.grad, layer.lora_A.grad, layer.lora_B.grad, layer.bias.grad))
    for name, a, b in zip(("y", "dx", "dA", "dB", "dbias"), *results):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        for setup in (lambda m: m.set_adapter("b"), lambda m: m.set_adapter(None),
                      lambda m: setattr(m, "adapter_disabled", True)):
            setup(ours), setup(plain)
            torch.testing.assert_close(ours(x).float(), plain(x).float(), **tol)


def test_multi_lora_linear4bit_state_merging_and_casts():
    ours, plain = _multi_pair()
    x = torch.randn(4, 129)
    names = ["b", "a", None, "a"]
    state = ours.state_dict()
    assert {"weight.absmax", "weight.quant_state.bitsandbytes__nf4", "lora_A", "scalings"} <= set(state)
    again = lk.MultiLoRALinear4bit.quantize(torch.nn.Linear(129, 37), capacity=3, r_max=8)
    again.load_state_dict(state)
    assert torch.equal(again(x, adapter_names=names), ours(x, adapter_names=names))
    assert torch.equal(again.base_weight().codes, ours.base_weight().codes)
    wrong = lk.MultiLoRALinear4bit.quantize(torch.nn.Linear(129, 37), capacity=3, r_max=8, blocksize=128)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        wrong.load_state_dict(state)

    with pytest.raises(RuntimeError, match="merge_and_unload"):
        ours.merge("a")
    merged = ours.merge_and_unload("b")
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), plain(x, adapter_names=["b"] * 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x, adapter_names=names), plain(x, adapter_names=names), rtol=1e-5, atol=1e-5)

    scales = _scales_of(ours)
    ours.to(torch.bfloat16)
    assert ours.scalings.dtype == torch.float64
    _assert_same_scales(_scales_of(ours), scales)
    torch.testing.assert_close(ours(x.bfloat16(), adapter_names=names).float(), plain(x, adapter_names=names),
                               rtol=3e-2, atol=3e-2)


def test_multi_lora_linear4bit_compiles_without_recompiles_when_adapters_change():
    ours, _ = _multi_pair()
    ours.remove_adapter("b")
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(4, 129)
    ids = torch.tensor([0, -1, 0, 0])
    torch.testing.assert_close(compiled(x, adapter_ids=ids), ours(x, adapter_ids=ids), rtol=0, atol=0)
    ours.add_adapter("c", r=5, lora_alpha=10)
    ids = torch.tensor([0, 1, -1, 1])
    torch.testing.assert_close(compiled(x, adapter_ids=ids), ours(x, adapter_ids=ids), rtol=0, atol=0)
    assert counts["n"] == 1


def test_inject_multi_lora_quantize_nf4():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    dense = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    lk.inject_multi_lora(model, "all-linear", capacity=2, r_max=4, quantize="nf4")
    layers = [m for m in model if isinstance(m, lk.MultiLoRALinear4bit)]
    assert len(layers) == 2
    for layer, w in zip(layers, dense):
        assert torch.equal(layer.base_weight().codes, Weight4bit.quantize(w, 64, "nf4", True).codes)
    lk.add_adapter(model, "a", r=4)
    with lk.adapter_batch(model, ["a", None, "a"]):
        model(torch.randn(3, 64)).sum().backward()
    assert all(layer.lora_A.grad is not None for layer in layers)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


@needs_bnb
def test_inject_multi_lora_wraps_bitsandbytes_linear4bit_layers(tmp_path):
    """inject_multi_lora on a transformers model loaded in 4 bits wraps every Linear4bit as a MultiLoRALinear4bit
    sharing its codes (it wrapped them as MultiLoRALinear layers sized by the packed weight, [n, 1]); with adapters
    at B = 0 every row is the 4-bit base model; MultiLoRALinear.from_linear refuses a Linear4bit."""
    import bitsandbytes as bnb

    base = _qlora_base(torch.float32, tmp_path)
    model = base()
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, bnb.nn.Linear4bit)
    with pytest.raises(TypeError, match="MultiLoRALinear4bit"):
        lk.MultiLoRALinear.from_linear(down)
    codes = down.weight.data_ptr()
    lk.inject_multi_lora(model, "all-linear", capacity=2, r_max=4)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, lk.MultiLoRALinear4bit) and layer.weight.data_ptr() == codes
    assert (layer.in_features, layer.out_features) == (256, 128)
    lk.add_adapter(model, "a", r=4)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lk.adapter_batch(model, ["a", None]):
        torch.testing.assert_close(model(ids).logits, base()(ids).logits, rtol=1e-5, atol=1e-5)
    unloaded = layer.unload()
    assert type(unloaded) is bnb.nn.Linear4bit and unloaded.weight.data_ptr() == codes


# ---- torchao's NF4Tensor (torchtune's QLoRA weight) ------------------------------------------------------------


def _torchao_nf4(weight):
    pytest.importorskip("torchao", reason="torchao is not installed (./run.sh setup installs it)")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4(weight, block_size=64, scaler_block_size=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torchao_nf4_tensor_is_read_exactly(dtype):
    """Weight4bit.from_torchao: the codes shared, each block's scale torchao's own (its int8 scalers decoded once),
    torchao's table; dequantize() equals torchao's get_original_weight bit for bit, and the op on it equals the
    reference. It has no bitsandbytes form (to_bnb refuses it: bnb's kernels would use their own table)."""
    t = _torchao_nf4(_weight((64, 256), dtype))
    w4 = Weight4bit.from_torchao(t)
    assert w4.codes.data_ptr() == t.quantized_data.data_ptr()
    assert torch.equal(w4.dequantize(dtype), t.get_original_weight())
    assert not w4.has_bnb_table() and w4.nbytes() / (64 * 256) == 0.5625
    g = torch.Generator().manual_seed(1)
    x, A, B = (torch.randn(5, 256, generator=g).to(dtype), torch.randn(4, 256, generator=g).to(dtype) * 0.1,
               torch.randn(64, 4, generator=g).to(dtype) * 0.1)
    y = lk.lora_linear(x, w4, None, A, B, SCALING)
    expected = reference.lora_linear(x.double(), t.get_original_weight().double(), None, A.double(), B.double(),
                                     SCALING)[0]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    if HAVE_BNB:
        with pytest.raises(ValueError, match="torchao"):
            w4.to_bnb()
    with pytest.raises(TypeError, match="NF4Tensor"):
        Weight4bit.from_torchao(torch.zeros(2, 2))


def test_a_layer_on_a_torchao_weight_keeps_its_table_through_state_dict_and_merge():
    """LoRALinear4bit over a torchao weight: its state dict carries torchao's table (quant_map) and a layer it is
    loaded into computes with it; merge(requantize=True) / unmerge() restore it exactly."""
    t = _torchao_nf4(_weight((64, 256)))
    torch.manual_seed(0)
    layer = lk.LoRALinear4bit(Weight4bit.from_torchao(t), None, r=4)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 256)
    expected = layer(x)
    other = lk.LoRALinear4bit.quantize(torch.nn.Linear(256, 64, bias=False), r=4, double_quant=False)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), expected)
    assert torch.equal(other.base_weight().dequantize(), t.get_original_weight())
    layer.merge(requantize=True)
    assert layer.base_weight().has_bnb_table()  # requantized with bitsandbytes' table
    layer.unmerge()
    assert torch.equal(layer(x), expected)


def test_a_refused_load_into_a_merged_4bit_layer_leaves_it_merged_as_it_was():
    torch.manual_seed(0)
    layer = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 33), r=4)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    layer.merge(requantize=True)
    codes = layer.base_weight().codes.clone()
    x = torch.randn(3, 128)
    expected = layer(x)
    wrong = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 33), r=4, blocksize=128)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        layer.load_state_dict(wrong.state_dict())
    assert layer.merged and torch.equal(layer.base_weight().codes, codes)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("moved", ["load_state_dict", "to"])
def test_requantized_merge_after_a_load_or_move_unmerges_bit_for_bit(moved, double_quant):
    """A layer whose weight was rebuilt from its parameters (load_state_dict, .to()) merges into its 4-bit weight
    and unmerges to the original codes and scales bit for bit. (The rebuilt weight once held the double-quantized
    absmax Parameter itself, so merge's replacement of that Parameter's data changed the weight kept for unmerge:
    the original codes came back with the merged scales.)"""
    torch.manual_seed(0)
    layer = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 96), r=4, double_quant=double_quant).eval()
    if moved == "load_state_dict":
        other = lk.LoRALinear4bit.quantize(torch.nn.Linear(128, 96), r=4, double_quant=double_quant)
        layer.load_state_dict(other.state_dict())
    else:
        layer = layer.to("cpu", torch.float32)
        layer._weight_changed()  # what .to() onto another device does
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 128)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    layer.merge(requantize=True)
    layer.unmerge()
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert torch.equal(layer(x), y)


@needs_bnb
def test_a_weight_bitsandbytes_repacked_after_compiling_is_refused_not_misread(tmp_path):
    """bitsandbytes' CPU inference path (eval, no gradients, AVX512-BF16) repacks a Params4bit in place: its data is
    replaced and its quant_state edited (same object, scales decoded, nested cleared). A compiled patched layer that
    had checked that quant_state once must not read the repacked bytes as 4-bit codes: it raises, as eager does."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from lora_kernels.peft import patch_peft_model

    ours, _ = _qlora_models(torch.float32, tmp_path)
    patch_peft_model(ours)
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    weight = layer.base_layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    for run in (compiled, layer):
        with pytest.raises((ValueError, RuntimeError), match="repacked"), torch.no_grad():
            run(x)
