"""Which implementation runs an op: backend discovery and selection.

    reference  pure PyTorch (reference.py); always available
    cpu        lora_kernels._C, C++ kernels for CPU tensors
    cuda       lora_kernels._C built with nvcc: cuBLAS GEMMs + CUDA kernels for CUDA tensors
    triton     Triton kernels for CUDA tensors; also CPU tensors under TRITON_INTERPRET=1

LORA_KERNELS_BACKEND=auto|reference|cpu|triton|cuda picks one (read at every call);
``auto`` takes the fastest that fits the tensors' device. Forcing a backend that
is unavailable, or that cannot run tensors on that device, is an error.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "LORA_KERNELS_BACKEND"


@functools.lru_cache(maxsize=None)
def compiled_extension():
    """The lora_kernels._C module, or None when it was not built."""
    try:
        from lora_kernels import _C
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backend_problem(name: str, device: torch.device | None) -> str | None:
    """Why `name` cannot run here (on `device`, when given), or None when it can."""
    C = compiled_extension()
    if name == "reference":
        return None
    if name == "cpu":
        if C is None:
            return "lora_kernels._C is not built (pip install the package from source)"
        if device is not None and device.type != "cpu":
            return f"it runs CPU tensors only, got tensors on {device}"
        return None
    if name == "cuda":
        if C is None or not C.with_cuda:
            return "lora_kernels._C was built without CUDA kernels (nvcc not found at build time)"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device is not None and device.type != "cuda":
            return f"it runs CUDA tensors only, got tensors on {device}"
        return None
    if name == "triton":
        if not _triton_importable():
            return "triton is not installed"
        on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
        if on_cpu and not triton_interpreted():
            return "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"it runs CUDA (or interpreted CPU) tensors only, got tensors on {device}"
        return None
    raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {name!r}")


def available_backends() -> list[str]:
    """Backends that can run on this machine, in BACKENDS order."""
    return [name for name in BACKENDS if _backend_problem(name, None) is None]


def requested_backend() -> str:
    """The backend asked for through LORA_KERNELS_BACKEND ('auto' when unset)."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


_selected: dict[tuple, str] = {}


def select_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs an op on tensors of `dtype` living on `device` (memoised: hot path)."""
    key = (os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), device.type, dtype == torch.float64)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = _select_backend(device, dtype)
    return backend


def _select_backend(device: torch.device, dtype: torch.dtype | None) -> str:
    name = requested_backend()
    if name == "auto":
        preference = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        if dtype == torch.float64:  # Triton's dots are float32 at most
            preference = tuple(n for n in preference if n != "triton")
        return next(n for n in preference if _backend_problem(n, device) is None)
    problem = _backend_problem(name, device)
    if problem is not None:
        raise RuntimeError(f"{ENV_VAR}={name} cannot be used: {problem}")
    return name
