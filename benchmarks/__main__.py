"""The benchmark's command line (cases.py: what is timed; runners.py: how; tables.py: the report).

    python -m benchmarks                 # --quick: the CPU comparison table (about 4 min on 2 cores, QLoRA cases included)
    python -m benchmarks --full          # more shapes, ranks, dtypes, loralib; drift
    python -m benchmarks --op merge --provider ours,peft --shape 4096
    python -m benchmarks --op linear --busy 2 --paired-rounds 3   # ours / PEFT quiet and beside 2 busy processes

Every LoRA-linear case times the providers of providers.py in one run and
reports each as a ratio to the base layer (F.linear with the same weight).
Results go to benchmarks/results/local/<machine>-<date>/ (JSON, Markdown, PNG; untracked);
--save-results writes the tracked benchmarks/results/<machine>-<date>/ that the README cites.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

from .cases import linear_cases, merge_cases
from .harness import LOCAL_RESULTS_DIR, RESULTS_DIR, ROOT, machine_info, machine_slug, write_results
from .runners import add_peak_rss, run_drift, run_linear, run_merge
from .tables import markdown_report, paired_busy_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: the main comparison, about 4 min on CPU")
    size.add_argument("--full", action="store_true", help="all shapes, ranks and dtypes, loralib, drift")
    parser.add_argument("--op", default=None, help="comma list of linear,merge,drift (default: linear,merge; "
                                                   "--full adds drift)")
    parser.add_argument("--shape", default=None, help="only cases whose label contains this text")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--provider", default=None,
                        help="comma list from base,reference,peft,loralib,ours,floor,gemm,ours-safe,ours-dense,"
                             "dequant (default: all; loralib only with --full; the last two in QLoRA cases)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {LOCAL_RESULTS_DIR.relative_to(ROOT)}/<machine>-<date>, untracked)")
    parser.add_argument("--save-results", action="store_true",
                        help="write into the tracked benchmarks/results/<machine>-<date>/ that the README cites "
                             "(then commit it and run python -m benchmarks.readme_results)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--paired-rounds", type=int, default=0, metavar="K",
                        help="with --busy: time each LoRA-linear case K times with the busy processes paused "
                             "(SIGSTOP) and K times running, alternating, and report ours / PEFT of both "
                             "(medians over the rounds): the busy-machine comparison within one run")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="run N busy processes beside the benchmark (a machine shared with DataLoader workers "
                             "or other jobs); the report records N")
    args = parser.parse_args(argv)

    ops = args.op.split(",") if args.op else (["linear", "merge", "drift"] if args.full else ["linear", "merge"])
    if args.provider:
        wanted = args.provider.split(",")
    else:  # loralib only in --full: the quick run must stay a few minutes on 2 cores
        wanted = (["base", "reference", "peft", "ours", "floor", "gemm", "ours-safe", "ours-dense", "dequant"]
                  + (["loralib"] if args.full else []))
    if "linear" in ops and "base" not in wanted:
        wanted.append("base")  # ratios need the floor
    if "merge" in ops and "floor" not in wanted:
        wanted.append("floor")
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

    if args.paired_rounds and not args.busy:
        parser.error("--paired-rounds needs --busy N (the processes it pauses and resumes)")
    results, paired = [], []
    load_average = [_load_average()]
    with busy_processes(args.busy) as workers:
        for op, job in tqdm(jobs, desc="benchmark", unit="case", file=sys.stderr):
            if op == "linear" and args.paired_rounds:
                quiet, busy = [], []
                for _ in range(args.paired_rounds):
                    with paused(workers):
                        quiet.append(run_linear(job, device, wanted, budget))
                    busy.append(run_linear(job, device, wanted, budget))
                paired.append((quiet, busy))
                results.append(busy[-1])
            elif op == "linear":
                results.append(run_linear(job, device, wanted, budget))
            elif op == "merge":
                results.append(run_merge(job, device, wanted, budget))
            else:
                results.append(run_drift(device))
        load_average.append(_load_average())
    if device == "cpu":  # on GPU, memory_profile already recorded CUDA's peak
        add_peak_rss([(op, job) for op, job in jobs if op != "drift"], results, wanted)

    info = machine_info(device)
    info["load_average"] = [x for x in load_average if x is not None]
    info["busy_processes"] = args.busy
    info["ours_backend"] = _ours_backend(device)
    report = markdown_report(results, info)
    if paired:
        report = "\n".join(paired_busy_table(paired, args.busy)) + "\n\n" + report
    print(report)
    if not args.no_save:
        out_dir = args.out or (RESULTS_DIR if args.save_results else LOCAL_RESULTS_DIR) / machine_slug(info)
        write_results(results, info, out_dir, report)
        print(f"\nwrote {out_dir}/results.json, results.md, ratios.png")


@contextlib.contextmanager
def busy_processes(n: int):
    """n processes spinning on pure-Python work beside the block (what DataLoader workers decoding samples do
    to the cores), stopped when it ends; none for n = 0."""
    import subprocess

    workers = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(0, n))]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


@contextlib.contextmanager
def paused(workers):
    """The busy processes stopped (SIGSTOP) for the block and resumed after it: a quiet machine between two busy
    stretches of the same run."""
    import signal

    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGCONT)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ours_backend(device: str) -> str | None:
    from lora_kernels.backends import select

    try:
        return select("lora_linear", torch.device(device), torch.float32)[0]
    except (RuntimeError, ValueError):
        return None


if __name__ == "__main__":
    main()
