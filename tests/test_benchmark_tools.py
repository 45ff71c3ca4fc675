"""The benchmark's tools do what they claim: the peak-RSS probe (CPU, Linux), the GPU check's deadline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmarks.peak_rss import peak_rss_growth_mb

LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")


@LINUX_ONLY
def test_peak_rss_sees_the_gemm_temporary_and_not_the_in_place_merge():
    """One B @ A of a 2048 x 2048 float32 weight allocates and fills 16 MB; the in-place merge allocates nothing.

    The bounds leave room for RSS accounting granularity (per-thread batching, huge pages), not for a copy.
    """
    (growth,) = peak_rss_growth_mb([("merge", (2048, 2048, 16, torch.float32))], ["gemm", "ours"])
    assert 15 <= growth["gemm"] <= 22, growth
    assert growth["ours"] <= 4, growth


def test_gpu_check_stops_at_its_deadline_and_leaves_valid_partial_results(tmp_path):
    """A dry run with a 1-second deadline: the first section runs, the rest are skipped, and what was
    measured is on disk as valid JSON (progress.jsonl line by line, and the summary)."""
    import json
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--deadline", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert "skipped validation triton: past the deadline" in result.stdout, result.stdout + result.stderr
    rows = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    checks = [r for r in rows if r["kind"] == "check"]
    assert checks and all(r["ok"] for r in checks), checks[:3]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())["summary"]
    assert summary["checks"] == len(checks) and summary["last_section"] == "done"


def test_gpu_check_waits_for_the_background_build_and_reports_a_failed_one(tmp_path, monkeypatch):
    """gpu_check.sh builds lora_kernels._C in the background: the check waits for its status file, then
    picks the extension up; a failed build is a failed check that carries the build log's tail."""
    import threading
    import time

    from benchmarks.gpu_check import Progress, wait_for_build
    from lora_kernels.backends import compiled_extension

    status, log = tmp_path / "build.status", tmp_path / "build.log"
    monkeypatch.setenv("LORA_KERNELS_BUILD_STATUS", str(status))
    monkeypatch.setenv("LORA_KERNELS_BUILD_LOG", str(log))
    progress = Progress(tmp_path / "out", deadline_s=60)

    log.write_text("step 1\nerror: nvcc died\n")
    status.write_text("failed\n")
    wait_for_build(progress)
    (failed,) = progress.checks
    assert failed["op"] == "build" and not failed["ok"] and "error: nvcc died" in failed["detail"]

    status.unlink()
    part = tmp_path / "build.status.part"  # written whole, then renamed, as gpu_check.sh does (no empty file seen)
    threading.Timer(1.0, lambda: part.write_text("ok\n") and part.rename(status)).start()
    t0 = time.time()
    wait_for_build(progress)
    assert time.time() - t0 >= 0.9  # it waited for the file
    built = progress.checks[-1]
    assert built["ok"] == (compiled_extension() is not None), built


def _timed(**ms):
    from benchmarks.harness import Timing

    return {name: Timing(value, value, value, samples=5) for name, value in ms.items()}


def test_the_summary_names_cases_far_slower_than_peft_and_merges_read_against_the_memory_floor():
    from benchmarks.harness import CaseResult
    from benchmarks.tables import summary_lines, markdown_report

    info = dict(device="cpu", cpu="test cpu", cpu_cores=2, torch="x", triton="x", peft="x", date="today",
                git_commit="abc", load_average=[0.5], busy_processes=2)
    linear = [CaseResult("linear", "M=1 fwd", {}, _timed(base=1.0, ours=3.2, peft=2.0)),
              CaseResult("linear", "M=2048 fwd", {}, _timed(base=1.0, ours=1.1, peft=1.3))]
    merge = CaseResult("merge", "4096x4096 r=16 bfloat16", {}, _timed(floor=10.0, gemm=1200.0, ours=25.0),
                       extra={"ratio_to": "floor"})
    text = "\n".join(summary_lines(linear, info))
    assert "faster in 1 of 2" in text and "M=1 fwd (1.60×)" in text and "M=2048" not in text.split("1.5×")[1]
    assert "2 busy processes" in text
    report = markdown_report(linear + [merge], info)
    assert "| weight | floor |" in report and "2.50" in report  # ours 25 ms against a 10 ms floor


def test_busy_processes_run_beside_the_block_and_stop_after_it():
    import time

    from benchmarks.__main__ import busy_processes

    with busy_processes(2) as workers:
        time.sleep(0.5)
        assert len(workers) == 2 and all(w.poll() is None for w in workers)  # running
    assert all(w.poll() is not None for w in workers)  # and stopped


def test_paired_busy_rounds_pause_the_busy_processes_and_report_the_change_of_ours_over_peft():
    import time

    from benchmarks.__main__ import busy_processes, paused
    from benchmarks.harness import CaseResult
    from benchmarks.tables import paired_busy_table

    def cpu_seconds(worker):
        return sum(float(v) for v in open(f"/proc/{worker.pid}/stat").read().rsplit(")", 1)[1].split()[11:13]) / 100

    with busy_processes(1) as workers:
        time.sleep(0.3)
        with paused(workers):
            before = cpu_seconds(workers[0])
            time.sleep(0.5)
            assert cpu_seconds(workers[0]) - before < 0.05  # stopped
        time.sleep(0.5)
        assert cpu_seconds(workers[0]) - before > 0.2  # running again

    def case(ours, peft):
        return CaseResult("linear", "M=1 fwd", {}, _timed(base=1.0, ours=ours, peft=peft))

    # quiet 0.5, 0.6, 0.55 (median 0.55); busy 0.66, 0.70, 0.50 (median 0.66): +20%, not held
    lines = paired_busy_table([([case(1.0, 2.0), case(1.2, 2.0), case(1.1, 2.0)],
                                [case(1.32, 2.0), case(1.4, 2.0), case(1.0, 2.0)])], 2)
    assert "in 0 of 1 cases" in lines[0] and "| M=1 fwd | 0.550 | 0.660 | +20% | no |" in lines


def test_dora_cost_model_counts_what_dora_adds():
    """predict_dora = the LoRA path's kernels + DoRA's: never cheaper than LoRA, dropout's second product with W0
    adds about one GEMM forward and one backward (its flops appear in the prediction)."""
    from lora_kernels import cost_model

    for path in ("triton", "cuda"):
        lora = cost_model.predict(path, 2048, 4096, 4096, 16, train=True)
        plain = cost_model.predict_dora(path, 2048, 4096, 4096, 16, train=True)
        dropped = cost_model.predict_dora(path, 2048, 4096, 4096, 16, train=True, dropout=True)
        assert lora.us < plain.us < dropped.us
        gemm_flops = 2 * 2048 * 4096 * 4096
        assert dropped.gflops - plain.gflops >= 2 * gemm_flops / 1e9 * 0.99
        assert plain.launches > lora.launches
