"""The benchmark's measuring tools measure what they claim (CPU, Linux)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks.peak_rss import peak_rss_growth_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")


def test_peak_rss_sees_the_gemm_temporary_and_not_the_in_place_merge():
    """One B @ A of a 2048 x 2048 float32 weight allocates and fills 16 MB; the in-place merge allocates nothing.

    The bounds leave room for RSS accounting granularity (per-thread batching, huge pages), not for a copy.
    """
    (growth,) = peak_rss_growth_mb([("merge", (2048, 2048, 16, torch.float32))], ["gemm", "ours"])
    assert 15 <= growth["gemm"] <= 22, growth
    assert growth["ours"] <= 4, growth
