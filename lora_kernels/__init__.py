"""lora_kernels: fused LoRA linear and merge kernels (CPU C++, CUDA, Triton) with a LoRALinear module.

    y = x W0ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ

Public API: LoRALinear, LoRAConfig, lora_linear, merge_/unmerge_/switch_, available_backends;
model level: inject_lora, mark_only_lora_as_trainable, lora_state_dict, load_lora_state_dict, lora_layers, merge_adapter,
unmerge_adapter, merge_and_unload, unload, disable_adapter, print_trainable_parameters;
many adapters per layer, one per row of a batch: MultiLoRALinear, lora_linear_multi, inject_multi_lora,
add_adapter, remove_adapter, set_adapter, adapter_batch;
DoRA (weight-decomposed LoRA): dora_linear, dora_weight_norm, dora_merge_/dora_unmerge_, LoRALinear(use_dora=True);
4-bit bases (QLoRA, bitsandbytes' NF4/FP4 layout): Weight4bit, LoRALinear4bit, MultiLoRALinear4bit,
inject_lora(..., quantize="nf4"), inject_multi_lora(..., quantize="nf4");
PEFT's adapter format and PeftModels: lora_kernels.peft.
The pure-PyTorch specification of every op is lora_kernels.reference.
"""

from . import reference
from .backends import available_backends, compiled_extension
from .config import LoRAConfig
from .functional import (MergeRecord, dora_linear, dora_weight_norm, lora_linear, lora_linear_multi, merge_, switch_,
                         unmerge_)
from .dora import DoRAMerge, dora_merge_, dora_unmerge_
from .modules import LoRALinear
from .modules4bit import LoRALinear4bit, MultiLoRALinear4bit
from .weight4bit import Weight4bit
from .multi import MultiLoRALinear, adapter_batch, add_adapter, inject_multi_lora, remove_adapter, set_adapter
from .model_setup import (adapter_layers, disable_adapter, inject_lora, load_lora_state_dict, lora_layers,
                          lora_state_dict, mark_only_lora_as_trainable, merge_adapter, merge_and_unload,
                          print_trainable_parameters, unload, unmerge_adapter)

__version__ = "0.1.0"

compiled_extension()  # registers torch.ops.lora_kernels.* kernels when _C was built

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "LoRALinear4bit",
    "MultiLoRALinear",
    "MultiLoRALinear4bit",
    "MergeRecord",
    "adapter_batch",
    "adapter_layers",
    "add_adapter",
    "available_backends",
    "disable_adapter",
    "dora_linear",
    "dora_merge_",
    "dora_unmerge_",
    "dora_weight_norm",
    "DoRAMerge",
    "inject_lora",
    "inject_multi_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_linear",
    "lora_linear_multi",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "unload",
    "unmerge_adapter",
    "reference",
    "remove_adapter",
    "set_adapter",
    "switch_",
    "unmerge_",
    "Weight4bit",
]
