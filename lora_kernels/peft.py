"""Hugging Face PEFT interop: PEFT's adapter format, and PeftModels computing through the fused op.

    report = patch_peft_model(peft_model)          PEFT LoRA layers run lora_kernels' fused op
    peft_model(x, adapter_names=[...])             mixed batches on lora_linear_multi (inference, as PEFT)
    with adapter_batch(peft_model, [...]): ...     ... and in training, which PEFT refuses
    unpatch_peft_model(peft_model)                 PEFT's own forward again
    load_peft_adapter(model, "dir")                a PEFT adapter directory into a plain torch/transformers model
    save_peft_adapter(model, "dir")                what PeftModel.from_pretrained (and vLLM) read

peft is imported only by patch_peft_model; the adapter files need safetensors. PEFT's format:
adapter_config.json (LoraConfig's fields) and adapter_model.safetensors with keys
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r] (plus whole
tensors of modules_to_save, and biases when bias != "none"); a DoRA adapter (use_dora=True) adds
``...lora_magnitude_vector`` [out] per layer.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backends import FLOAT32_ADAPTERS_ON_HALF
from .config import LoRAConfig
from .dora import DoRANormCache, cached_dora_linear
from .functional import lora_linear, lora_linear_multi
from .model_setup import (_MODULES_TO_SAVE, inject_layers, lora_layers, mark_only_lora_as_trainable, matching_modules,
                          target_names)
from .modules import LoRALinear, is_conv1d
from .weight4bit import Weight4bit, is_bnb_linear4bit
from .multi import MultiLoRALinear, common_free_slot, multi_lora_layers

__all__ = ["patch_peft_model", "unpatch_peft_model", "PatchReport", "adapter_batch", "load_peft_adapter",
           "save_peft_adapter"]

BASE_ONLY = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
_ADAPTER_BIAS = "_lora_kernels_adapter_bias"  # the bias= of the adapter load_peft_adapter put into a model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT's default names of the repeated block list, for layers_to_transform without layers_pattern
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")
# LoraConfig fields that change what the adapter computes and that load_peft_adapter cannot honour, with the
# value that is fine
_UNSUPPORTED = {
    "lora_bias": False, "layer_replication": None, "use_qalora": False,
    "target_parameters": None, "alora_invocation_tokens": None, "trainable_token_indices": None,
    "megatron_config": None,
}


# -- patching a PeftModel ----------------------------------------------------------------------------------

@dataclass
class PatchReport:
    """What patch_peft_model did: the layers now on the fused op, and those left on PEFT's path, with why."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.patched)} PEFT LoRA layer(s) on lora_kernels' fused op, {len(self.skipped)} left on "
                 "PEFT's path"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _peft_4bit_class():
    """PEFT's LoRA layer on a bitsandbytes Linear4bit (None when PEFT's bitsandbytes support is absent)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _unsupported_reason(layer) -> str | None:
    """Why a PEFT LoRA layer cannot compute through the fused op (None: it can)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    base = layer.get_base_layer()
    on_4bit = _peft_4bit_class() is not None and type(layer) is _peft_4bit_class() and is_bnb_linear4bit(base)
    if type(layer) is not PeftLoraLinear and not on_4bit:
        return (f"{type(layer).__module__}.{type(layer).__name__} (only plain Linear/Conv1D LoRA layers and "
                "bitsandbytes 4-bit ones are fused)")
    if not on_4bit and type(base) is not nn.Linear and not is_conv1d(base):
        return f"base layer {type(base).__name__} (quantized or custom layers stay on PEFT's path)"
    others = [name for name in layer.lora_A if name in getattr(layer, "lora_variant", {}) and not _is_dora(layer, name)]
    if others:
        return f"LoRA variant(s) {sorted(others)} (other than DoRA)"
    if on_4bit:
        try:
            _weight4bit_of(base)  # checked now, so that a torch.compile'd first call finds it checked
        except ValueError as error:
            return f"its 4-bit weight is not read: {error}"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias=True"
    return None


def _is_plain(layer, name: str) -> bool:
    """Whether the layer's adapter `name` is vanilla LoRA (no variant such as DoRA, no lora_bias)."""
    return (name in layer.lora_A and name not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "lora_bias", {}).get(name))


def _is_dora(layer, name: str) -> bool:
    """Whether the layer's adapter `name` is DoRA (PEFT's DoraLinearVariant, or use_dora in older PEFT)."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return type(variant).__name__ == "DoraLinearVariant"
    return bool(getattr(layer, "use_dora", {}).get(name))


def _dropout_p(layer, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0


def _fused_peft_forward(self, x, *args, **kwargs):
    """A PEFT LoRA Linear's forward through lora_kernels.lora_linear (installed by patch_peft_model).

    One active vanilla adapter on an unmerged layer: lora_linear. A mixed batch (PEFT's adapter_names=,
    or adapter_batch()): lora_linear_multi. Anything else (extra arguments, a disabled or merged
    adapter, several active adapters, variants, x of another dtype than the weight) runs PEFT's own
    forward, which handles it.
    """
    names = kwargs.get("adapter_names", None) if set(kwargs) <= {"adapter_names"} else None
    if names is None and not kwargs:
        names = self.__dict__.get("_lora_kernels_batch_names")
        if names is not None and (x.dim() < 2 or len(names) != x.shape[0]):
            raise ValueError(f"adapter_batch names {len(names)} samples, the batch has "
                             f"{x.shape[0] if x.dim() >= 2 else 1}: give one adapter name per sample")
    base = self.get_base_layer()
    if is_bnb_linear4bit(base):
        return _fused_peft_4bit_forward(self, base, x, args, kwargs, names)
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    plain_call = (not args and not self.disable_adapters and not self.merged
                  and (x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type)))
    if plain_call and names is not None:
        y = _fused_mixed_batch(self, x, weight, base.bias, names)
        if y is not None:
            return y
    active = [name for name in self.active_adapters if name in self.lora_A]
    if (not plain_call or kwargs or names is not None or len(active) != 1
            or not (_is_plain(self, active[0]) or _peft_dora(self, active[0]))):
        return _peft_forward(self, x, args, kwargs, names)
    name = active[0]
    if _peft_dora(self, name):
        return _fused_peft_dora_forward(self, x, weight, base.bias, name)
    return lora_linear(x, weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], _dropout_p(self, name), self.lora_dropout[name].training)


def _peft_dora(layer, name: str) -> bool:
    """A DoRA adapter the fused op serves: PEFT's variant, without lora_bias."""
    return _is_dora(layer, name) and not getattr(layer, "lora_bias", {}).get(name)


def _fused_peft_dora_forward(layer, x, weight, bias, name: str):
    """PEFT's DoRA layer through lora_kernels.dora_linear (weight: a tensor, or a Linear4bit's Weight4bit): its
    magnitude, scaling and lora_dropout; the norm cached on the layer while W0, A, B and the scaling are unchanged
    (DoRANormCache)."""
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    magnitude = layer.lora_magnitude_vector[name].weight
    scaling = layer.scaling[name]
    training = layer.lora_dropout[name].training
    cache = layer.__dict__.setdefault("_lora_kernels_dora_norms", {}).setdefault(name, DoRANormCache())
    return cached_dora_linear(cache, x, weight, bias, lora_A, lora_B, magnitude, scaling, _dropout_p(layer, name),
                              training)


def _peft_forward(layer, x, args, kwargs, names):
    """PEFT's own forward of the layer, handed the adapter_batch() block's names as PEFT's adapter_names= (so that a
    mixed batch the fused op cannot serve is PEFT's mixed batch, never every row on the active adapter; PEFT
    refuses it in training)."""
    if names is not None and "adapter_names" not in kwargs:
        kwargs = {**kwargs, "adapter_names": names}
    return type(layer).forward(layer, x, *args, **kwargs)


def _fused_peft_4bit_forward(self, base, x, args, kwargs, names):
    """PEFT's LoRA layer on a bitsandbytes Linear4bit through lora_linear (lora_linear_multi for a mixed batch) on
    its Weight4bit (the codes read in place), computing as PEFT does: the base in the Linear4bit's compute dtype,
    the LoRA branch from float32 (or the adapter's dtype), the result in x's dtype. Several active adapters, merged
    or disabled adapters and calls it cannot serve run PEFT's own forward."""
    active = [name for name in self.active_adapters if name in self.lora_A]
    compute = base.compute_dtype or x.dtype
    used = active if names is None else [n for n in dict.fromkeys(names) if n != BASE_ONLY and n in self.lora_A]
    servable = (lambda n: _is_plain(self, n) or (names is None and _peft_dora(self, n)))  # QDoRA: one adapter
    if (args or set(kwargs) - {"adapter_names"} or self.disable_adapters or self.merged or not used
            or (names is None and len(active) != 1) or not all(servable(n) for n in used)
            or torch.is_autocast_enabled(x.device.type) or not x.is_floating_point()
            or not all(_adapter_fits(self.lora_A[n].weight.dtype, compute) for n in used)):
        return _peft_forward(self, x, args, kwargs, names)
    weight = _weight4bit_of(base)
    bias = base.bias if base.bias is None or base.bias.dtype == compute else base.bias.to(compute)
    if names is None and _peft_dora(self, active[0]):
        y = _fused_peft_dora_forward(self, x.to(compute), weight, bias, active[0])
    elif names is None:
        name = active[0]
        y = lora_linear(x.to(compute), weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                        self.scaling[name], _dropout_p(self, name), self.lora_dropout[name].training)
    else:
        y = _fused_mixed_batch(self, x.to(compute), weight, bias, names)
        if y is None:
            return _peft_forward(self, x, args, kwargs, names)
    return y.to(x.dtype)


def _adapter_fits(adapter_dtype: torch.dtype, compute: torch.dtype) -> bool:
    """Whether the fused op takes adapters of this dtype on this compute dtype (its own, or float32 on 16 bits)."""
    return adapter_dtype == compute or (compute, adapter_dtype) in FLOAT32_ADAPTERS_ON_HALF


def _weight4bit_of(base: nn.Module) -> Weight4bit:
    """The Weight4bit over a Linear4bit's Params4bit (its tensors shared), read again whenever its data or
    quant_state change. Eager calls check the quant_state (Weight4bit.from_bnb, also done when the model is
    patched) and keep the result on the layer; a call inside torch.compile reads the tensors as they are
    (Weight4bit.over_bnb: data_ptr and the table checks cannot be traced) once that quant_state was checked."""
    param = base.weight
    state = param.quant_state
    cached = base.__dict__.get("_lora_kernels_weight4bit")  # (quant_state, storage pointers, Weight4bit)
    if torch.compiler.is_compiling():
        if cached is None or cached[0] is not state:
            raise RuntimeError("this Linear4bit's quant_state changed since it was last run or patched: run the model "
                               "once without torch.compile (or patch_peft_model it again) so that it is checked")
        return Weight4bit.over_bnb(param, cached[2])
    pointers = (param.data.data_ptr(), state.absmax.data_ptr())
    if cached is None or cached[0] is not state or cached[1] != pointers:
        cached = (state, pointers, Weight4bit.from_bnb(param))
        base.__dict__["_lora_kernels_weight4bit"] = cached
    return cached[2]


def _fused_mixed_batch(layer, x, weight, bias, names):
    """PEFT's mixed batch (one adapter name per sample; "__base__": none) through lora_linear_multi (each adapter
    with its own lora_dropout), or None when PEFT's own path must serve it (a variant, names that do not
    match the batch).

    The adapters in the batch are stacked (padded to the largest rank) at every call: n·r·(in + out)
    elements, small next to the layer; the stack is differentiable, so each adapter gets its gradient."""
    if not isinstance(names, (list, tuple)) or x.dim() < 2 or len(names) != x.shape[0]:
        return None
    used = [n for n in dict.fromkeys(names) if n != BASE_ONLY and n in layer.lora_A]
    if not used or not all(_is_plain(layer, n) for n in used):
        return None if used else F.linear(x, weight, bias)
    ranks = [layer.lora_A[n].weight.shape[0] for n in used]
    r_max = max(ranks)
    lora_A = torch.stack([F.pad(layer.lora_A[n].weight, (0, 0, 0, r_max - r)) for n, r in zip(used, ranks)])
    lora_B = torch.stack([F.pad(layer.lora_B[n].weight, (0, r_max - r)) for n, r in zip(used, ranks)])
    slot = {n: i for i, n in enumerate(used)}
    ids = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64, device=x.device)
    scalings = torch.tensor([float(layer.scaling[n]) for n in used], dtype=torch.float64)
    dropouts = torch.tensor([_dropout_p(layer, n) for n in used], dtype=torch.float64)
    training = layer.lora_dropout[used[0]].training
    return lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, ids, torch.tensor(ranks), dropouts, training)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names):
    """Within the block, every patched PEFT LoRA layer serves sample i of the batch on adapter_names[i]
    ("__base__": the base model), and so does every modules_to_save copy (a classification head per adapter):
    PEFT's mixed batches, in training too (PEFT's own adapter_names= refuses training). The model must have
    been patched by patch_peft_model. Refused as PEFT refuses them: a name that is no adapter of the model, a
    model with a merged adapter, and (at the forward) a batch whose length is not len(adapter_names). Blocks
    nest: the outer block's names apply again when an inner one exits."""
    from peft.tuners.lora.layer import LoraLayer

    names = list(adapter_names)
    layers = [m for m in model.modules() if _is_patched(m)]
    if not layers:
        raise ValueError("no patched PEFT LoRA layer in the model: call patch_peft_model(model) first")
    lora_layers_ = [m for m in model.modules() if isinstance(m, LoraLayer)]
    known = set().union(*(set(m.lora_A.keys()) for m in lora_layers_))
    unknown = sorted({n for n in names if n != BASE_ONLY} - known)
    if unknown:
        raise ValueError(f"adapter_names holds no adapter of the model: {unknown}; adapters: {sorted(known)} "
                         f"(and {BASE_ONLY!r} for the base model)")
    merged = [m for m in lora_layers_ if m.merged]
    if merged:
        raise ValueError(f"the model has merged adapters ({sorted(set(merged[0].merged_adapters))}): a mixed batch "
                         "would serve every row on them; unmerge first")
    previous = {layer: layer.__dict__.get("_lora_kernels_batch_names") for layer in layers}
    per_sample = _per_sample_wrapper()
    hooks = [wrapper.register_forward_pre_hook(_AdapterNames(names), with_kwargs=True)
             for wrapper in model.modules() if isinstance(wrapper, per_sample)]
    for layer in layers:
        layer._lora_kernels_batch_names = names
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for layer, outer in previous.items():
            if outer is None:
                layer.__dict__.pop("_lora_kernels_batch_names", None)
            else:
                layer._lora_kernels_batch_names = outer


class _AdapterNames:
    """A forward pre-hook handing a module the block's adapter_names= (what PEFT's own mixed batch does)."""

    def __init__(self, names: list):
        self.names = names

    def __call__(self, module, args, kwargs):
        return args, {**kwargs, "adapter_names": self.names}


def _per_sample_wrapper() -> type:
    """PEFT's wrapper class that serves each sample on its adapter given adapter_names=: modules_to_save copies
    (AuxiliaryTrainingWrapper in recent PEFT, ModulesToSaveWrapper before)."""
    from peft.utils import other

    return getattr(other, "AuxiliaryTrainingWrapper", None) or other.ModulesToSaveWrapper


class _FusedForward:
    """The forward patch_peft_model installs on a layer: _fused_peft_forward bound to it. An object rather than a
    bound method, so that a patched model pickles (torch.save) and deep-copies with each copy bound to itself."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        return _fused_peft_forward(self.layer, x, *args, **kwargs)


def _is_patched(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _FusedForward)


def patch_peft_model(model: nn.Module) -> PatchReport:
    """Make every PEFT LoRA layer that wraps an nn.Linear or a transformers Conv1D compute through the fused op.

    The active adapter, its scaling (rsLoRA included), lora_dropout, fan_in_fan_out, the bias, the
    merged state, disable_adapter() and float32 adapters on a 16-bit base are honoured; mixed batches
    (adapter_names=, and adapter_batch() for training) run lora_linear_multi; what the
    fused op cannot serve (variants other than DoRA, lora_bias, 8-bit bases, Embedding/Conv layers) stays on
    PEFT's path and is listed in the report. DoRA adapters run lora_kernels.dora_linear (no dense W0 + s·BA; mixed
    batches with a DoRA adapter run PEFT's path). QLoRA layers (a bitsandbytes Linear4bit base) run lora_linear (a
    DoRA adapter: dora_linear, QDoRA) on the 4-bit weight read in place (Weight4bit.from_bnb). The model keeps
    training, merging, saving (save_pretrained) and compiling as before: only the layers' forward changes, no
    parameter or key.
    """
    report = PatchReport()
    from peft.tuners.lora.layer import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        module.forward = _FusedForward(module)
        report.patched.append(name)
    return report


def unpatch_peft_model(model: nn.Module) -> int:
    """Give every patched layer PEFT's forward back; returns how many were patched."""
    count = 0
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            count += 1
    return count


# -- PEFT's adapter format ---------------------------------------------------------------------------------

def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError("PEFT adapter files need the safetensors package (pip install safetensors)") from error
    return safetensors.torch


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def _layer_index(name: str, layers_pattern) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or COMMON_LAYERS_PATTERN)
    for pattern in patterns:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def _read_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path!r} is not a PEFT adapter directory: no {CONFIG_NAME}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key, fine in _UNSUPPORTED.items():
        value = config.get(key, fine)
        if value not in (fine, [], {}):
            raise ValueError(f"{config_path}: {key}={value!r} is not supported by lora_kernels (only plain LoRA)")
    if config.get("exclude_modules"):
        raise ValueError(f"{config_path}: exclude_modules={config['exclude_modules']!r} is not supported")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{config_path}: bias must be 'none', 'all' or 'lora_only', got {config.get('bias')!r}")
    return config


def _model_key(key: str) -> str:
    """A key of PEFT's file as a key of the plain model: without the PeftModel prefix, and without the
    ".base_layer" of the wrapped layer (PEFT saves a LoRA layer's trained bias as <layer>.base_layer.bias)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return key.replace(".base_layer.", ".")


# lora_A / lora_B weights, and DoRA's magnitude (saved by PEFT as <module>.lora_magnitude_vector)
_LORA_KEY = re.compile(r"^(?P<module>.*)\.(?:lora_(?P<which>[AB])(?:\.[^.]+)?\.weight"
                       r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?)$")


def load_peft_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                      is_trainable: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter directory into a plain torch or transformers model, in place.

    LoRALinear layers are injected where the adapter's config says (target_modules, "all-linear"
    included, layers_to_transform/layers_pattern), with its r, lora_alpha, rank_pattern, alpha_pattern,
    use_rslora and lora_dropout; layers that are LoRALinear already get the adapter switched in.
    modules_to_save and saved biases are loaded into the model. Adapters stored in float32 for a
    16-bit model stay float32 (PEFT's default), others take the base weight's dtype. Every tensor
    of the file must land, and every injected layer must get its A and B: anything else is an error
    naming the keys. is_trainable=False (PEFT's default) leaves every parameter frozen; True trains
    the adapter and modules_to_save. adapter_name labels the adapter: LoRALinear holds one (loading
    another name into it is an error), a MultiLoRALinear at a targeted layer takes it as a new named
    adapter (with its lora_dropout), in the same slot in every layer.
    """
    path = os.fspath(path)
    config = _read_config(path)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{path!r} has no {WEIGHTS_NAME} (only safetensors adapters are read)")
    tensors = {_model_key(k): v for k, v in _safetensors().load_file(weights_path).items()}

    adapters: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    others = {}
    for key, value in tensors.items():
        found = _LORA_KEY.match(key)
        if found:
            adapters[found["module"]][found["which"] or "magnitude"] = value
        else:
            others[key] = value

    targets = config.get("target_modules") or []
    names = (set(target_names(model, targets)) | {n for n, _ in lora_layers(model) if n in adapters}
             | {n for n, _ in multi_lora_layers(model) if n in adapters})
    layers_to_transform = config.get("layers_to_transform")
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        names = {n for n in names if _layer_index(n, config.get("layers_pattern")) in wanted}
    use_dora = bool(config.get("use_dora", False))
    expected = {"A", "B", "magnitude"} if use_dora else {"A", "B"}
    missing = sorted(n for n in names if set(adapters.get(n, {})) != expected)
    unexpected = sorted(set(adapters) - names)
    if missing or unexpected:
        tensors_needed = "lora_A/lora_B/lora_magnitude_vector" if use_dora else "lora_A/lora_B"
        raise ValueError(f"{path}: the adapter does not fit the model: layers its config targets without "
                         f"{tensors_needed} in the file: {missing[:5]}{' ...' if len(missing) > 5 else ''}; LoRA "
                         f"tensors of layers the model lacks or the config does not target: {unexpected[:5]}")

    base_config = LoRAConfig(r=int(config.get("r", 8)), lora_alpha=config.get("lora_alpha", 8),
                             lora_dropout=float(config.get("lora_dropout", 0.0)),
                             use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora)
    # Every check first, so that an adapter that does not fit leaves the model as it was.
    state = model.state_dict(keep_vars=True)
    for key, value in others.items():
        if key not in state or state[key].shape != value.shape:
            place = f"no parameter {key!r}" if key not in state else f"its shape is {tuple(state[key].shape)}"
            raise ValueError(f"{path}: tensor {PREFIX + key!r} {tuple(value.shape)} has no place in the model "
                             f"({place})")
    plans = {}
    for name in sorted(names):
        module = model.get_submodule(name)
        lora_A, lora_B = adapters[name]["A"], adapters[name]["B"]
        r = _pattern_value(config.get("rank_pattern") or {}, name, base_config.r)
        in_features, out_features = _in_out_features(module)
        if tuple(lora_A.shape) != (r, in_features) or tuple(lora_B.shape) != (out_features, r):
            raise ValueError(f"{path}: {name}: expected lora_A [{r}, {in_features}] and lora_B [{out_features}, {r}] "
                             f"(r from the config), the file holds {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, base_config.lora_alpha)
        if isinstance(module, MultiLoRALinear) and (adapter_name in module.slots or r > module.r_max):
            raise ValueError(f"{path}: {name} (MultiLoRALinear) cannot take adapter {adapter_name!r} of rank {r}: "
                             f"{'the name is taken' if adapter_name in module.slots else f'r_max={module.r_max}'}")
        if use_dora and isinstance(module, MultiLoRALinear):
            raise ValueError(f"{path}: {name} is a MultiLoRALinear, which holds no DoRA adapters (use_dora=True)")
        if use_dora and tuple(adapters[name]["magnitude"].shape) != (out_features,):
            raise ValueError(f"{path}: {name}: expected lora_magnitude_vector [{out_features}], the file holds "
                             f"{tuple(adapters[name]['magnitude'].shape)}")
        if isinstance(module, LoRALinear):
            _check_adapter_name(module, adapter_name)
            if module.use_dora != use_dora or (use_dora and r != module.r):
                raise ValueError(f"{path}: {name} is a LoRALinear with use_dora={module.use_dora}, r={module.r}; the "
                                 f"adapter has use_dora={use_dora}, r={r}: load it into the base model instead")
        plans[name] = (module, base_config.replace(r=r, lora_alpha=alpha))
    plain = sorted(name for name, (module, _) in plans.items() if not isinstance(module, (LoRALinear, MultiLoRALinear)))
    if plain and any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        # a LoRALinear there would serve every row on this adapter, rows of other adapters and of none included
        raise ValueError(f"{path}: the adapter targets layers that are no MultiLoRALinear in a multi-adapter model: "
                         f"{plain[:5]}{' ...' if len(plain) > 5 else ''}; inject_multi_lora them first")
    multi = {name: plan for name, plan in plans.items() if isinstance(plan[0], MultiLoRALinear)}
    slot = None
    if multi:  # one slot for the adapter in every MultiLoRALinear, as lora_kernels.add_adapter does
        slot = common_free_slot(module for module, _ in multi.values())
        if slot is None:
            raise ValueError(f"{path}: no adapter slot is free in every MultiLoRALinear (capacity reached)")

    for name, (module, layer_config) in plans.items():
        A, B = adapters[name]["A"], adapters[name]["B"]
        if isinstance(module, MultiLoRALinear):
            module.add_adapter(adapter_name, layer_config.r, layer_config.lora_alpha, layer_config.use_rslora,
                               lora_A=A.to(module.lora_A.dtype), lora_B=B.to(module.lora_B.dtype), slot=slot,
                               lora_dropout=layer_config.lora_dropout)
        elif isinstance(module, LoRALinear) and use_dora:
            _load_dora_adapter(module, layer_config, A, B, adapters[name]["magnitude"])
        elif isinstance(module, LoRALinear):
            module.switch_adapter(A, B, lora_alpha=layer_config.lora_alpha)
            module.lora_dropout, module.use_rslora = layer_config.lora_dropout, layer_config.use_rslora
            module.scaling = layer_config.scaling
        else:
            half_base = module.weight.dtype in (torch.float16, torch.bfloat16)
            inject_layers(model, {name: layer_config},
                          adapter_dtype=torch.float32 if A.dtype == torch.float32 and half_base else None)
            layer = model.get_submodule(name)
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
                if use_dora:
                    layer.lora_magnitude.copy_(adapters[name]["magnitude"])
            layer.adapter_name = adapter_name
    with torch.no_grad():
        for key, value in others.items():
            state[key].copy_(value)
    saved_modules = config.get("modules_to_save") or []
    if saved_modules:
        setattr(model, _MODULES_TO_SAVE, tuple(sorted(matching_modules(model, saved_modules))))
    setattr(model, _ADAPTER_BIAS, config.get("bias", "none"))  # re-saving writes the biases it loaded
    if is_trainable:
        mark_only_lora_as_trainable(model, bias=config.get("bias", "none"))  # PEFT trains the biases bias= names
    else:
        model.requires_grad_(False)
    return model


@torch.no_grad()
def _load_dora_adapter(layer: LoRALinear, config: LoRAConfig, lora_A, lora_B, magnitude) -> None:
    """A DoRA adapter into a DoRA LoRALinear of the same rank: out of the weight first if merged, in again after."""
    merged = layer.merged
    layer.unmerge()
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    layer.lora_magnitude.copy_(magnitude)
    layer.lora_alpha, layer.lora_dropout, layer.use_rslora = config.lora_alpha, config.lora_dropout, config.use_rslora
    layer.scaling = config.scaling
    if merged:
        layer.merge()


def _in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a layer an adapter can go into."""
    if isinstance(module, (LoRALinear, MultiLoRALinear)) or is_bnb_linear4bit(module):
        return module.in_features, module.out_features  # a Linear4bit's weight is its packed codes [n, 1]
    weight = module.weight
    return tuple(weight.shape) if is_conv1d(module) else tuple(weight.shape[::-1])


def _check_adapter_name(layer: LoRALinear, adapter_name: str) -> None:
    current = getattr(layer, "adapter_name", "default")
    if current != adapter_name:
        raise ValueError(f"the layer holds adapter {current!r}; lora_kernels keeps one adapter per layer, so "
                         f"adapter {adapter_name!r} would replace it (load it with adapter_name={current!r})")


@dataclass
class _AdapterEntry:
    """One layer's adapter as PEFT's format describes it."""

    layer: nn.Module
    r: int
    alpha: float
    use_rslora: bool
    dropout: float
    fan_in_fan_out: bool
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    magnitude: torch.Tensor | None = None  # [out], DoRA's


def _adapter_entries(model: nn.Module, adapter_name: str | None) -> dict[str, _AdapterEntry]:
    """The adapter to save, per layer: every LoRALinear's, and adapter `adapter_name` of every MultiLoRALinear."""
    entries = {}
    for name, layer in lora_layers(model):
        if adapter_name is not None:
            _check_adapter_name(layer, adapter_name)
        entries[name] = _AdapterEntry(layer, layer.r, layer.lora_alpha, layer.use_rslora, layer.lora_dropout,
                                      layer.fan_in_fan_out, layer.lora_A, layer.lora_B,
                                      layer.lora_magnitude if layer.use_dora else None)
    for name, layer in multi_lora_layers(model):
        if adapter_name is None:
            raise ValueError("the model has MultiLoRALinear layers: name the adapter to save (adapter_name=...)")
        if adapter_name not in layer.slots:
            continue
        slot = layer.slots[adapter_name]
        r = int(layer.ranks[slot])
        alpha, use_rslora, dropout = layer.alphas[adapter_name]
        entries[name] = _AdapterEntry(layer, r, alpha, use_rslora, dropout, False,
                                      layer.lora_A[slot, :r], layer.lora_B[slot, :, :r])
    if not entries:
        raise ValueError("the model has no LoRA layers to save (LoRALinear, or MultiLoRALinear holding "
                         f"adapter {adapter_name!r})")
    return entries


def _exact_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT's rule (the key matching the end of a module name, after a
    dot) applies to module `name` alone: a bare "0" would also match layer "1.0"."""
    return "^" + re.escape(name)


def _exact_targets(model: nn.Module, names: list[str]):
    """target_modules that select exactly these modules: the list of names (PEFT's rule: a name, or a suffix
    after a dot), or, when one of them is also the suffix of another module's name, a regex of the names."""
    others = [n for n, _ in model.named_modules() if n not in names]
    if not any(other.endswith("." + name) for name in names for other in others):
        return names
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")$"


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                      base_model_name_or_path: str | None = None) -> None:
    """Write the model's LoRA adapter as PEFT does (adapter_config.json + adapter_model.safetensors).

    PeftModel.from_pretrained(base_model, path) then computes what this model computes. Layers whose
    rank or alpha differ from the most common ones are written as rank_pattern / alpha_pattern;
    modules_to_save are written whole; biases are written (bias="lora_only"/"all") when they are trained.
    adapter_name: with LoRALinear layers, when given, must be their adapter (see load_peft_adapter);
    with MultiLoRALinear layers, the named adapter to write.
    """
    entries = _adapter_entries(model, adapter_name)
    layers = {name: entry.layer for name, entry in entries.items()}
    for option in ("dropout", "use_rslora"):
        values = {getattr(entry, option) for entry in entries.values()}
        if len(values) > 1:
            raise ValueError(f"PEFT's format has one {option} per adapter; the layers use {sorted(values)}")
    use_dora = {entry.magnitude is not None for entry in entries.values()}
    if len(use_dora) > 1:
        raise ValueError("PEFT's format has one use_dora per adapter; some layers are DoRA layers, others not: "
                         f"{sorted(n for n, e in entries.items() if e.magnitude is not None)[:5]}")
    first = next(iter(entries.values()))
    r = collections.Counter(e.r for e in entries.values()).most_common(1)[0][0]
    alpha = collections.Counter(e.alpha for e in entries.values()).most_common(1)[0][0]

    tensors = {}
    for name, entry in entries.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = entry.lora_A.detach()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = entry.lora_B.detach()
        if entry.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = entry.magnitude.detach()
    saved_modules = list(getattr(model, _MODULES_TO_SAVE, ()))
    # the biases trained (a modules_to_save copy is written whole anyway: its bias trains, others need not), or
    # those of the adapter this model loaded, even frozen since
    lora_biases = any(layer.bias is not None and layer.bias.requires_grad for layer in layers.values())
    other_biases = any(p.requires_grad for n, p in model.named_parameters()
                       if n.endswith("bias") and n.rpartition(".")[0] not in layers
                       and not any(n.startswith(module + ".") for module in saved_modules))
    trained = "all" if other_biases else "lora_only" if lora_biases else "none"
    loaded = getattr(model, _ADAPTER_BIAS, "none")
    bias = max(trained, loaded, key=("none", "lora_only", "all").index)
    if bias != "none":
        for n, p in model.named_parameters():
            owner = n.rpartition(".")[0]
            if n.endswith("bias") and (bias == "all" or owner in layers):
                # PEFT keeps a LoRA layer's own bias in its wrapped base layer, and reads it from there
                tensors[PREFIX + (f"{owner}.base_layer.bias" if owner in layers else n)] = p.detach()
    for module_name in saved_modules:
        for key, value in model.get_submodule(module_name).state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()

    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": _exact_targets(model, sorted(layers)),
        "bias": bias,
        "fan_in_fan_out": all(e.fan_in_fan_out for e in entries.values()),
        "modules_to_save": saved_modules or None,
        "rank_pattern": {_exact_key(name): e.r for name, e in entries.items() if e.r != r},
        "alpha_pattern": {_exact_key(name): e.alpha for name, e in entries.items() if e.alpha != alpha},
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": use_dora == {True},
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    contiguous = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared or strided storage
    _safetensors().save_file(contiguous, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
