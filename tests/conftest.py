"""Shared test helpers: the backends to check, inputs, and tolerances against reference.py."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels are checked on CPU tensors through Triton's
# interpreter; the variable must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lora_kernels  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compiled_backends() -> list[str]:
    """The non-reference backends available here (each is checked against the reference)."""
    return [b for b in lora_kernels.available_backends() if b != "reference"]


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend(name) forces LORA_KERNELS_BACKEND for the rest of the test."""

    def _use(name: str) -> None:
        monkeypatch.setenv("LORA_KERNELS_BACKEND", name)

    return _use


def make_lora_inputs(lead, in_features, out_features, r, dtype, device=DEVICE, bias=True, seed=0):
    """x [*lead, in], weight [out, in], bias [out], lora_A [r, in], lora_B [out, r] with O(1) outputs.

    lora_B is random (not the zero init) so that the LoRA branch is really exercised.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return dict(
        x=rand(*lead, in_features),
        weight=rand(out_features, in_features, scale=in_features**-0.5),
        bias=rand(out_features) if bias else None,
        lora_A=rand(r, in_features, scale=in_features**-0.5),
        lora_B=rand(out_features, r, scale=r**-0.5),
    )


def assert_matches_reference(ours: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, name: str) -> None:
    """ours vs the float64 result `exact`, with a budget of twice the error of plain PyTorch
    in the same dtype (`plain`), plus a few ulps of slack. NaN never passes."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert ours.dtype == plain.dtype, f"{name}: dtype {ours.dtype} != {plain.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if ours.numel() == 0:
        return
    err, budget = lora_kernels.reference.error_and_budget(ours, exact, plain)
    plain_err = (plain.double() - exact).abs().max().item()
    assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} (plain PyTorch: {plain_err:.3g})"
