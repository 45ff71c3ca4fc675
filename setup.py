"""Build lora_kernels and its compiled extension lora_kernels._C.

The C++ CPU sources are always built. The CUDA sources are added when nvcc is
found, unless LORA_KERNELS_SKIP_CUDA_BUILD=1. Environment knobs:

    LORA_KERNELS_SKIP_CUDA_BUILD=1     CPU-only extension
    LORA_KERNELS_CUDA_ARCHS="8.0;9.0"  CUDA architectures (default below; 9.0 = H100/H200)
    MAX_JOBS=N                         parallel compile jobs (ninja)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc's real location."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    # nvcc on PATH may be a wrapper script (not a symlink): then its parent is no toolkit.
    if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_runtime.h").exists():
        return str(Path(nvcc).resolve().parent.parent)
    return None


def _want_cuda() -> bool:
    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return False
    import torch

    cuda_home = _find_cuda_home()
    if torch.version.cuda is None or cuda_home is None:
        return False
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension on import
    return True


def _cuda_wheel_include_dirs() -> list[str]:
    """Headers shipped by torch's CUDA wheels (cuBLAS, cuSPARSE, ...), which a bare nvcc install may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    roots = [Path(p) for p in nvidia.__path__]
    return sorted(str(d) for root in roots for d in root.glob("*/include") if d.is_dir())


def _extensions():
    with_cuda = _want_cuda()  # before importing cpp_extension, which reads CUDA_HOME once
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    csrc = ROOT / "csrc"
    # csrc/*.cpp (device-generic ops, registration) and csrc/cpu/*.cpp; csrc/cuda/*.cu with nvcc
    sources = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp"))
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for (C++17, or C++20 from 2.10)
    link_flags = []
    if _openmp_build():
        # at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this extension:
        # without -fopenmp every parallel loop of the CPU kernels runs on one thread (torch's OpenMP runtime,
        # libgomp.so.1 shipped in torch/lib, is the one the extension then uses: the same soname)
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not with_cuda:
        return [CppExtension("lora_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]

    archs = os.environ.get("LORA_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's CUDAExtension
    sources += sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cu"))
    return [
        CUDAExtension(
            "lora_kernels._C",
            sources,
            include_dirs=_cuda_wheel_include_dirs(),
            define_macros=[("LORA_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    ]


def _openmp_build() -> bool:
    """Whether the extension is compiled with OpenMP: torch's own parallel backend is OpenMP, on Linux (GCC)."""
    import torch

    return sys.platform.startswith("linux") and torch._C.has_openmp


def _torch_requirement() -> str:
    """The torch the extension is compiled against, to its minor version (torch's C++ ABI changes between
    minors): a wheel must not let pip pair it with another."""
    try:
        import torch
    except ImportError:  # metadata only (no build): any supported torch
        return "torch>=2.4"
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA linear, merge/unmerge kernels (CPU, CUDA, Triton) with a LoRALinear module",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[_torch_requirement()],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "pytest-benchmark"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    zip_safe=False,
)
