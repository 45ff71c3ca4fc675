"""The benchmark suite's cases, runner and report.

    python -m benchmarks                 # --quick: the CPU comparison table (< 2 min on 2 cores)
    python -m benchmarks --full          # more shapes, ranks, dtypes, loralib; drift
    python -m benchmarks --op merge --provider ours,peft --shape 4096

Every LoRA-linear case times the providers of providers.py in one run and
reports each as a ratio to the base layer (F.linear with the same weight).
Results go to benchmarks/results/local/<machine>-<date>/ (JSON, Markdown, PNG; untracked);
--save-results writes the tracked benchmarks/results/<machine>-<date>/ that the README cites.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import providers as prov
from .harness import (LOCAL_RESULTS_DIR, RESULTS_DIR, ROOT, CaseResult, have, machine_info, machine_slug,
                      memory_profile, time_providers, write_results)
from .peak_rss import peak_rss_growth_mb

@dataclass(frozen=True)
class LinearCase:
    M: int
    d_in: int
    d_out: int
    r: int
    dtype: torch.dtype
    train: bool
    dropout: float

    @property
    def mode(self) -> str:
        if not self.train:
            return "forward"
        return "train" if self.dropout == 0 else f"train p={self.dropout}"

    @property
    def label(self) -> str:
        return f"M={self.M} {self.d_in}->{self.d_out} r={self.r} {str(self.dtype)[6:]} {self.mode}"

    @property
    def lora_alpha(self) -> int:
        """2r throughout (issue 2's r = 16, lora_alpha = 32): the scaling is 2 at every rank."""
        return 2 * self.r

    def lora_share(self) -> float:
        """f = r(in+out)/(in·out): the LoRA share of the base layer's flops."""
        return self.r * (self.d_in + self.d_out) / (self.d_in * self.d_out)

    def target(self, device: str) -> float | None:
        """The issue's ratio target for ours / base (None where it sets none)."""
        f = self.lora_share()
        if device == "cpu" and self.dtype == torch.float32 and self.r == 16:
            # issue 2: 1.5x the LoRA flop share (1.5 f in training, so 2.25 f) + 1 point; dropout + 5 points
            share = 1.5 * f if not self.train else 1.5 * 1.5 * f
            return round(1 + share + 0.01 + (0.05 if self.dropout else 0.0), 3)
        if device == "cuda" and self.dtype == torch.bfloat16 and self.r == 16:
            if not self.train:
                return 1.05 if self.M >= 2048 else 1.10 if self.M <= 16 else None
            return 1.10 if self.M >= 2048 else None
        return None


def _modes(dropouts=(0.0, 0.1)):
    return [(False, 0.0)] + [(True, p) for p in dropouts]


def linear_cases(device: str, full: bool) -> list[LinearCase]:
    if device == "cpu":
        shapes = [(1, 4096, 4096), (16, 4096, 4096), (2048, 1024, 1024), (4096, 2048, 2048)]
        cases = [LinearCase(M, i, o, 16, torch.float32, t, p) for (M, i, o) in shapes for t, p in _modes()]
        if full:
            cases += [LinearCase(M, i, o, r, torch.float32, t, 0.0) for (M, i, o) in shapes[:3] for r in (8, 64, 128)
                      for t in (False, True)]
            cases += [LinearCase(M, i, o, 16, torch.bfloat16, t, 0.0) for (M, i, o) in shapes[:3] for t in (False, True)]
        return cases
    sizes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    ranks = (16, 64) if not full else (8, 16, 64, 128)
    dtypes = (torch.bfloat16,) if not full else (torch.bfloat16, torch.float16)
    return [LinearCase(M, i, o, r, dt, t, p) for dt in dtypes for r in ranks for (i, o) in sizes
            for M in (1, 16, 2048, 8192) for t, p in _modes((0.0,))]


def merge_cases(device: str, full: bool) -> list[tuple[int, int, int, torch.dtype]]:
    if device == "cpu":
        cases = [(4096, 4096, 16, torch.float32), (4096, 4096, 16, torch.bfloat16)]
        return cases + ([(4096, 4096, 64, torch.float32), (8192, 8192, 16, torch.float32)] if full else [])
    return [(4096, 4096, 16, torch.bfloat16), (14336, 4096, 16, torch.bfloat16), (14336, 4096, 64, torch.bfloat16)]


def _reps(base_ms: float, n_providers: int, budget_s: float) -> int:
    per_round_s = max(1e-6, base_ms * 1e-3 * n_providers * 1.3)
    return int(min(60, max(5, budget_s / per_round_s)))


def run_linear(case: LinearCase, device: str, wanted: list[str], budget_s: float) -> CaseResult:
    providers = prov.lora_linear_providers(case.M, case.d_in, case.d_out, case.r, case.dtype, case.dropout,
                                           case.train, device, wanted, lora_alpha=case.lora_alpha)
    probe = time_providers([p for p in providers if p.name == "base"], device, reps=2, warmup=1)
    reps = _reps(probe["base"].median_ms, len(providers), budget_s) if probe else 5
    timings = time_providers(providers, device, reps=reps)
    params = dict(M=case.M, d_in=case.d_in, d_out=case.d_out, r=case.r, dtype=str(case.dtype), mode=case.mode,
                  dropout=case.dropout, lora_share=case.lora_share(), target=case.target(device))
    result = CaseResult("linear", case.label, params, timings)
    result.extra["memory"] = {p.name: memory_profile(p, device) for p in providers}
    return result


def run_merge(shape, device: str, wanted: list[str], budget_s: float) -> CaseResult:
    d_out, d_in, r, dtype = shape
    providers = prov.merge_providers(d_out, d_in, r, dtype, device, wanted)
    probe = time_providers([p for p in providers if p.name == "gemm"], device, reps=2, warmup=1)
    reps = _reps(probe["gemm"].median_ms * 3, len(providers), budget_s) if probe else 5
    timings = time_providers(providers, device, reps=reps)
    params = dict(d_out=d_out, d_in=d_in, r=r, dtype=str(dtype))
    label = f"{d_out}x{d_in} r={r} {str(dtype)[6:]}"
    result = CaseResult("merge", label, params, timings)
    if "gemm" in timings:  # reported against one B @ A GEMM, the floor of any merge
        result.extra["ratio_to"] = "gemm"
    return result


def run_drift(device: str, cycles=(1, 10, 100, 1000)) -> CaseResult:
    """max |W - W0| after merge/unmerge cycles, bf16 2048x2048, r=16, |W0| <= 0.022 (issue 4's setting)."""
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
    if have("peft"):
        from peft.tuners.lora import Linear as PeftLinear
        from peft.tuners.lora import LoraConfig

        base = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
        base.weight.copy_(weight0)
        layer = PeftLinear(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, target_modules=["x"]), r=r,
                           lora_alpha=2 * r)
        with torch.no_grad():
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


def _add_peak_rss(jobs, results: list[CaseResult], wanted: list[str]) -> None:
    """CPU: each provider's peak RSS growth during one call, measured for all jobs in one fresh process."""
    if not sys.platform.startswith("linux"):
        print("peak RSS not measured: it is read from Linux's /proc", file=sys.stderr)
        return
    print("measuring peak RSS per provider (fresh process)...", file=sys.stderr)
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


# ---------------------------------------------------------------------------
# report


def format_time(ms: float) -> str:
    """A duration in plain units: 350 µs, 2.79 ms, 166 ms, 1.11 s."""
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{ms * 1000:.3g} µs" if ms >= 0.1 else f"{ms * 1000:.2g} µs"


def _fmt_ratio(result: CaseResult, provider: str, to: str) -> str:
    t = result.timings.get(provider)
    if t is None:
        return "—"
    ratio = result.ratio(provider, to)
    return f"{format_time(t.median_ms)} ({ratio:.3f}x)" if provider != to else format_time(t.median_ms)


def summary_lines(results: list[CaseResult], info: dict) -> list[str]:
    """What a reader wants first: how ours compares with PEFT and with its targets, and whether the
    machine was quiet enough to trust the ratios."""
    linear = [r for r in results if r.op == "linear"]
    lines = []
    vs_peft = [r for r in linear if r.ratio("ours", "peft") is not None]
    if vs_peft:
        faster = sum(r.ratio("ours", "peft") < 1.0 for r in vs_peft)
        with_mem = [r for r in vs_peft if {"ours", "peft"} <= set(r.extra.get("memory", {}))]

        def footprint(r, name):
            m = r.extra["memory"][name]
            return m.get("peak_extra_mb", 0.0) + m["saved_for_backward_mb"]

        less = sum(footprint(r, "ours") < footprint(r, "peft") - 0.05 for r in with_mem)
        same = sum(abs(footprint(r, "ours") - footprint(r, "peft")) <= 0.05 for r in with_mem)
        lines.append(f"**Summary**: ours vs PEFT: faster in {faster} of {len(vs_peft)} cases"
                     + (f", less memory in {less} (the same in {same})" if with_mem else "") + ".")
    with_target = [r for r in linear if r.params.get("target") is not None and r.ratio("ours") is not None]
    if with_target:
        met = sum(r.ratio("ours") <= r.params["target"] for r in with_target)
        lines.append(f"ours within its target ratio to the base layer in {met} of {len(with_target)} cases.")
    busy = busy_machine_note(results, info)
    if busy:
        lines.append(busy)
    return lines + [""] if lines else []


def busy_machine_note(results: list[CaseResult], info: dict) -> str | None:
    """A warning when the ratios may be off by more than usual: load above the core count during the
    run, or a wide spread between repetitions (interquartile range over 15% of the median) in many cases."""
    reasons = []
    load = max(info.get("load_average") or [0.0])
    cores = info.get("cpu_cores") or 1
    if info.get("device") == "cpu" and load > cores:
        reasons.append(f"load average up to {load:.1f} on {cores} cores")
    timings = [t for r in results for t in r.timings.values() if t.samples > 1 and t.median_ms > 0]
    wide = sum((t.q3_ms - t.q1_ms) / t.median_ms > 0.15 for t in timings)
    if timings and wide > len(timings) // 4:
        reasons.append(f"{wide} of {len(timings)} timings spread over 15% between repetitions")
    if not reasons:
        return None
    return f"**Note**: the machine was busy during this run ({'; '.join(reasons)}): ratios may be off by more than usual."


# How the two LoRA-linear tables of a report begin (report.py leaves them out of the README for long sweeps).
LINEAR_TIME_HEADING = "Median time per call"
LINEAR_MEMORY_HEADING = "Memory per call"


def markdown_report(results: list[CaseResult], info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores"
    isa = f", {info['cpu_isa']}" if info.get("cpu_isa") and info["device"] == "cpu" else ""
    lines = [f"Machine: {where}{isa}; torch {info['torch']}, triton {info['triton']}, peft {info['peft']}; "
             f"{info['date']}, commit {info['git_commit']}.", ""]
    lines += summary_lines(results, info)
    linear = [r for r in results if r.op == "linear"]
    if linear:
        names = [n for n in dict.fromkeys(n for r in linear for n in r.timings) if n != "base"]
        ours = info.get("ours_backend")
        lines += [f"{LINEAR_TIME_HEADING} (lower is better), and its ratio to the base layer (F.linear, same "
                  "weight: the floor) measured in the same run. *ours* is lora_kernels"
                  + (f" on its `{ours}` backend (what `auto` picks here)" if ours else "")
                  + "; *reference* is the textbook formula in PyTorch ops, *peft* a PEFT LoRA layer. *target*: the "
                  "ratio ours / base the design aims for (the base layer plus about 1.5× the LoRA branch's share "
                  "of the flops, plus 1 point, and 5 more with dropout); *met*: ours / base ≤ target.", "",
                  "| case | base | " + " | ".join(names) + " | target | met |",
                  "|---|---|" + "---|" * len(names) + "---|---|"]
        for r in linear:
            target = r.params.get("target")
            ratio = r.ratio("ours")
            met = "—" if target is None or ratio is None else ("yes" if ratio <= target else "no")
            cells = [_fmt_ratio(r, n, "base") for n in names]
            lines.append(f"| {r.case} | {_fmt_ratio(r, 'base', 'base')} | " + " | ".join(cells) +
                         f" | {target if target is not None else '—'} | {met} |")
        lines.append("")
    with_memory = [r for r in linear if r.extra.get("memory")]
    if with_memory:
        names = list(dict.fromkeys(n for r in with_memory for n in r.extra["memory"]))
        has_peak = any("peak_extra_mb" in m for r in with_memory for m in r.extra["memory"].values())
        peak_meaning = ("growth of the process's peak RSS during the call (fresh process, after a warm-up call)"
                        if info["device"] == "cpu" else "peak allocated during the call above what was allocated before")
        lines += [f"{LINEAR_MEMORY_HEADING}, MB: saved for backward beyond the parameters"
                  + (f" / {peak_meaning}" if has_peak else "") + ".", "",
                  "| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in with_memory:
            cells = []
            for n in names:
                m = r.extra["memory"].get(n)
                cells.append("—" if m is None else f"{m['saved_for_backward_mb']:.1f}"
                             + (f" / {m['peak_extra_mb']:.1f}" if "peak_extra_mb" in m else ""))
            lines.append(f"| {r.case} | " + " | ".join(cells) + " |")
        lines.append("")
    merges = [r for r in results if r.op == "merge"]
    if merges:
        names = [n for n in dict.fromkeys(n for r in merges for n in r.timings) if n != "gemm"]
        lines += ["Merge: median time of one in-place merge, and its ratio to one `B @ A` GEMM (which allocates the "
                  "[out, in] product and writes nothing into the weight). Peak memory: growth of the peak RSS during "
                  "one call, fresh process (CPU).", "",
                  "| weight | gemm | " + " | ".join(names) + " | peak memory (MB) |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for r in merges:
            peak = r.extra.get("peak_rss_mb")
            peak_txt = ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) if peak else "—"
            lines.append(f"| {r.case} | {_fmt_ratio(r, 'gemm', 'gemm')} | " +
                         " | ".join(_fmt_ratio(r, n, "gemm") for n in names) + f" | {peak_txt} |")
        lines.append("")
    for r in (r for r in results if r.op == "drift"):
        cycles = r.params["cycles"]
        lines += [f"Drift: max |W − W0| after n merge/unmerge cycles ({r.case}, |W0| ≤ {r.params['weight_bound']}).",
                  "", "| provider | " + " | ".join(f"n={c}" for c in cycles) + " |", "|---|" + "---|" * len(cycles)]
        for name, values in r.extra["max_abs_drift"].items():
            lines.append(f"| {name} | " + " | ".join(f"{values[c]:.2g}" for c in cycles) + " |")
        lines += ["", f"Exact mode's side record: {100 * r.extra['exact_record_relative_size']:.1f}% of the weight's "
                  "bytes.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: the main comparison, < 2 min on CPU")
    size.add_argument("--full", action="store_true", help="all shapes, ranks and dtypes, loralib, drift")
    parser.add_argument("--op", default=None, help="comma list of linear,merge,drift (default: linear,merge; "
                                                   "--full adds drift)")
    parser.add_argument("--shape", default=None, help="only cases whose label contains this text")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--provider", default=None,
                        help="comma list from base,reference,peft,loralib,ours,gemm,ours-safe (default: all; "
                             "loralib only with --full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {LOCAL_RESULTS_DIR.relative_to(ROOT)}/<machine>-<date>, untracked)")
    parser.add_argument("--save-results", action="store_true",
                        help="write into the tracked benchmarks/results/<machine>-<date>/ that the README cites "
                             "(then commit it and run python -m benchmarks.report)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    ops = args.op.split(",") if args.op else (["linear", "merge", "drift"] if args.full else ["linear", "merge"])
    if args.provider:
        wanted = args.provider.split(",")
    else:  # loralib only in --full: the quick run must stay under 2 minutes on 2 cores
        wanted = ["base", "reference", "peft", "ours", "gemm", "ours-safe"] + (["loralib"] if args.full else [])
    if "linear" in ops and "base" not in wanted:
        wanted.append("base")  # ratios need the floor
    if "merge" in ops and "gemm" not in wanted:
        wanted.append("gemm")
    budget = args.budget or (12.0 if args.full else 2.0)
    device = args.device
    torch.manual_seed(0)

    def keep(label: str, dtype: torch.dtype) -> bool:
        return (args.shape is None or args.shape in label) and (args.dtype is None or str(dtype) == f"torch.{args.dtype}")

    jobs = []
    if "linear" in ops:
        jobs += [("linear", c) for c in linear_cases(device, args.full) if keep(c.label, c.dtype)]
    if "merge" in ops:
        jobs += [("merge", s) for s in merge_cases(device, args.full) if keep(f"{s[0]}x{s[1]} r={s[2]}", s[3])]
    if "drift" in ops:
        jobs.append(("drift", None))

    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(items, **_):
            return items

    results = []
    load_average = [_load_average()]
    for op, job in tqdm(jobs, desc="benchmark", unit="case", file=sys.stderr):
        if op == "linear":
            results.append(run_linear(job, device, wanted, budget))
        elif op == "merge":
            results.append(run_merge(job, device, wanted, budget))
        else:
            results.append(run_drift(device))
    if device == "cpu":  # on GPU, memory_profile already recorded CUDA's peak
        _add_peak_rss([(op, job) for op, job in jobs if op != "drift"], results, wanted)

    info = machine_info(device)
    load_average.append(_load_average())
    info["load_average"] = [x for x in load_average if x is not None]
    info["ours_backend"] = _ours_backend(device)
    report = markdown_report(results, info)
    print(report)
    if not args.no_save:
        out_dir = args.out or (RESULTS_DIR if args.save_results else LOCAL_RESULTS_DIR) / machine_slug(info)
        write_results(results, info, out_dir, report)
        print(f"\nwrote {out_dir}/results.json, results.md, ratios.png")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ours_backend(device: str) -> str | None:
    from lora_kernels.backends import select_backend

    try:
        return select_backend(torch.device(device), torch.float32)
    except (RuntimeError, ValueError):
        return None
