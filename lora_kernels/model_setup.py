"""Model-level helpers: put LoRA into a model, train only LoRA, save only LoRA."""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .config import LoRAConfig
from .modules import LoRALinear

__all__ = ["inject_lora", "mark_only_lora_as_trainable", "lora_state_dict"]

_BIAS_MODES = ("none", "all", "lora_only")


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches
    a name equal to an entry or ending in '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], config: LoRAConfig | None = None,
                **options) -> nn.Module:
    """Replace every nn.Linear whose name matches target_modules by a LoRALinear sharing its weights.

    config, or LoRAConfig's options as keywords (r, lora_alpha, lora_dropout, use_rslora, ...).
    Returns the model (changed in place). Raises ValueError if nothing matched.
    """
    config = LoRAConfig.of(config, options)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and _matches(name, target_modules)
    ]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model")
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, LoRALinear.from_linear(module, config))
    return model


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but lora_A / lora_B (and biases: all of them, or those of LoRA layers)."""
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALinear) and module.bias is not None:
                module.bias.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The LoRA part of model.state_dict() (loralib's keys and rule)."""
    _check_bias(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or k.endswith("bias")}
    keep = {k for k in state if "lora_" in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.bias is not None:
            keep.add(f"{name}.bias" if name else "bias")
    return {k: v for k, v in state.items() if k in keep}
