"""Dropout masks (statistics, same mask forward/backward, reproducibility) and what is saved for backward."""

from __future__ import annotations

import pytest
import torch

from lora_kernels import lora_linear, reference

from conftest import DEVICE, compiled_backends, make_lora_inputs

BACKENDS = ["reference"] + compiled_backends()


def test_philox_known_answer():
    # Random123's known-answer vector for Philox-4x32-10, counter 0 and key 0.
    words = [int(w[0]) for w in reference.philox4x32(0, torch.tensor([0]))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_draws_are_uniform_16_bit():
    draws = reference.dropout_draws(7, torch.arange(1 << 16))
    assert draws.min() >= 0 and draws.max() < 1 << 16
    counts = torch.bincount(draws >> 12, minlength=16).double()  # 16 bins of 4096 values
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 45  # 15 degrees of freedom: p < 1e-4 to fail by chance


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(p):
    keep = reference.dropout_mask(seed=2024, rows=400, cols=500, p=p)
    n = keep.numel()
    expected = 1 - p
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - expected) < 5 * sigma
    # rows and columns are not correlated with the position: each row keeps ~ (1-p)
    assert (keep.float().mean(1) - expected).abs().max() < 6 * (p * (1 - p) / 500) ** 0.5


@pytest.mark.parametrize("rows", [3, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("width", [13, 64], ids=["rows-not-aligned-to-8", "aligned-8-element-groups"])
@pytest.mark.parametrize("backend", compiled_backends())
def test_kernel_mask_is_the_reference_mask(backend, width, rows, use_backend):
    """With lora_A = I (r = in), xa = drop(x). in = 13: rows straddle the 8-element Philox groups (one
    generator call per element on Triton); in = 64: aligned groups (one call per 8 elements)."""
    use_backend(backend)
    from lora_kernels.ops.lora_linear import forward

    x = torch.ones(rows, width, dtype=torch.float32, device=DEVICE)
    eye = torch.eye(width, device=DEVICE)
    _, xa = forward(x, torch.zeros(5, width, device=DEVICE), None, eye, torch.zeros(5, width, device=DEVICE), 1.0, 0.3,
                    torch.tensor(99))
    keep = reference.dropout_mask(99, rows, width, 0.3, device=DEVICE)
    torch.testing.assert_close(xa, keep.float() / 0.7)


@pytest.mark.parametrize("n", [33, 32], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_use_the_same_mask(backend, n, use_backend):
    """With B = I-like and A = I, xa = drop(x) and dx's LoRA part is drop(dy B): both show the mask, and it
    is the reference's (n = 32: whole 8-element Philox groups per row)."""
    use_backend(backend)
    x = torch.randn(7, n, dtype=torch.float32, device=DEVICE, requires_grad=True)
    weight = torch.zeros(n, n, device=DEVICE)
    lora_A = torch.eye(n, device=DEVICE)[:16].clone().requires_grad_(True)  # r = 16: picks x[:, :16]
    lora_B = torch.eye(n, device=DEVICE)[:, :16].clone().requires_grad_(True)
    torch.manual_seed(5)
    y = lora_linear(x, weight, None, lora_A, lora_B, 1.0, dropout_p=0.5, training=True)
    y.backward(torch.ones_like(y))
    kept_forward = (y[:, :16] != 0)
    kept_backward = (x.grad[:, :16] != 0)
    assert kept_forward.any() and (~kept_forward).any()
    assert torch.equal(kept_forward, kept_backward)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # what lora_linear drew (functional.draw_seed)
    assert torch.equal(kept_forward, reference.dropout_mask(seed, 7, n, 0.5, device=DEVICE)[:, :16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_under_manual_seed(backend, use_backend):
    use_backend(backend)
    t = make_lora_inputs((9,), 33, 70, 3, torch.float32)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 2.0, 0.5, training=True))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def _saved_activation_bytes(fn, params) -> tuple[int, int]:
    """(bytes of tensors saved for backward that are not parameters, count of such tensors)."""
    param_ptrs = {p.data_ptr() for p in params}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    activations = [t for t in saved if t.data_ptr() not in param_ptrs]
    out.sum().backward()
    return sum(t.numel() * t.element_size() for t in activations), len(activations)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_are_x_plus_O_of_M_r(backend, use_backend):
    use_backend(backend)
    M, d_in, d_out, r = 256, 64, 96, 4
    t = make_lora_inputs((M,), d_in, d_out, r, torch.float32)
    x = t["x"].requires_grad_(True)
    params = [t["weight"], t["bias"], t["lora_A"].requires_grad_(True), t["lora_B"].requires_grad_(True)]
    torch.manual_seed(0)
    nbytes, _ = _saved_activation_bytes(
        lambda: lora_linear(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], 2.0, 0.1, training=True), params
    )
    budget = x.numel() * 4 + 4 * M * r * 4 + 64  # x, a few [M, r] buffers, the seed
    assert nbytes <= budget, f"saved {nbytes} bytes for backward, budget {budget} (x alone is {x.numel() * 4})"
