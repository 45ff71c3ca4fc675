"""Shared test helpers: the backends to check, inputs, and tolerances against reference.py."""

from __future__ import annotations

import collections
import os
import shutil

import torch

# Without a GPU, Triton kernels are checked on CPU tensors through Triton's
# interpreter; the variable must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import testing  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Backends a run must test (comma-separated, e.g. CI's "cpu,triton"): a missing one fails
# the session instead of skipping its tests quietly.
REQUIRED_ENV = "LORA_KERNELS_REQUIRE_BACKENDS"


def _compiler_available() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def pytest_sessionstart(session):
    """Refuse to look green while a backend this machine can build is missing.

    `python -m pytest` from a clone that was never built imports the source tree
    without lora_kernels._C: every cpu-backend test would be skipped.
    """
    required = {b.strip() for b in os.environ.get(REQUIRED_ENV, "").split(",") if b.strip()}
    if lora_kernels.compiled_extension() is None and _compiler_available() and "cpu" not in required:
        if os.environ.get("LORA_KERNELS_ALLOW_MISSING_BACKENDS") != "1":
            required.add("cpu")
    missing = sorted(required - set(lora_kernels.available_backends()))
    if missing:
        where = lora_kernels.__file__
        pytest.exit(
            f"backend(s) {', '.join(missing)} required but not available (lora_kernels imported from {where}). "
            "Build the extension first: ./run.sh test (or pip install --no-build-isolation -e .); "
            "LORA_KERNELS_ALLOW_MISSING_BACKENDS=1 runs the rest anyway.",
            returncode=3,
        )


_backend_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def pytest_runtest_logreport(report):
    """Count, per backend, the tests that ran (a test's backend is its `backend` parameter)."""
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    backend = _BACKEND_OF.get(report.nodeid)
    if backend is not None:
        _backend_outcomes[backend][report.outcome] += 1


_BACKEND_OF: dict[str, str] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "backend" in callspec.params:
            _BACKEND_OF[item.nodeid] = callspec.params["backend"]


def pytest_sessionfinish(session, exitstatus):
    """With LORA_KERNELS_REQUIRE_BACKENDS set (CI), each named backend must have had tests that passed:
    available is not enough if its tests were all skipped or deselected."""
    required = [b.strip() for b in os.environ.get(REQUIRED_ENV, "").split(",") if b.strip()]
    unexercised = [b for b in required if b not in _backend_outcomes or _backend_outcomes[b]["passed"] == 0]
    if unexercised and exitstatus == 0:
        session.exitstatus = 3
        print(f"\n{REQUIRED_ENV}: no test of backend(s) {', '.join(unexercised)} passed", flush=True)


def pytest_terminal_summary(terminalreporter):
    """One line per backend: how many of its tests passed, failed, were skipped."""
    terminalreporter.section("backends tested")
    for backend in sorted(_backend_outcomes):
        counts = _backend_outcomes[backend]
        terminalreporter.write_line(
            f"{backend}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    available = lora_kernels.available_backends()
    untested = sorted(set(lora_kernels.backends.BACKENDS) - set(_backend_outcomes))
    unavailable = [b for b in untested if b not in available]
    unselected = [b for b in untested if b in available]
    if unavailable:
        terminalreporter.write_line(f"not available here: {', '.join(unavailable)}")
    if unselected:  # a narrow run (-k, a file): these work here, but none of their tests was selected
        terminalreporter.write_line(f"available, but no test of theirs was selected: {', '.join(unselected)}")


def compiled_backends() -> list[str]:
    """The non-reference backends available here (each is checked against the reference)."""
    return [b for b in lora_kernels.available_backends() if b != "reference"]


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend(name) forces LORA_KERNELS_BACKEND for the rest of the test."""

    def _use(name: str) -> None:
        monkeypatch.setenv("LORA_KERNELS_BACKEND", name)

    return _use


def make_lora_inputs(*args, device=DEVICE, **kwargs):
    """lora_kernels.testing.make_lora_inputs on the device under test."""
    return testing.make_lora_inputs(*args, device=device, **kwargs)


def make_adapter(*args, device=DEVICE, **kwargs):
    """lora_kernels.testing.make_adapter on the device under test."""
    return testing.make_adapter(*args, device=device, **kwargs)


assert_matches_reference = testing.assert_matches_reference
