"""Which GPU path serves lora_linear under LORA_KERNELS_BACKEND=auto: the fused Triton kernels or the cuda
backend's cuBLAS composition, chosen per shape and step; and which of the triton backend's two paths serves
lora_linear_4bit (QLoRA).

    path_for(step, device_type, dtype, adapter_dtype, has_dropout, M, out_features, in_features, r)
        -> "triton" | "cuda" | None (None: the registry's order decides, as for every other op)
    path_4bit(step, M, out_features, in_features, r) -> "fused" | "dequantize"
    decode_splits(M, out_features, in_features, r, weight4bit, sms) -> slices of K for a decode launch

A table measured on a GPU decides the layer shapes it holds, on the card it was measured on: gpu_paths.json
beside this file, copied from the gpu_paths.json that benchmarks/gpu_check.py writes (the faster path of
each timed case). None is committed yet: no GPU has been lent. Until then the roofline model
(cost_model.predict, its assumptions in its docstring) decides; it prefers cuBLAS from M = 17 up (Triton's
GEMM is assumed at 65 % of the peak against cuBLAS's 75 %) and the fused decode kernel below.

Only calls that both paths serve the same way take part: 16-bit tensors with adapters of their own dtype,
without dropout. With dropout the cuda backend reads the seed on the host (a synchronisation per call, and
no CUDA-graph capture), and float32 adapters on a 16-bit x take its row-block path: those stay on Triton.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from . import cost_model

TABLE = Path(__file__).with_name("gpu_paths.json")
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def path_for(step: str, device_type: str, dtype: torch.dtype, adapter_dtype: torch.dtype, has_dropout: bool,
             M: int, out_features: int, in_features: int, r: int) -> str | None:
    """The backend ("triton" or "cuda") for one forward or backward ("forward" / "backward") of this shape,
    or None when the choice is not per shape."""
    if device_type != "cuda" or dtype not in _SIXTEEN_BIT or adapter_dtype != dtype or has_dropout:
        return None
    bucket = 1 << max(0, math.ceil(math.log2(max(M, 1))))  # batches of similar size share one choice
    return choose(step, bucket, out_features, in_features, r, str(dtype)[6:], _device_name())


@functools.lru_cache(maxsize=None)
def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


@functools.lru_cache(maxsize=4096)
def choose(step: str, M: int, out_features: int, in_features: int, r: int, dtype: str, device_name: str) -> str:
    """The measured winner of the nearest batch size for this layer shape on this card, else the model's."""
    measured = [e for e in _table(device_name) if (e["step"], e["out"], e["in"], e["r"], e["dtype"]) ==
                (step, out_features, in_features, r, dtype)]
    if measured:
        nearest = min(measured, key=lambda e: abs(math.log2(e["M"]) - math.log2(M)))
        return nearest["winner"]
    return modelled(step, M, out_features, in_features, r)


def modelled(step: str, M: int, out_features: int, in_features: int, r: int) -> str:
    """The path the roofline model predicts faster for this step (bf16 element sizes)."""
    return min(("triton", "cuda"), key=lambda path: cost_model.step_us(step, path, M, out_features, in_features, r))


@functools.lru_cache(maxsize=None)
def _table(device_name: str) -> tuple:
    """The committed table's entries for this card (none if the file is absent or for another card)."""
    if not TABLE.exists():
        return ()
    table = json.loads(TABLE.read_text())
    return tuple(table["entries"]) if table.get("device") == device_name else ()


PATHS_4BIT = ("fused", "dequantize")


def path_4bit(step: str, M: int, out_features: int, in_features: int, r: int) -> str:
    """The triton backend's path for one "forward" or "backward" of lora_linear_4bit: "fused" (W0's tiles
    dequantized in the GEMMs' K loops) or "dequantize" (W0 dequantized whole into a temporary by the same tile
    code, then lora_linear's own path on it). LORA_KERNELS_4BIT_PATH=fused|dequantize forces one (the device check
    times both); otherwise the roofline model's faster (cost_model.predict_4bit: the fused GEMMs re-dequantize
    every W0 tile once per row block, which it predicts to lose from a few hundred rows up)."""
    forced = os.environ.get("LORA_KERNELS_4BIT_PATH")
    if forced:
        if forced not in PATHS_4BIT:
            raise ValueError(f"LORA_KERNELS_4BIT_PATH must be one of {', '.join(PATHS_4BIT)}, got {forced!r}")
        return forced
    bucket = 1 << max(0, math.ceil(math.log2(max(M, 1))))
    return _modelled_4bit(step, bucket, out_features, in_features, r)


@functools.lru_cache(maxsize=4096)
def _modelled_4bit(step: str, M: int, out_features: int, in_features: int, r: int) -> str:
    fused = cost_model.step_us_4bit(step, "fused", M, out_features, in_features, r)
    dequantized = min(cost_model.step_us_4bit(step, f"dequantize+{path}", M, out_features, in_features, r)
                      for path in ("triton", "cuda"))  # lora_linear's own choice follows on the dense weight
    return "fused" if fused <= dequantized else "dequantize"


def decode_splits(M: int, out_features: int, in_features: int, r: int, weight4bit: bool, sms: int) -> int:
    """Slices of K for the fused decode launch (M <= 16): triton_lora_linear.decode_split_count's proposal for a
    layer too narrow to fill the GPU, kept where the roofline model predicts it faster than one launch (the
    finish launch costs a launch gap: a bf16 4096 -> 1024 k/v projection is not split, its 4-bit version, bound by
    its dequantization on 64 SMs, is)."""
    from .ops.triton_lora_linear import decode_split_count

    proposed = decode_split_count(M, out_features, in_features, sms)
    return 1 if proposed == 1 else _modelled_splits(M, out_features, in_features, r, weight4bit, proposed)


@functools.lru_cache(maxsize=4096)
def _modelled_splits(M: int, out_features: int, in_features: int, r: int, weight4bit: bool, proposed: int) -> int:
    split = cost_model.decode_us(M, out_features, in_features, r, weight4bit, proposed)
    whole = cost_model.decode_us(M, out_features, in_features, r, weight4bit, 1)
    return proposed if split < whole else 1
