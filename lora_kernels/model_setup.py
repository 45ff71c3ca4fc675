"""Model-level helpers: put LoRA into a model, train only LoRA, save only LoRA, merge or remove it.

    inject_lora(model, targets, r=8, ...)       LoRALinear in place of every matching nn.Linear / Conv1D
    merge_adapter / unmerge_adapter(model)      every LoRA layer, in place
    merge_and_unload / unload(model)            back to the base layers (merged or not)
    with disable_adapter(model): ...            the base model alone
    print_trainable_parameters(model)
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import LoRAConfig
from .modules import LoRALinear, is_conv1d

__all__ = [
    "inject_lora",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "load_lora_state_dict",
    "lora_layers",
    "adapter_layers",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "print_trainable_parameters",
]

_BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"
# where inject_lora remembers modules_to_save on the model (lora_state_dict saves them)
_MODULES_TO_SAVE = "_lora_kernels_modules_to_save"


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches
    a name equal to an entry or ending in '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def matching_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Names of the model's modules that `names` selects (exact names or name suffixes, PEFT's list rule)."""
    names = list(names)
    return [name for name, _ in model.named_modules() if name and _matches(name, names)]


def is_linear(module: nn.Module) -> bool:
    """A layer LoRALinear can wrap: nn.Linear or transformers' Conv1D (not a LoRALinear already)."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, LoRALinear)


def target_names(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the layers target_modules selects. "all-linear": every nn.Linear / Conv1D but the
    output head (model.get_output_embeddings(), as PEFT does)."""
    if target_modules == ALL_LINEAR:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        return [name for name, m in model.named_modules() if is_linear(m) and m is not head]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return [name for name, m in model.named_modules() if is_linear(m) and _matches(name, target_modules)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], config: LoRAConfig | None = None, *,
                modules_to_save: Iterable[str] | None = None, freeze_base: bool = True,
                adapter_dtype: torch.dtype | None = None, quantize: str | None = None, **options) -> nn.Module:
    """Replace every nn.Linear (or transformers Conv1D) that target_modules names by a LoRALinear sharing its weights.

    target_modules: a list (exact names or name suffixes), a regex string, or "all-linear"
    (every linear layer but the output head). config, or LoRAConfig's options as keywords
    (r, lora_alpha, lora_dropout, use_rslora, ...); Conv1D layers get fan_in_fan_out itself.
    freeze_base: freeze everything but the LoRA parameters (and modules_to_save), as PEFT does.
    modules_to_save: modules (names or suffixes: a classification head, say) that are trained
    fully and saved with the adapter by lora_state_dict. adapter_dtype: lora_A / lora_B dtype
    (default: the base weight's; float32 on a 16-bit model is PEFT's default). quantize="nf4" (or "fp4"):
    the targets' weights are quantized to 4 bits (bitsandbytes' layout, double quantized, blocksize 64) and
    served by the 4-bit kernels (QLoRA without bitsandbytes); bitsandbytes Linear4bit targets are wrapped as
    they are. Returns the model (changed in place). Raises ValueError if nothing matched.
    """
    config = LoRAConfig.of(config, options)
    keep = []
    if modules_to_save:
        keep = matching_modules(model, modules_to_save)
        if not keep:
            raise ValueError(f"modules_to_save={list(modules_to_save)!r} matched no module of the model")
    # a module to save is trained whole, so it is not wrapped (nor is anything inside it)
    names = [n for n in target_names(model, target_modules) if not any(n == k or n.startswith(k + ".") for k in keep)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear or Conv1D in the model")
    inject_layers(model, {name: config for name in names}, adapter_dtype, quantize)
    if keep:
        setattr(model, _MODULES_TO_SAVE, tuple(sorted(set(modules_to_save_of(model)) | set(keep))))
    if freeze_base:
        mark_only_lora_as_trainable(model)
    return model


def inject_layers(model: nn.Module, configs: dict[str, LoRAConfig], adapter_dtype=None,
                  quantize: str | None = None) -> None:
    """LoRALinear(config) in place of each named linear layer (per-layer configs: PEFT's rank_pattern);
    quantize: a LoRALinear4bit on the layer's weight quantized to that 4-bit type."""
    from .modules4bit import LoRALinear4bit, is_bnb_linear4bit

    for name, config in configs.items():
        linear = model.get_submodule(name)
        if quantize is not None and isinstance(linear, nn.Linear) and not is_bnb_linear4bit(linear):
            layer = LoRALinear4bit.quantize(linear, config, quant_type=quantize, adapter_dtype=adapter_dtype)
        else:
            layer = LoRALinear.from_linear(linear, config, adapter_dtype=adapter_dtype)
        replace_module(model, name, layer)


def modules_to_save_of(model: nn.Module) -> tuple[str, ...]:
    """The names inject_lora(..., modules_to_save=...) recorded on the model."""
    return getattr(model, _MODULES_TO_SAVE, ())


def _saved_by_modules_to_save(model: nn.Module) -> set[str]:
    return {f"{name}.{key}" for name in modules_to_save_of(model) for key in model.get_submodule(name).state_dict()}


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but lora_A / lora_B, modules_to_save (and biases: all of them, or those of
    LoRA layers)."""
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for name in modules_to_save_of(model):
        model.get_submodule(name).requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, module in adapter_layers(model):  # LoRALinear and MultiLoRALinear
            if module.bias is not None:
                module.bias.requires_grad_(True)
    return model


# A MultiLoRALinear's adapters are its stacked lora_A / lora_B plus these: without them the restored adapters
# have no scaling, rank or name (a KeyError by name, the base layer's output by slot).
_MULTI_ADAPTER_STATE = ("scalings", "ranks", "_extra_state")


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The LoRA part of model.state_dict() (loralib's keys and rule), plus modules_to_save, and each
    MultiLoRALinear's scalings, ranks and adapter names. load_lora_state_dict loads it back."""
    _check_bias(bias)
    state = model.state_dict()
    keep = {k for k in state if "lora_" in k} | _saved_by_modules_to_save(model)
    for name, module in adapter_layers(model):
        prefix = f"{name}." if name else ""
        if not isinstance(module, LoRALinear):
            keep |= {prefix + key for key in _MULTI_ADAPTER_STATE}
        if bias == "lora_only" and module.bias is not None:
            keep.add(prefix + "bias")
    if bias == "all":
        keep |= {k for k in state if k.endswith("bias")}
    return {k: v for k, v in state.items() if k in keep}


def load_lora_state_dict(model: nn.Module, state: dict) -> nn.Module:
    """Load what lora_state_dict returned (or torch.load of its file) into a model of the same structure (the
    LoRA layers injected as when it was saved); returns the model.

    Every key must land: a key the model does not have, or a LoRA key of the model the state lacks (what
    lora_state_dict(model) would write), is an error naming them, raised before anything is loaded."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(lora_state_dict(model)) - set(state))
    if unknown or missing:
        raise ValueError("load_lora_state_dict: the state does not fit the model: "
                         + (f"keys the model does not have: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}; "
                            if unknown else "")
                         + (f"LoRA keys the state lacks: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                            if missing else ""))
    shapes = [k for k, v in state.items() if isinstance(v, torch.Tensor) and own[k].shape != v.shape]
    if shapes:
        raise ValueError("load_lora_state_dict: shapes differ for "
                         + ", ".join(f"{k} ({tuple(state[k].shape)} vs the model's {tuple(own[k].shape)})"
                                     for k in shapes[:8]))
    model.load_state_dict(state, strict=False)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear in the model."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRALinear and MultiLoRALinear in the model."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "adapter_disabled")]


def merge_adapter(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge every LoRA layer's adapter (a MultiLoRALinear's active one) into its weight: forward is then the
    base model's cost. safe=True: a layer whose merge would make a weight non-finite raises before that
    layer is written (layers merged before it stay merged)."""
    for _, layer in adapter_layers(model):
        layer.merge(safe=safe)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its weight again."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (a MultiLoRALinear: its active adapter) and put its base layer (nn.Linear /
    Conv1D, holding the merged weight) back."""
    for name, layer in adapter_layers(model):
        replace_module(model, name, layer.merge_and_unload())
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove LoRA: every LoRA layer gives back its base layer with the adapter taken out."""
    for name, layer in adapter_layers(model):
        replace_module(model, name, layer.unload())
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model computes without its adapters (LoRALinear and MultiLoRALinear layers;
    merged adapters are unmerged, and merged again on exit)."""
    layers = [m for _, m in adapter_layers(model) if not m.adapter_disabled]
    remerge = []
    for layer in layers:
        merged = layer.merged if isinstance(layer, LoRALinear) else layer.merged_adapter
        if merged:
            remerge.append((layer, merged))
            layer.unmerge()
    for layer in layers:
        layer.adapter_disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_disabled = False
        for layer, merged in remerge:
            layer.merge() if isinstance(layer, LoRALinear) else layer.merge(merged)


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print and return (trainable parameters, all parameters), each shared parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    share = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")
    return trainable, total
