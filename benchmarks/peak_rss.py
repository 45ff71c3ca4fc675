"""CPU peak memory of one call per provider: growth of the process's peak RSS (Linux).

    peak_rss_growth_mb(jobs, providers)  ->  [{provider: MB}, ...], one dict per job

A job is ("linear", LinearCase) or ("merge", (d_out, d_in, r, dtype)). All jobs
run in one fresh child process (`python -m benchmarks.peak_rss`, JSON in and
out) started with a fixed glibc mmap threshold: every block of 64 KiB or more is
then its own mapping and goes back to the OS when freed, so one provider's
freed tensors cannot hide (or inflate) the next one's allocations, and the
timing run's history in the parent process does not matter. Each provider gets
one untimed warm-up call (thread pools, MKL buffers, lazy imports); then the
peak RSS is reset to the current RSS (/proc/self/clear_refs) and the growth
during one more call is what is reported: the call's temporaries, outputs and
gradients, as the operating system saw them.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

from .harness import ROOT


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": peak RSS := current RSS (Linux >= 4.0)
        f.write("5")


def _providers(op: str, spec: dict, names: list[str]):
    from . import providers as prov

    dtype = getattr(torch, spec["dtype"])
    if op == "linear":
        return prov.lora_linear_providers(spec["M"], spec["d_in"], spec["d_out"], spec["r"], dtype, spec["dropout"],
                                          spec["train"], "cpu", names, lora_alpha=spec["lora_alpha"],
                                          quantized=spec.get("quantized"), dora=spec.get("dora", False))
    return prov.merge_providers(spec["d_out"], spec["d_in"], spec["r"], dtype, "cpu", names)


def _measure(jobs: list[dict]) -> list[dict[str, float]]:
    out = []
    for i, job in enumerate(jobs):
        print(f"memory pass: case {i + 1} of {len(jobs)}", file=sys.stderr, flush=True)  # the parent shows it
        growth = {}
        for provider in _providers(job["op"], job["spec"], job["providers"]):
            provider.prepare()
            provider.fn()  # warm-up
            provider.prepare()
            gc.collect()
            _reset_peak_rss()
            before = _peak_rss_kb()
            provider.fn()
            growth[provider.name] = (_peak_rss_kb() - before) / 1024
        out.append(growth)
        gc.collect()
    return out


def _spec(op: str, job) -> dict:
    if op == "linear":
        return dict(M=job.M, d_in=job.d_in, d_out=job.d_out, r=job.r, dtype=str(job.dtype)[6:], dropout=job.dropout,
                    train=job.train, lora_alpha=job.lora_alpha, quantized=job.quantized, dora=job.dora)
    d_out, d_in, r, dtype = job
    return dict(d_out=d_out, d_in=d_in, r=r, dtype=str(dtype)[6:])


def peak_rss_growth_mb(jobs: list[tuple[str, object]], providers: list[str]) -> list[dict[str, float]]:
    """Peak RSS growth (MB) of one call of each wanted provider, per job, measured in a fresh process."""
    payload = [dict(op=op, spec=_spec(op, job), providers=providers) for op, job in jobs]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 << 10))
    env.pop("LORA_KERNELS_BACKEND", None)
    # the child's progress and errors go straight to our stderr: a silent memory pass looked stuck (a first run
    # took 2.5x the progress bar's estimate, which counts the timings only)
    child = subprocess.run([sys.executable, "-m", "benchmarks.peak_rss"], input=json.dumps(payload), cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        raise RuntimeError("peak RSS measurement failed (its error is printed above)")
    return json.loads(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_measure(json.load(sys.stdin))))
