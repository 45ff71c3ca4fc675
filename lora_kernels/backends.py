"""Which implementation runs an op: backend discovery and the per-op backend registry.

    reference  pure PyTorch (reference.py); always available, any device
    cpu        lora_kernels._C's kernels registered under the CPU dispatch key
    cuda       lora_kernels._C's kernels registered under the CUDA dispatch key (built with nvcc)
    triton     Triton kernels for CUDA tensors; also CPU tensors under TRITON_INTERPRET=1

Each op registers its implementations once (ops/<op>.py):

    register(Implementation("lora_linear", "triton", devices=("cuda",), dtypes=HALF_AND_FLOAT32,
                            module="lora_kernels.ops.triton_lora_linear"))

and asks for one at run time with `implementation("lora_linear", device, dtype)`.
LORA_KERNELS_BACKEND=auto|reference|cpu|cuda|triton picks one (read at every call);
``auto`` takes the first of the device's preference order that has the op for
that device and dtype. Forcing a backend that is unavailable, or that has no
implementation of the op for the tensors' device or dtype, is a clear error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "LORA_KERNELS_BACKEND"
# auto's order per device type: the fastest first; the reference always serves
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
HALF_AND_FLOAT32 = frozenset((torch.float16, torch.bfloat16, torch.float32))
HALF = frozenset((torch.float16, torch.bfloat16))
# (tensors' dtype, adapters' dtype) pairs of a mixed-precision call: float32 adapters on a 16-bit base,
# PEFT's default for float16/bfloat16 models
FLOAT32_ADAPTERS_ON_HALF = frozenset(((torch.float16, torch.float32), (torch.bfloat16, torch.float32)))
ANY_DEVICE = None


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    module: the dotted path of the module (or object path "module:attribute") that
    holds it, imported on first use, so that an optional backend (triton) costs
    nothing until chosen. devices: device types it serves (None: any). The Triton
    interpreter adds "cpu" to a backend that serves "cuda".
    """

    op: str
    backend: str
    module: str
    devices: tuple[str, ...] | None = ANY_DEVICE
    dtypes: frozenset = FLOAT_DTYPES
    auto_dtypes: frozenset | None = None  # the dtypes `auto` picks it for (None: all of `dtypes`)
    mixed: frozenset = frozenset()  # (dtype, adapter dtype) pairs it serves besides one dtype for all

    def chosen_by_auto(self, device_type: str, dtype: torch.dtype | None, adapter_dtype=None) -> bool:
        return (self.serves(device_type, dtype, adapter_dtype)
                and (self.auto_dtypes is None or dtype in self.auto_dtypes))

    def serves(self, device_type: str, dtype: torch.dtype | None, adapter_dtype: torch.dtype | None = None) -> bool:
        devices = self.devices
        if devices is not None and self.backend == "triton" and triton_interpreted():
            devices = devices + ("cpu",)
        if adapter_dtype is not None and adapter_dtype != dtype and (dtype, adapter_dtype) not in self.mixed:
            return False
        return (devices is None or device_type in devices) and (dtype is None or dtype in self.dtypes)

    def load(self):
        module, _, attribute = self.module.partition(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, attribute) if attribute else loaded


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(impl: Implementation) -> None:
    """Add one backend's implementation of an op (each op's module calls this for its backends)."""
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; known: {', '.join(BACKENDS)}")
    _REGISTRY.setdefault(impl.op, {})[impl.backend] = impl
    _selected.clear()


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


@functools.lru_cache(maxsize=None)
def compiled_extension():
    """The lora_kernels._C module, or None when it was not built."""
    try:
        from lora_kernels import _C
    except ImportError:
        return None
    return _C


def rescan_compiled_extension() -> bool:
    """Look for lora_kernels._C again and forget every backend chosen so far; True when it is found.

    For a process that imported lora_kernels before the extension was built (benchmarks/gpu_check.py
    builds it in the background while the Triton checks run). Eager calls then use its kernels; the
    fake kernels torch.compile needs for them are registered at import time only.
    """
    compiled_extension.cache_clear()
    _selected.clear()
    return compiled_extension() is not None


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2])


@functools.lru_cache(maxsize=None)
def triton_release() -> tuple[int, ...]:
    """(major, minor) of the installed Triton, read from its metadata (nothing imported); (0, 0) without it."""
    import importlib.metadata

    try:
        return _release(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    Triton's interpreter before 3.7 turns its 1-element scalar arrays into loop bounds with int(), which
    numpy 2.4 refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars) in
    every kernel with a loop; Triton 3.7 fixed it. GPU compilation is not affected.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version} (numpy 2.4 refuses "
                "the int() of a 1-element array that it uses for loop bounds): use triton>=3.7 or numpy<2.4")
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_versions_problem() -> str | None:
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


@functools.lru_cache(maxsize=None)
def _interpreter_probe_problem() -> str | None:
    """Why Triton's interpreter cannot run a small kernel made like this package's, or None (run once): a new
    Triton whose interpreter refuses what the kernels do (3.9 refused a mask they used) is reported here,
    instead of every call failing."""
    import triton

    from .ops.triton_common import interpreter_probe

    problem = interpreter_probe()
    return None if problem is None else f"Triton {triton.__version__}'s interpreter fails a probe kernel: {problem}"


def _backend_problem(name: str) -> str | None:
    """Why backend `name` cannot run at all on this machine, or None when it can."""
    C = compiled_extension()
    if name == "reference":
        return None
    if name == "cpu":
        return None if C is not None else "lora_kernels._C is not built (pip install the package from source)"
    if name == "cuda":
        if C is None or not C.with_cuda:
            return "lora_kernels._C was built without CUDA kernels (nvcc not found at build time)"
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if name == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if not torch.cuda.is_available() and not triton_interpreted():
            return "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
        if not triton_interpreted():
            return None
        return _interpreter_versions_problem() or _interpreter_probe_problem()
    raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {name!r}")


def available_backends(op: str | None = None) -> list[str]:
    """Backends that can run on this machine (that implement `op`, when given), in BACKENDS order."""
    names = BACKENDS if op is None else [b for b in BACKENDS if b in _REGISTRY.get(op, {})]
    return [name for name in names if _backend_problem(name) is None]


def requested_backend() -> str:
    """The backend asked for through LORA_KERNELS_BACKEND ('auto' when unset)."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


_selected: dict[tuple, tuple[str, object]] = {}


def implementation(op: str, device: torch.device, dtype: torch.dtype | None = None,
                   adapter_dtype: torch.dtype | None = None) -> object:
    """The loaded implementation of `op` for tensors of `dtype` on `device` (memoised: the hot path);
    adapter_dtype: the LoRA weights' dtype when it may differ from the other tensors'."""
    return select(op, device, dtype, adapter_dtype)[1]


def select(op: str, device: torch.device, dtype: torch.dtype | None = None,
           adapter_dtype: torch.dtype | None = None) -> tuple[str, object]:
    """(backend name, loaded implementation) of `op` for `device`, `dtype` and `adapter_dtype`."""
    if adapter_dtype == dtype:
        adapter_dtype = None
    key = (op, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), device.type, dtype, adapter_dtype)
    chosen = _selected.get(key)
    if chosen is None:
        impl = _choose(op, device.type, dtype, adapter_dtype)
        chosen = _selected[key] = (impl.backend, impl.load())
    return chosen


def available_implementation(op: str, name: str) -> object | None:
    """The loaded implementation of `op` by backend `name` when that backend can run here, else None (for a
    choice made per call among the backends auto may pick, such as gpu_paths' per-shape one). Memoised with
    select's choices (and forgotten with them)."""
    key = ("named", op, name, os.environ.get("TRITON_INTERPRET"))
    if key not in _selected:
        impl = _REGISTRY.get(op, {}).get(name)
        _selected[key] = (name, None if impl is None or _backend_problem(name) is not None else impl.load())
    return _selected[key][1]


def _describe(dtype, adapter_dtype) -> str:
    return f"{dtype} tensors" if adapter_dtype is None else f"{dtype} tensors with {adapter_dtype} adapters"


def _choose(op: str, device_type: str, dtype: torch.dtype | None, adapter_dtype=None) -> Implementation:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation of op {op!r} is registered; registered ops: {registered_ops()}")
    name = requested_backend()
    if name == "auto":
        for candidate in _PREFERENCE.get(device_type, ("reference",)):
            impl = impls.get(candidate)
            if (impl is not None and impl.chosen_by_auto(device_type, dtype, adapter_dtype)
                    and _backend_problem(candidate) is None):
                return impl
        raise RuntimeError(f"no backend implements {op} for {_describe(dtype, adapter_dtype)} on {device_type}")
    problem = _backend_problem(name)
    if problem is not None:
        raise RuntimeError(f"{ENV_VAR}={name} cannot be used: {problem}")
    impl = impls.get(name)
    if impl is None:
        raise RuntimeError(f"{ENV_VAR}={name} cannot be used: the {name} backend has no implementation of {op} "
                           f"(it is implemented by: {', '.join(impls)})")
    if not impl.serves(device_type, dtype, adapter_dtype):
        devices = "any device" if impl.devices is None else ", ".join(impl.devices)
        mixed = "".join(f", {str(a)[6:]} adapters on {str(d)[6:]}" for d, a in sorted(impl.mixed, key=str))
        raise RuntimeError(f"{ENV_VAR}={name} cannot be used: its {op} runs {devices} tensors of "
                           f"{', '.join(sorted(str(d)[6:] for d in impl.dtypes))} (one dtype for all{mixed}); "
                           f"got {_describe(dtype, adapter_dtype)} on {device_type}")
    return impl
