"""merge_ / unmerge_ / switch_: accuracy, drift, exact restore, safe mode, memory, module integration."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lora_kernels import LoRALinear, merge_, reference, switch_, unmerge_

from lora_kernels.testing import MANTISSA_BITS, two_ulp_bound, ulp

from conftest import DEVICE, DTYPES, compiled_backends, make_adapter

BACKENDS = ["reference"] + compiled_backends()
# The interpreter is slow: fewer cycles there (still past cycle 10), the same bounds.
DRIFT_CYCLES = {"triton": 25}


SHAPES = [(1, 1, 1), (33, 70, 3), (70, 33, 16), (100, 129, 64)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_merge_matches_reference_within_one_rounding(shape, backend, dtype, use_backend):
    use_backend(backend)
    out_f, in_f, r = shape
    weight, lora_A, lora_B = make_adapter(out_f, in_f, r, dtype)
    merged = weight.clone()
    assert merge_(merged, lora_A, lora_B, 1.7) is None
    if dtype == torch.float64:
        torch.testing.assert_close(merged, reference.merge(weight, lora_A, lora_B, 1.7), rtol=1e-13, atol=1e-15)
        return
    exact = weight.double() + 1.7 * (lora_B.double() @ lora_A.double())
    # one rounding (half an ulp) plus the float32 accumulation of r products
    accumulation = r * 2.0**-23 * 1.7 * (lora_B.double().abs() @ lora_A.double().abs())
    assert ((merged.double() - exact).abs() <= 0.5 * ulp(exact, dtype) + accumulation).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_unmerge_cycles_do_not_drift(backend, dtype, use_backend):
    use_backend(backend)
    weight0, lora_A, lora_B = make_adapter(48, 80, 16, dtype, weight_scale=0.022)
    scaling = 2.0
    bound = two_ulp_bound(dtype, weight0, weight0.double() + scaling * (lora_B.double() @ lora_A.double()))
    weight = weight0.clone()
    cycles = DRIFT_CYCLES.get(backend, 1000)
    err_after = {}
    for cycle in range(1, cycles + 1):
        merge_(weight, lora_A, lora_B, scaling)
        unmerge_(weight, lora_A, lora_B, scaling)
        if cycle in (1, 10, cycles):
            err_after[cycle] = (weight.double() - weight0.double()).abs()
    assert (err_after[cycles] <= bound).all(), f"max drift {err_after[cycles].max():.3g}"
    assert torch.equal(err_after[10], err_after[cycles]), "drift grew between cycle 10 and the last"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_mode_restores_bits(backend, dtype, use_backend):
    use_backend(backend)
    weight0, lora_A, lora_B = make_adapter(70, 100, 8, dtype)
    weight = weight0.clone()
    record = merge_(weight, lora_A, lora_B, 2.0, exact=True)
    plain = weight0.clone()
    merge_(plain, lora_A, lora_B, 2.0)
    assert torch.equal(weight, plain), "exact merge must write the same merged weight"
    unmerge_(weight, lora_A, lora_B, 2.0, record=record)
    assert torch.equal(weight.view(torch.int8), weight0.view(torch.int8))
    assert 0.0 <= record.relative_size <= (4 + weight.element_size()) / weight.element_size()
    assert record.indices.numel() == record.values.numel()


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")  # the interpreter computes the Inf/NaN asked for, and numpy warns
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_half_precision_rounding_is_torchs_round_to_nearest_even(backend, dtype, contiguous, use_backend):
    """Deltas that are exact in float32 and land on ties, between and beyond: the one rounding is torch's."""
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    out_f, in_f = 37, 70
    ulp_at_one = 2.0 ** -MANTISSA_BITS[dtype]
    weight = (1 + torch.randint(0, 2 ** MANTISSA_BITS[dtype], (out_f, in_f), generator=g) * ulp_at_one).to(dtype)
    weight[0, :3] = torch.tensor([-1.5, 60000.0 if dtype == torch.float16 else 3.0e38, float("nan")])
    # r = 1, B = 1, s = 1: the delta is A itself, a multiple of a quarter ulp at 1 (ties included)
    lora_A = (torch.randint(-8, 9, (1, in_f), generator=g) * ulp_at_one / 4).to(dtype)
    lora_A[0, 1] = 1.0e4 if dtype == torch.float16 else 1.0e38  # overflows to inf, as torch's rounding does
    lora_B = torch.ones(out_f, 1, dtype=dtype)
    weight, lora_A, lora_B = weight.to(DEVICE), lora_A.to(DEVICE), lora_B.to(DEVICE)
    expected = (weight.double() + lora_B.double() @ lora_A.double()).float().to(dtype)
    target = weight.clone() if contiguous else weight.t().contiguous().t()
    merge_(target, lora_A, lora_B, 1.0)
    assert torch.equal(target.view(torch.int16)[~target.isnan()], expected.view(torch.int16)[~expected.isnan()])
    assert torch.equal(target.isnan(), expected.isnan())


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")  # the interpreter computes the Inf/NaN asked for, and numpy warns
@pytest.mark.parametrize("where", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_safe_merge_rejects_non_finite_and_leaves_weight_untouched(backend, bad, where, use_backend):
    use_backend(backend)
    weight, lora_A, lora_B = make_adapter(33, 70, 3, torch.bfloat16)
    {"lora_A": lora_A, "lora_B": lora_B}[where][1, 2] = bad
    before = weight.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        merge_(weight, lora_A, lora_B, 2.0, safe=True)
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))
    with pytest.raises(RuntimeError, match="non-finite"):
        merge_(weight, lora_A, lora_B, 2.0, safe=True, exact=True)
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))


def test_safe_merge_catches_overflow():
    weight = torch.full((4, 4), 6.0e4, dtype=torch.float16, device=DEVICE)
    lora_A = torch.ones(1, 4, dtype=torch.float16, device=DEVICE)
    lora_B = torch.full((4, 1), 100.0, dtype=torch.float16, device=DEVICE)
    before = weight.clone()
    with pytest.raises(RuntimeError, match="non-finite"):
        merge_(weight, lora_A, lora_B, 100.0, safe=True)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_is_one_pass_and_does_not_drift(backend, dtype, use_backend):
    use_backend(backend)
    weight0, A1, B1 = make_adapter(40, 56, 4, dtype, seed=1)
    _, A2, B2 = make_adapter(40, 56, 12, dtype, seed=2)
    s1, s2 = 2.0, 0.75
    weight = weight0.clone()
    merge_(weight, A1, B1, s1)
    switch_(weight, A1, B1, s1, A2, B2, s2)
    on_1 = weight0.double() + s1 * (B1.double() @ A1.double())
    exact = weight0.double() + s2 * (B2.double() @ A2.double())
    # plus, for float32 weights, the float32 accumulation of the products (r terms each)
    accumulation = 16 * 2.0**-23 * (s1 * B1.double().abs() @ A1.double().abs() + s2 * B2.double().abs() @ A2.double().abs())
    assert ((weight.double() - exact).abs() <= two_ulp_bound(dtype, weight0, on_1, exact) + accumulation).all()
    on_adapter_1 = []
    cycles = DRIFT_CYCLES.get(backend, 300)
    for cycle in range(cycles):
        switch_(weight, A2, B2, s2, A1, B1, s1)
        on_adapter_1.append(weight.clone())
        switch_(weight, A1, B1, s1, A2, B2, s2)
    assert torch.equal(on_adapter_1[5], on_adapter_1[-1]), "switching back and forth drifted"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_merge_peak_memory_is_bounded(backend):
    """Merging an 8192 x 8192 float32 weight raises the peak RSS by at most 64 MB."""
    script = textwrap.dedent(
        f"""
        import os, resource, torch
        os.environ["LORA_KERNELS_BACKEND"] = "{backend}"
        import lora_kernels
        torch.manual_seed(0)
        weight = torch.randn(8192, 8192)
        lora_A, lora_B = torch.randn(16, 8192), torch.randn(8192, 16)
        lora_kernels.merge_(weight, lora_A, lora_B, 0.5)  # warm-up: thread pools, first-touch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lora_kernels.merge_(weight, lora_A, lora_B, 0.5, safe=True)
        lora_kernels.unmerge_(weight, lora_A, lora_B, 0.5)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mb = int(result.stdout.strip().splitlines()[-1])
    assert growth_mb <= 64, f"peak RSS grew by {growth_mb} MB"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_merge_unmerge_and_merged_forward(dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    layer = LoRALinear(33, 70, r=4, lora_alpha=8, device=DEVICE, dtype=dtype)
    nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(6, 33, device=DEVICE, dtype=dtype)
    weight0 = layer.weight.detach().clone()
    merged_exact = weight0.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    unmerged = layer(x)
    layer.merge(safe=True)
    assert layer.merged and "merged=True" in repr(layer)
    torch.testing.assert_close(layer(x), unmerged, rtol=tol, atol=tol)
    layer.unmerge()
    assert not layer.merged
    assert ((layer.weight.double() - weight0.double()).abs() <= two_ulp_bound(dtype, weight0, merged_exact)).all()


def test_merge_weights_follows_train_eval_and_merge_and_unload():
    layer = LoRALinear(16, 8, r=2, merge_weights=True, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16, device=DEVICE)
    y_train = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), y_train)
    layer.train()
    assert not layer.merged
    linear = layer.merge_and_unload()
    assert type(linear) is nn.Linear and linear.weight is layer.weight
    torch.testing.assert_close(linear(x), y_train)


def test_module_switch_adapter_when_merged():
    layer = LoRALinear(16, 8, r=2, lora_alpha=4, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    layer.merge()
    new_A, new_B = torch.randn(5, 16, device=DEVICE), torch.randn(8, 5, device=DEVICE)
    with pytest.warns(UserWarning, match="rank changed"):
        layer.switch_adapter(new_A, new_B, lora_alpha=10)
    assert layer.r == 5 and layer.scaling == 2.0
    x = torch.randn(3, 16, device=DEVICE)
    layer.unmerge()
    expected = nn.functional.linear(x, layer.weight, layer.bias) + 2.0 * (x @ new_A.t()) @ new_B.t()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapters_that_alias_the_weight_are_read_before_it_is_written(backend, use_backend):
    """merge_(W, W[:2], B, s): the merge must use A's values from before the write, as the formula
    W + s·B·A does; likewise for lora_B, and for both adapters of a switch."""
    use_backend(backend)
    g = torch.Generator().manual_seed(5)
    weight0 = torch.randn(10, 12, generator=g).to(DEVICE)
    B = torch.randn(10, 2, generator=g).to(DEVICE)
    A = torch.randn(2, 12, generator=g).to(DEVICE)

    weight = weight0.clone()
    merge_(weight, weight[:2], B, 0.5)
    torch.testing.assert_close(weight, reference.merge(weight0, weight0[:2], B, 0.5))

    weight = weight0.clone()
    unmerge_(weight, A, weight[:, 3:5], 0.5)
    torch.testing.assert_close(weight, reference.merge(weight0, A, weight0[:, 3:5], -0.5))

    weight = weight0.clone()
    switch_(weight, weight[4:6], B, 0.5, A, weight[:, :2], 2.0)
    expected = reference.merge(reference.merge(weight0, A, weight0[:, :2], 2.0), weight0[4:6], B, -0.5)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_adapter_merges_into_half_weight_with_one_rounding(dtype):
    """float32 adapters on a 16-bit weight (PEFT's default): each merged element is W0 + s·BA from the
    float32 A and B, rounded once (auto runs this on the reference backend, in float64 blocks)."""
    weight, lora_A, lora_B = make_adapter(70, 33, 5, torch.float32, seed=4)
    weight = weight.to(dtype)
    original = weight.clone()
    expected = (original.double() + 1.5 * lora_B.double() @ lora_A.double()).to(dtype)
    merge_(weight, lora_A, lora_B, 1.5, safe=True)
    assert torch.equal(weight, expected)
    record = merge_(original.clone(), lora_A, lora_B, 1.5, exact=True)
    unmerge_(weight, lora_A, lora_B, 1.5)
    assert (weight.double() - original.double()).abs().le(two_ulp_bound(dtype, original, expected)).all()
    merge_(weight.copy_(original), lora_A, lora_B, 1.5)
    unmerge_(weight, lora_A, lora_B, 1.5, record=record)
    assert torch.equal(weight, original)
    new_A, new_B = lora_A[:3].clone(), lora_B[:, :3] * 2
    merge_(weight, lora_A, lora_B, 1.5)
    switch_(weight, lora_A, lora_B, 1.5, new_A, new_B, 0.5)
    switched = original.double() + 0.5 * new_B.double() @ new_A.double()
    assert (weight.double() - switched).abs().le(two_ulp_bound(dtype, original, expected, weight)).all()
