"""lora_kernels: fused LoRA linear and merge kernels (CPU C++, CUDA, Triton) with a LoRALinear module.

    y = x W0ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ

Public API: LoRALinear, LoRAConfig, lora_linear, merge_/unmerge_/switch_, inject_lora,
mark_only_lora_as_trainable, lora_state_dict, available_backends.
The pure-PyTorch specification of every op is lora_kernels.reference.
"""

from . import reference
from .backends import available_backends, compiled_extension
from .config import LoRAConfig
from .functional import MergeRecord, lora_linear, merge_, switch_, unmerge_
from .modules import LoRALinear
from .model_setup import inject_lora, lora_state_dict, mark_only_lora_as_trainable

__version__ = "0.1.0"

compiled_extension()  # registers torch.ops.lora_kernels.* kernels when _C was built

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "MergeRecord",
    "available_backends",
    "inject_lora",
    "lora_linear",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_",
    "reference",
    "switch_",
    "unmerge_",
]
