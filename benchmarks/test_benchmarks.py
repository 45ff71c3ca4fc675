"""The suite's --quick cases through pytest-benchmark:

    pytest benchmarks/ --benchmark-only [--benchmark-group-by=param:case]

One benchmark per (case, provider); pytest-benchmark's own statistics and
comparisons (--benchmark-save / --benchmark-compare) apply. Ratios to the base
layer are what `python -m benchmarks` prints; here each provider is timed on
its own, so compare within a group.
"""

from __future__ import annotations

import pytest
import torch

from . import providers as prov
from .cases import linear_cases, merge_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LINEAR_PROVIDERS = ["base", "reference", "peft", "loralib"] + prov.ours_names(DEVICE)
MERGE_PROVIDERS = ["floor", "gemm", "ours", "ours-safe", "peft"]


@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("case", linear_cases(DEVICE, full=False), ids=lambda c: c.label)
def test_lora_linear(benchmark, case, provider):
    found = prov.lora_linear_providers(case.M, case.d_in, case.d_out, case.r, case.dtype, case.dropout, case.train,
                                       DEVICE, [provider], lora_alpha=case.lora_alpha)
    found = [p for p in found if p.name == provider]
    if not found:
        pytest.skip(f"{provider} is not installed")
    _run(benchmark, found[0])


@pytest.mark.parametrize("provider", MERGE_PROVIDERS)
@pytest.mark.parametrize("shape", merge_cases(DEVICE, full=False), ids=lambda s: f"{s[0]}x{s[1]}-r{s[2]}-{s[3]}")
def test_merge(benchmark, shape, provider):
    found = prov.merge_providers(*shape, DEVICE, [provider])
    if not found:
        pytest.skip(f"{provider} is not installed")
    _run(benchmark, found[0])


def _run(benchmark, provider) -> None:
    def call():
        provider.fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, setup=provider.prepare, rounds=5, iterations=1, warmup_rounds=1)
