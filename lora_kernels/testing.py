"""How lora_kernels is judged: the acceptance rule against reference.py, ulp arithmetic, and the
input makers. Shared by the test suite and the GPU check (benchmarks/gpu_check.py), so that both
hold every backend to the same standard.
"""

from __future__ import annotations

import torch

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
MIN_EXPONENT = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126, torch.float64: -1022}


def error_and_budget(ours: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor) -> tuple[float, float]:
    """(max |ours − exact|, the most it may be): how a backend's output is judged against the reference.

    exact is the float64 reference result; plain is plain PyTorch's result in ours' dtype. The budget is
    twice plain PyTorch's error plus 8 ulp (of ours' dtype) of the result's scale (at least 1).
    """
    err = (ours.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    scale = max(exact.abs().max().item(), 1.0)
    return err, 2.0 * plain_err + 8 * torch.finfo(ours.dtype).eps * scale


def assert_matches_reference(ours: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, name: str) -> None:
    """ours vs the float64 result `exact` under error_and_budget's rule. NaN never passes."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert ours.dtype == plain.dtype, f"{name}: dtype {ours.dtype} != {plain.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if ours.numel() == 0:
        return
    err, budget = error_and_budget(ours, exact, plain)
    plain_err = (plain.double() - exact).abs().max().item()
    assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} (plain PyTorch: {plain_err:.3g})"


def assert_all_match_reference(names, ours, exact, plain) -> None:
    """assert_matches_reference for each output: names[i] of ours[i] against exact[i] (float64) and plain[i]."""
    for name, o, e, p in zip(names, ours, exact, plain, strict=True):
        assert_matches_reference(o, e, p, name)


LORA_OUTPUTS = ("y", "xa", "dx", "dA", "dB")  # what lora_linear's forward and backward return, in order


def _double(t):
    return t.double() if t is not None else None


def lora_linear_oracles(grad_y, x, weight, bias, lora_A, lora_B, scaling: float, p: float = 0.0, seed=None):
    """The two sides of the acceptance rule for one lora_linear call: reference.lora_linear and its backward on
    these inputs in float64 (exact) and in their own dtypes (plain), each (y, xa, dx, dA, dB) as LORA_OUTPUTS."""
    from . import reference

    d = _double
    ey, exa = reference.lora_linear(d(x), d(weight), d(bias), d(lora_A), d(lora_B), scaling, p, seed)
    exact = reference.lora_linear_backward(d(grad_y), d(x), d(weight), d(lora_A), d(lora_B), exa, scaling, p, seed)
    py, pxa = reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    plain = reference.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, pxa, scaling, p, seed)
    return (ey, exa, *exact), (py, pxa, *plain)


def lora_linear_multi_oracles(grad_y, x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts,
                              seed=None):
    """lora_linear_oracles for lora_linear_multi: (exact, plain), each (y, xa, dx, dA, dB)."""
    from . import reference

    d = _double
    ey, exa = reference.lora_linear_multi(d(x), d(weight), d(bias), d(lora_A), d(lora_B), scalings, adapter_ids,
                                          ranks, dropouts, seed)
    exact = reference.lora_linear_multi_backward(d(grad_y), d(x), d(weight), d(lora_A), d(lora_B), exa, scalings,
                                                 adapter_ids, ranks, dropouts, seed)
    py, pxa = reference.lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts,
                                          seed)
    plain = reference.lora_linear_multi_backward(grad_y, x, weight, lora_A, lora_B, pxa, scalings, adapter_ids, ranks,
                                                 dropouts, seed)
    return (ey, exa, *exact), (py, pxa, *plain)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` floats at |values| (float64), subnormal range included."""
    _, exponent = torch.frexp(values.double().abs())
    exponent = torch.clamp(exponent - 1, min=MIN_EXPONENT[dtype])
    return torch.pow(2.0, (exponent - MANTISSA_BITS[dtype]).double())


def two_ulp_bound(dtype: torch.dtype, *values: torch.Tensor) -> torch.Tensor:
    """2 ulp of the largest magnitude each element takes among `values` (the merge drift bound)."""
    largest = torch.stack([v.double().abs() for v in values]).amax(0)
    return 2 * ulp(largest, dtype)


def _normal(generator: torch.Generator, device, dtype):
    """rand(*shape, scale=s): N(0, s²) drawn in float64 on the CPU (the same values on every device)."""

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return rand


def make_lora_inputs(lead, in_features, out_features, r, dtype, device="cpu", bias=True, seed=0):
    """x [*lead, in], weight [out, in], bias [out], lora_A [r, in], lora_B [out, r] with O(1) outputs.

    lora_B is random (not the zero init) so that the LoRA branch is really exercised.
    """
    rand = _normal(torch.Generator().manual_seed(seed), device, dtype)
    return dict(
        x=rand(*lead, in_features),
        weight=rand(out_features, in_features, scale=in_features**-0.5),
        bias=rand(out_features) if bias else None,
        lora_A=rand(r, in_features, scale=in_features**-0.5),
        lora_B=rand(out_features, r, scale=r**-0.5),
    )


def make_adapter(out_features, in_features, r, dtype, device="cpu", seed=0, weight_scale=0.02):
    """(weight [out, in], lora_A [r, in], lora_B [out, r]) scaled like a trained layer's, for merges."""
    rand = _normal(torch.Generator().manual_seed(seed), device, dtype)
    return (rand(out_features, in_features, scale=weight_scale), rand(r, in_features, scale=in_features**-0.5),
            rand(out_features, r, scale=0.01))
