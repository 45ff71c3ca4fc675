"""Running one case: build the providers, time them in one interleaved run, measure memory."""

from __future__ import annotations

import math
import sys

import torch

from . import providers as prov
from .cases import LinearCase
from .harness import CaseResult, memory_profile, time_providers
from .peak_rss import peak_rss_growth_mb


def _reps(base_ms: float, n_providers: int, budget_s: float) -> int:
    per_round_s = max(1e-6, base_ms * 1e-3 * n_providers * 1.3)
    return int(min(60, max(5, budget_s / per_round_s)))


def run_linear(case: LinearCase, device: str, wanted: list[str], budget_s: float) -> CaseResult:
    providers = prov.lora_linear_providers(case.M, case.d_in, case.d_out, case.r, case.dtype, case.dropout,
                                           case.train, device, wanted, lora_alpha=case.lora_alpha,
                                           quantized=case.quantized, dora=case.dora)
    probe = time_providers([p for p in providers if p.name == "base"], device, reps=2, warmup=1)
    reps = _reps(probe["base"].median_ms, len(providers), budget_s) if probe else 5
    timings = time_providers(providers, device, reps=reps)
    params = dict(M=case.M, d_in=case.d_in, d_out=case.d_out, r=case.r, dtype=str(case.dtype), mode=case.mode,
                  dropout=case.dropout, lora_share=case.lora_share(), target=case.target(device),
                  quantized=case.quantized, dora=case.dora, dora_targets=case.dora_targets(device))
    result = CaseResult("linear", case.label, params, timings)
    result.extra["memory"] = {p.name: memory_profile(p, device) for p in providers}
    return result


def run_merge(shape, device: str, wanted: list[str], budget_s: float) -> CaseResult:
    d_out, d_in, r, dtype = shape
    providers = prov.merge_providers(d_out, d_in, r, dtype, device, wanted)
    baseline = "floor" if any(p.name == "floor" for p in providers) else "gemm"
    probe = time_providers([p for p in providers if p.name == baseline], device, reps=2, warmup=1)
    reps = _reps(probe[baseline].median_ms * 3, len(providers), budget_s) if probe else 5
    timings = time_providers(providers, device, reps=reps)
    params = dict(d_out=d_out, d_in=d_in, r=r, dtype=str(dtype))
    label = f"{d_out}x{d_in} r={r} {str(dtype)[6:]}"
    result = CaseResult("merge", label, params, timings)
    # reported against the memory-traffic floor (the weight read and written once): one B @ A GEMM, the
    # earlier baseline, is itself slow for bf16 where the CPU has no bf16 GEMM (1.2 s on AVX2)
    for name in ("floor", "gemm"):
        if name in timings:
            result.extra["ratio_to"] = name
            break
    return result


def run_drift(device: str, cycles=(1, 10, 100, 1000)) -> CaseResult:
    """max |W - W0| after merge/unmerge cycles, bf16 2048x2048, r=16, |W0| <= 0.022."""
    from lora_kernels import merge_, unmerge_

    torch.manual_seed(0)
    d, r, dtype = 2048, 16, torch.bfloat16
    weight0 = (torch.rand(d, d, device=device) * 0.044 - 0.022).to(dtype)
    lora_A = (torch.randn(r, d, device=device) / math.sqrt(d)).to(dtype)
    lora_B = (torch.randn(d, r, device=device) * 0.01).to(dtype)
    scaling = 2.0
    drift: dict[str, dict[int, float]] = {"ours": {}, "ours-exact": {}}
    for name in drift:
        weight = weight0.clone()
        for cycle in range(1, max(cycles) + 1):
            record = merge_(weight, lora_A, lora_B, scaling, exact=name == "ours-exact")
            unmerge_(weight, lora_A, lora_B, scaling, record=record)
            if cycle in cycles:
                drift[name][cycle] = (weight.float() - weight0.float()).abs().max().item()
    record = merge_(weight0.clone(), lora_A, lora_B, scaling, exact=True)
    base = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    layer = prov.peft_linear(base, r, 2 * r)
    if layer is not None:
        with torch.no_grad():
            base.weight.copy_(weight0)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
        drift["peft"] = {}
        for cycle in range(1, max(cycles) + 1):
            layer.merge()
            layer.unmerge()
            if cycle in cycles:
                drift["peft"][cycle] = (base.weight.float() - weight0.float()).abs().max().item()
    params = dict(d_out=d, d_in=d, r=r, dtype="bfloat16", weight_bound=0.022, cycles=list(cycles))
    return CaseResult("drift", f"{d}x{d} r={r} bfloat16", params, extra={
        "max_abs_drift": drift, "exact_record_relative_size": record.relative_size})


def add_peak_rss(jobs, results: list[CaseResult], wanted: list[str]) -> None:
    """CPU: each provider's peak RSS growth during one call, measured for all jobs in one fresh process."""
    if not sys.platform.startswith("linux"):
        print("peak RSS not measured: it is read from Linux's /proc", file=sys.stderr)
        return
    print(f"measuring peak RSS per provider (a second pass, in a fresh process: {len(jobs)} cases; the progress "
          "bar above counted the timings only)...", file=sys.stderr)
    try:
        by_job = peak_rss_growth_mb(jobs, wanted)
    except RuntimeError as error:  # e.g. /proc/self/clear_refs not writable here: report the timings anyway
        print(f"peak RSS not measured: {error}", file=sys.stderr)
        return
    for result, growth in zip((r for r in results if r.op != "drift"), by_job):
        if result.op == "linear":
            for name, mb in growth.items():
                result.extra["memory"][name]["peak_extra_mb"] = mb
        else:
            result.extra["peak_rss_mb"] = growth
