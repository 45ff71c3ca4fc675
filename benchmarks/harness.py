"""Shared benchmark machinery: timing, machine description, result files.

Timing rules (see benchmarks/NOTES.md):
- CPU: every provider of a case is timed in one run, interleaved in a shuffled
  order each repetition so that machine noise hits all of them alike; each
  sample is one call timed with time.perf_counter (torch.utils.benchmark's
  Timer.timeit runs hidden warm-up calls, which would undo the untimed
  `prepare` step, e.g. the unmerge before a timed merge); we report the median
  and the interquartile spread.
- GPU: triton.testing.do_bench (median; it flushes L2 between calls).
- Inputs rotate through enough buffers to exceed the last-level cache.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed results, cited by the README
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"  # a user's own runs (untracked)
CACHE_BYTES = 64 << 20  # rotate inputs through at least this much memory


@dataclass
class Provider:
    """A timed callable; `prepare` runs untimed before every sample (zero grads, pick backend)."""

    name: str
    fn: Callable[[], object]
    prepare: Callable[[], None] = lambda: None
    params: list = field(default_factory=list)  # weights and adapters: not counted as saved activations


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    samples: int


@dataclass
class CaseResult:
    op: str
    case: str
    params: dict
    timings: dict[str, Timing] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def ratio(self, provider: str, to: str = "base") -> float | None:
        if provider not in self.timings or to not in self.timings:
            return None
        return self.timings[provider].median_ms / self.timings[to].median_ms


def rotation(make: Callable[[], torch.Tensor], max_buffers: int = 8) -> Callable[[], torch.Tensor]:
    """A function cycling through copies of make() whose total size exceeds CACHE_BYTES."""
    first = make()
    count = max(1, min(max_buffers, -(-CACHE_BYTES // max(1, first.numel() * first.element_size()))))
    buffers = [first] + [make() for _ in range(count - 1)]
    state = {"i": 0}

    def next_buffer() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(buffers)
        return buffers[state["i"]]

    return next_buffer


def timed_call(forward: Callable[[torch.Tensor], torch.Tensor], next_x: Callable[[], torch.Tensor],
               grad_y: torch.Tensor, train: bool) -> Callable[[], object]:
    """The call a provider times: forward on the next input, and with train its backward with grad_y
    (forward only runs under no_grad, and returns its output)."""
    if train:
        def call():
            forward(next_x()).backward(grad_y)
    else:
        def call():
            with torch.no_grad():
                return forward(next_x())
    return call


def memory_profile(provider: Provider, device: str) -> dict:
    """One call's memory: bytes saved for backward that are not parameters, and (CUDA) the
    peak allocation above what was allocated before the call."""
    param_ptrs = {t.data_ptr() for t in provider.params}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    provider.prepare()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        provider.fn()
    out = {"saved_for_backward_mb": sum(saved.values()) / 2**20}
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_providers(providers: list[Provider], device: str, reps: int, warmup: int = 2) -> dict[str, Timing]:
    """Median and quartiles (ms) of each provider, measured in one interleaved run."""
    if device == "cuda":
        import triton.testing

        out = {}
        for p in providers:
            def call(p=p):
                p.prepare()
                p.fn()

            # do_bench's rep is the milliseconds spent measuring: 100 ms is thousands of calls of a
            # decode layer and still a few of the largest training step. do_bench cannot leave the
            # untimed `prepare` out of a sample (for a merge it is the unmerge: as long as the merge),
            # so prepare is timed alone and its median taken off.
            q1, med, q3 = triton.testing.do_bench(call, quantiles=[0.25, 0.5, 0.75], warmup=25, rep=100)
            prep = triton.testing.do_bench(p.prepare, quantiles=[0.5], warmup=25, rep=50)
            prep = prep[0] if isinstance(prep, (list, tuple)) else prep
            out[p.name] = Timing(med - prep, q1 - prep, q3 - prep, samples=0)  # do_bench reports no call count
        return out

    for _ in range(warmup):
        for p in providers:
            p.prepare()
            p.fn()
    samples: dict[str, list[float]] = {p.name: [] for p in providers}
    order = list(providers)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for p in order:
            p.prepare()
            start = time.perf_counter()
            p.fn()
            samples[p.name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = Timing(statistics.median(values), q[0], q[2], len(values))
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_isa() -> str:
    """The widest x86 vector extension this CPU has (CPU results depend on it), or the machine type."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return None


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "git_commit": _git_commit(),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_isa": _cpu_isa(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "loralib": "installed" if have("loralib") else None,  # it has no __version__
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["bnb_bf16_cpu"] = _bnb_bf16_cpu()
    return info


def _bnb_bf16_cpu() -> bool:
    """Whether bitsandbytes computes a 4-bit layer's forward without gradients in bfloat16 on this CPU (it does
    where the CPU has AVX512-BF16, repacking the weight at the first such call), which makes PEFT's QLoRA
    forward faster and less exact than the float32 function ours computes."""
    if not have("bitsandbytes"):
        return False
    try:
        from bitsandbytes.functional import has_avx512bf16
        return bool(has_avx512bf16())
    except Exception:  # noqa: BLE001 - an older bitsandbytes without the CPU kernel: float32 throughout
        return False


def have(module: str) -> bool:
    """Whether `module` is installed (without importing it)."""
    return importlib.util.find_spec(module) is not None


def machine_slug(info: dict) -> str:
    if info["device"] == "cuda":
        kind = info["gpu"].replace("NVIDIA ", "").replace(" ", "-")
    else:  # CPU results depend on the vendor's microarchitecture and the vector ISA: both go in the name
        vendor = next((v for v in ("intel", "amd", "arm") if v in info["cpu"].lower()), "cpu")
        isa = (info.get("cpu_isa") or "").lower().replace("-", "")
        kind = "-".join(part for part in (f"cpu-{info['cpu_cores']}core", vendor, isa) if part)
    return f"{kind}-{info['date']}"


def write_results(results: list[CaseResult], info: dict, out_dir: Path, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "results": [asdict(r) for r in results]}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "results.md").write_text(markdown)
    plot_ratios(results, info, out_dir / "ratios.png")


def plot_ratios(results: list[CaseResult], info: dict, path: Path) -> None:
    """Grouped bars: time / base layer time for each timed case and provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    timed = [r for r in results if "base" in r.timings]
    if not timed:
        return
    providers = [p for p in dict.fromkeys(p for r in timed for p in r.timings) if p != "base"]
    width = 0.8 / max(1, len(providers))
    ratios = [r.ratio(p) for r in timed for p in providers if r.ratio(p)]
    # ratios cluster near 1: start the axis just below the smallest so differences show
    y_range = (max(0.0, min(ratios + [1.0]) - 0.05), max(1.3, min(max(ratios) * 1.03, 4.0)))
    per_row = 12  # a long sweep wraps onto several rows of cases, one shared y range
    rows = [timed[i:i + per_row] for i in range(0, len(timed), per_row)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(8, 0.9 * len(rows[0]) + 3), 4.6 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        for i, provider in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(row))]
            values = [r.ratio(provider) or float("nan") for r in row]
            ax.bar(xs, values, width=width, label=provider)
            for x, value in zip(xs, values):  # a bar the axis cuts off says how tall it is
                if value > y_range[1]:
                    ax.text(x, y_range[1] * 0.98, f"{value:.1f}×", ha="center", va="top", rotation=90, fontsize=7)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="base layer (floor)")
        ax.set_xticks(range(len(row)))
        ax.set_xticklabels([f"{r.op}\n{r.case}" for r in row], rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.6, per_row - 0.4 if len(rows) > 1 else len(row) - 0.4)
        ax.set_ylabel("time / base layer time (lower is better)")
        ax.set_ylim(*y_range)
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"
    axes[0, 0].set_title(f"lora_kernels vs base layer — {where}\ntorch {info['torch']}, triton {info['triton']}, "
                         f"peft {info['peft']}, {info['date']}, commit {info['git_commit']}", fontsize=10)
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
