"""The Markdown report of a run: summary line, time/ratio tables, memory, merge and drift tables."""

from __future__ import annotations

import statistics

from .harness import CaseResult


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
        outliers = [r for r in vs_peft if r.ratio("ours", "peft") > 1.5]
        if outliers:  # a count hides how far off a case is
            lines.append("**Slower than PEFT by more than 1.5×**: "
                         + "; ".join(f"{r.case} ({r.ratio('ours', 'peft'):.2f}×)" for r in outliers) + ".")
    with_target = [r for r in linear if r.params.get("target") is not None and r.ratio("ours") is not None]
    if with_target:
        met = sum(r.ratio("ours") <= r.params["target"] for r in with_target)
        lines.append(f"ours within its target ratio to the base layer in {met} of {len(with_target)} cases.")
    busy = busy_machine_note(results, info)
    if busy:
        lines.append(busy)
    return lines + [""] if lines else []


def paired_busy_table(paired: list[tuple[list[CaseResult], list[CaseResult]]], busy: int) -> list[str]:
    """--paired-rounds: per case, ours / PEFT with the busy processes paused and running (medians over the rounds,
    which alternated), its change, and whether it stayed within 10% of the quiet value (or improved)."""
    rows, held = [], 0
    for quiet, loaded in paired:
        q = [r.ratio("ours", "peft") for r in quiet if r.ratio("ours", "peft") is not None]
        b = [r.ratio("ours", "peft") for r in loaded if r.ratio("ours", "peft") is not None]
        if not q or not b:
            continue
        q_med, b_med = statistics.median(q), statistics.median(b)
        change = b_med / q_med - 1.0
        held += change <= 0.10
        rows.append(f"| {quiet[0].case} | {q_med:.3f} | {b_med:.3f} | {change:+.0%} | "
                    f"{'yes' if change <= 0.10 else 'no'} |")
    rounds = len(paired[0][0]) if paired else 0
    processes = f"{busy} busy process" + ("es" if busy != 1 else "")
    return [f"**Busy machine, paired**: ours / PEFT with {processes} paused and running, {rounds} "
            f"alternating rounds per case (medians): within 10% of the quiet value (or better) in {held} of "
            f"{len(rows)} cases.", "",
            "| case | ours/PEFT quiet | ours/PEFT busy | change | within 10% |", "|---|---|---|---|---|"] + rows


def busy_machine_note(results: list[CaseResult], info: dict) -> str | None:
    """A warning when the ratios may be off by more than usual: load above the core count during the
    run, or a wide spread between repetitions (interquartile range over 15% of the median) in many cases."""
    reasons = []
    if info.get("busy_processes"):
        reasons.append(f"{info['busy_processes']} busy processes ran beside it on purpose (--busy)")
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


# How the two LoRA-linear tables of a report begin (readme_results.py leaves them out of the README for long sweeps).
LINEAR_TIME_HEADING = "Median time per call"
LINEAR_MEMORY_HEADING = "Memory per call"


def dora_table(dora: list[CaseResult]) -> list[str]:
    """DoRA cases: ours (DoRA) against our LoRA layer and PEFT's DoRA layer, with the DoRA issue's targets."""
    if not dora:
        return []
    lines = ["DoRA: *ours* is LoRALinear(use_dora=True), *ours-lora* our plain LoRA layer on the same weights, *peft* "
             "PEFT's DoRA layer (cases on an nf4 base, QDoRA: LoRALinear4bit(use_dora=True), our QLoRA layer, PEFT's "
             "DoRA on a bitsandbytes Linear4bit holding the same bytes); ratios to the base layer (F.linear on the "
             "unquantized weight). *targets*: ours / ours-lora at most, and peft / ours at least (PEFT slower by that "
             "factor).", "",
             "| case | base | ours-lora | ours | peft | ours / ours-lora | peft / ours | targets | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in dora:
        got = {"ours/ours-lora": r.ratio("ours", "ours-lora"), "peft/ours": r.ratio("peft", "ours")}
        targets = r.params.get("dora_targets") or {}
        met = [("ok" if got[k] is not None and (got[k] <= v if k == "ours/ours-lora" else got[k] >= v) else "no")
               for k, v in targets.items()]
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        target_text = ", ".join(f"{k} {'≤' if k == 'ours/ours-lora' else '≥'} {v}" for k, v in targets.items())
        lines.append(f"| {r.case} | {_fmt_ratio(r, 'base', 'base')} | "
                     + " | ".join(_fmt_ratio(r, n, "base") for n in ("ours-lora", "ours", "peft"))
                     + f" | {fmt(got['ours/ours-lora'])} | {fmt(got['peft/ours'])} | {target_text or '—'} | "
                     + (" ".join(met) if met else "—") + " |")
    return lines + [""]


def markdown_report(results: list[CaseResult], info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores"
    isa = f", {info['cpu_isa']}" if info.get("cpu_isa") and info["device"] == "cpu" else ""
    lines = [f"Machine: {where}{isa}; torch {info['torch']}, triton {info['triton']}, peft {info['peft']}; "
             f"{info['date']}, commit {info['git_commit']}.", ""]
    lines += summary_lines(results, info)
    linear = [r for r in results if r.op == "linear"]
    dense = [r for r in linear if not r.params.get("quantized") and not r.params.get("dora")]
    if dense:
        names = [n for n in dict.fromkeys(n for r in dense for n in r.timings) if n != "base"]
        ours = info.get("ours_backend")
        lines += [f"{LINEAR_TIME_HEADING} (lower is better), and its ratio to the base layer (F.linear, same "
                  "weight: the floor) measured in the same run. *ours* is lora_kernels"
                  + (f" on its `{ours}` backend (what `auto` picks here)" if ours else "")
                  + "; *reference* is the textbook formula in PyTorch ops, *peft* a PEFT LoRA layer. *target*: the "
                  "ratio ours / base the design aims for (the base layer plus about 1.5× the LoRA branch's share "
                  "of the flops, plus 1 point, and 5 more with dropout); *met*: ours / base ≤ target.", "",
                  "| case | base | " + " | ".join(names) + " | target | met |",
                  "|---|---|" + "---|" * len(names) + "---|---|"]
        for r in dense:
            target = r.params.get("target")
            ratio = r.ratio("ours")
            met = "—" if target is None or ratio is None else ("yes" if ratio <= target else "no")
            cells = [_fmt_ratio(r, n, "base") for n in names]
            lines.append(f"| {r.case} | {_fmt_ratio(r, 'base', 'base')} | " + " | ".join(cells) +
                         f" | {target if target is not None else '—'} | {met} |")
        lines.append("")
    qlora = [r for r in linear if r.params.get("quantized") and not r.params.get("dora")]  # QDoRA: DoRA's table
    if qlora:
        names = [n for n in dict.fromkeys(n for r in qlora for n in r.timings) if n != "base"]
        compute = "float32" if info["device"] == "cpu" else "bf16"
        lines += ["QLoRA: the base weight in 4 bits (NF4, double quantized, blocksize 64, bitsandbytes' layout), "
                  f"{compute} compute; ratios to F.linear on the {compute} weight. *ours*: LoRALinear4bit "
                  "(*ours[fused]*, *ours[dequantize]*: the triton backend's two 4-bit paths forced); *peft*: "
                  "PEFT's LoRA layer on a bitsandbytes Linear4bit holding the same bytes; *ours-dense*: our "
                  f"LoRALinear on the {compute} weight; *dequant*: the whole weight dequantized (our kernel), then "
                  "F.linear and the LoRA branch (unsloth's and torchao's way). *target*: ours / base (CPU: decode; "
                  "GPU: M >= 2048)." + (
                      " On this CPU (AVX512-BF16) bitsandbytes computes PEFT's forward without gradients in "
                      "bfloat16 (its own kernel, x rounded to bfloat16: ~3e-3 relative error at 4096², measured "
                      "2026-12-04, against ours 2e-7): its forward rows time a less exact function."
                      if info.get("bnb_bf16_cpu") else ""), "",
                  "| case | base | " + " | ".join(names) + " | target | met |",
                  "|---|---|" + "---|" * len(names) + "---|---|"]
        for r in qlora:
            target, ratio = r.params.get("target"), r.ratio("ours")
            met = "—" if target is None or ratio is None else ("yes" if ratio <= target else "no")
            lines.append(f"| {r.case} | {_fmt_ratio(r, 'base', 'base')} | "
                         + " | ".join(_fmt_ratio(r, n, "base") for n in names)
                         + f" | {target if target is not None else '—'} | {met} |")
        lines.append("")
    lines += dora_table([r for r in linear if r.params.get("dora")])
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
        baseline = merges[0].extra.get("ratio_to", "gemm")
        names = [n for n in dict.fromkeys(n for r in merges for n in r.timings) if n != baseline]
        what = ("the memory-traffic floor (the weight read and written once, in place: what any in-place merge "
                "must move)" if baseline == "floor" else
                "one `B @ A` GEMM (which allocates the [out, in] product and writes nothing into the weight)")
        lines += [f"Merge: median time of one in-place merge, and its ratio to {what}. Peak memory: growth of the "
                  "peak RSS during one call, fresh process (CPU).", "",
                  f"| weight | {baseline} | " + " | ".join(names) + " | peak memory (MB) |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for r in merges:
            peak = r.extra.get("peak_rss_mb")
            peak_txt = ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) if peak else "—"
            lines.append(f"| {r.case} | {_fmt_ratio(r, baseline, baseline)} | " +
                         " | ".join(_fmt_ratio(r, n, baseline) for n in names) + f" | {peak_txt} |")
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
