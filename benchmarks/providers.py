"""The things the benchmark times, built for one case each.

LoRA linear providers (same weights, same inputs):
  base       F.linear with the frozen weight: the physical floor
  reference  PEFT's unfused formula in plain PyTorch: base(x) + B(A(dropout(x))) * s
  peft       peft.tuners.lora.Linear (when peft is installed)
  loralib    loralib.Linear (when loralib is installed)
  ours       lora_kernels.LoRALinear on the automatic backend; ours[<backend>] forces one
QLoRA cases (a 4-bit NF4 base, double quantized): base stays F.linear on the unquantized weight (float32 on
  CPU, bf16 on a GPU); ours is LoRALinear4bit (on a GPU ours[fused] and ours[dequantize] force the triton
  backend's two 4-bit paths), peft PEFT's LoRA layer on a bitsandbytes Linear4bit holding the same bytes,
  ours-dense our LoRALinear on the unquantized weight, dequant "dequantize the whole W (our kernel: C++ on CPU,
  Triton on a GPU), F.linear, LoRA" (unsloth's and torchao's way, autograd keeping W for dx).
DoRA cases: ours is LoRALinear(use_dora=True), ours-lora our plain LoRA layer, peft PEFT's DoRA layer (use_dora=True),
  all with the same A, B and magnitude (‖W0 + s·BA‖ off by ~10% per row: a trained-looking gain). QDoRA cases (DoRA
  on an NF4 base): the same on the 4-bit weight (LoRALinear4bit, PEFT on a bitsandbytes Linear4bit).
Merge providers: ours (merge_), ours-safe, peft (LoraLayer.merge), gemm (one B @ A), floor (the weight read
and written once, in place: the memory traffic any in-place merge needs).
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear

from .harness import Provider, have, rotation, timed_call


def _with_env(name: str, value: str | None):
    """A prepare hook setting environment variable `name` to `value` (None: unset)."""

    def prepare() -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    return prepare


def _with_backend(backend: str | None):
    """A prepare hook forcing LORA_KERNELS_BACKEND (None: automatic)."""
    return _with_env("LORA_KERNELS_BACKEND", backend)


def ours_names(device: str) -> list[str]:
    """'ours' plus ours[<backend>] for each GPU backend on this device (auto chooses between them per shape)."""
    extra = {"cuda": ["triton", "cuda"], "cpu": []}[device]
    return ["ours"] + [f"ours[{b}]" for b in extra if b in lora_kernels.available_backends()]


def lora_linear_providers(M, d_in, d_out, r, dtype, dropout, train, device, wanted, lora_alpha=None,
                          quantized=None, dora=False) -> list[Provider]:
    """Providers computing one LoRA linear (forward, or forward + backward when train); quantized="nf4": the
    QLoRA providers (module docstring)."""
    torch.manual_seed(0)
    lora_alpha = 2 * r if lora_alpha is None else lora_alpha
    scaling = lora_alpha / r
    factory = dict(device=device, dtype=dtype)
    base = nn.Linear(d_in, d_out, **factory).requires_grad_(False)
    lora_A = torch.randn(r, d_in, **factory) / math.sqrt(d_in)
    lora_B = torch.randn(d_out, r, **factory) * 0.01
    next_x = rotation(lambda: torch.randn(M, d_in, **factory).requires_grad_(train))
    grad_y = torch.randn(M, d_out, **factory)
    trainable: list[torch.Tensor] = []

    def step(forward):
        return timed_call(forward, next_x, grad_y, train)

    def clear_grads() -> None:
        for t in trainable:
            t.grad = None

    def lora_params(module_A: torch.Tensor, module_B: torch.Tensor) -> None:
        with torch.no_grad():
            module_A.copy_(lora_A)
            module_B.copy_(lora_B)
        trainable.extend([module_A, module_B])

    providers = []
    default_prepare = _chain(_with_backend(None), clear_grads)
    if "base" in wanted:
        providers.append(Provider("base", step(lambda x: F.linear(x, base.weight, base.bias)), default_prepare,
                                  list(base.parameters())))
    if dora:
        return providers + _dora_providers(base, r, lora_alpha, dropout, train, wanted, step, default_prepare,
                                           lora_params, trainable, quantized)
    if quantized:
        return providers + _qlora_providers(base, r, lora_alpha, dropout, train, quantized, wanted, step,
                                            default_prepare, lora_params)
    if "reference" in wanted:
        ref_A, ref_B = nn.Parameter(lora_A.clone()), nn.Parameter(lora_B.clone())
        trainable.extend([ref_A, ref_B])

        def reference(x):
            return F.linear(x, base.weight, base.bias) + F.linear(F.linear(F.dropout(x, dropout, train), ref_A), ref_B) * scaling

        providers.append(Provider("reference", step(reference), default_prepare,
                                  [*base.parameters(), ref_A, ref_B]))
    peft_layer = peft_linear(base, r, lora_alpha, dropout) if "peft" in wanted else None
    if peft_layer is not None:
        peft_layer.train(train)
        lora_params(peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
        providers.append(Provider("peft", step(peft_layer), default_prepare, list(peft_layer.parameters())))
    if "loralib" in wanted and have("loralib"):
        import loralib

        lib_layer = loralib.Linear(d_in, d_out, r=r, lora_alpha=lora_alpha, lora_dropout=dropout, merge_weights=False)
        lib_layer = lib_layer.to(**factory)
        with torch.no_grad():
            lib_layer.weight.copy_(base.weight)
            lib_layer.bias.copy_(base.bias)
        lib_layer.weight.requires_grad_(False)
        lib_layer.bias.requires_grad_(False)
        lib_layer.train(train)
        lora_params(lib_layer.lora_A, lib_layer.lora_B)
        providers.append(Provider("loralib", step(lib_layer), default_prepare, list(lib_layer.parameters())))
    for name in ours_names(device):
        if name not in wanted and not (name.startswith("ours[") and "ours" in wanted):
            continue
        layer = LoRALinear.from_linear(base, r=r, lora_alpha=lora_alpha, lora_dropout=dropout)
        layer.train(train)
        lora_params(layer.lora_A, layer.lora_B)
        backend = name[5:-1] if name.startswith("ours[") else None
        providers.append(Provider(name, step(layer), _chain(_with_backend(backend), clear_grads),
                                  list(layer.parameters())))
    return providers


def _qlora_providers(base, r, lora_alpha, dropout, train, quant_type, wanted, step, prepare, lora_params):
    from lora_kernels import LoRALinear4bit, Weight4bit

    w4 = Weight4bit.quantize(base.weight.detach(), 64, quant_type, double_quant=True)
    providers = []
    for name in ("ours", "ours[fused]", "ours[dequantize]"):  # auto, and the triton backend's two 4-bit paths forced
        if name not in wanted or (name != "ours" and base.weight.device.type != "cuda"):
            continue
        layer = LoRALinear4bit(w4, base.bias, r=r, lora_alpha=lora_alpha, lora_dropout=dropout).train(train)
        lora_params(layer.lora_A, layer.lora_B)
        path = name[5:-1] if name != "ours" else None
        providers.append(Provider(name, step(layer), _chain(prepare, _with_env("LORA_KERNELS_4BIT_PATH", path)),
                                  list(layer.parameters())))
    if "ours-dense" in wanted:
        layer = LoRALinear.from_linear(base, r=r, lora_alpha=lora_alpha, lora_dropout=dropout).train(train)
        lora_params(layer.lora_A, layer.lora_B)
        providers.append(Provider("ours-dense", step(layer), prepare, list(layer.parameters())))
    if "peft" in wanted and have("peft") and have("bitsandbytes"):
        layer = peft_linear4bit(base, w4, r, lora_alpha, dropout).train(train)
        lora_params(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        providers.append(Provider("peft", step(layer), prepare, list(layer.parameters())))
    if "dequant" in wanted:
        A, B = nn.Parameter(torch.empty(r, base.in_features)), nn.Parameter(torch.empty(base.out_features, r))
        lora_params(A, B)
        scaling = lora_alpha / r
        args = w4.kernel_args()

        def dequantize_then_linear(x):
            with torch.no_grad():  # the whole W0, in x's dtype (a frozen tensor: autograd keeps it for dx)
                if x.is_cuda:  # the fused GEMMs' tile code, whole (ops/triton_lora_linear.py)
                    from lora_kernels.ops.triton_lora_linear import dequantize_4bit

                    weight = dequantize_4bit(args, w4.in_features, x.dtype)
                else:
                    weight = torch.ops.lora_kernels.dequantize_4bit(*args[:6], *w4.shape, w4.blocksize, x.dtype)
            return F.linear(x, weight, base.bias) + F.linear(F.linear(F.dropout(x, dropout, train), A), B) * scaling

        providers.append(Provider("dequant", step(dequantize_then_linear), prepare, [A, B]))
    return providers


def peft_linear4bit(base: nn.Linear, w4, r: int, lora_alpha: float, dropout: float = 0.0, use_dora: bool = False):
    """PEFT's LoRA layer on a bitsandbytes Linear4bit holding w4's bytes and base's bias (needs peft and
    bitsandbytes)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base4 = bnb.nn.Linear4bit(base.in_features, base.out_features, compute_dtype=base.weight.dtype,
                              compress_statistics=w4.double_quant, quant_type=w4.quant_type, device="meta")
    base4.weight, base4.bias = w4.to_bnb(), base.bias
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, use_dora=use_dora)
    return PeftLinear4bit(base4, "default", config=config, r=r, lora_alpha=lora_alpha, lora_dropout=dropout,
                          use_dora=use_dora)


def _dora_providers(base, r, lora_alpha, dropout, train, wanted, step, prepare, lora_params, trainable,
                    quantized=None):
    """ours (DoRA), ours-lora (LoRA) and peft (DoRA) on base's weight, or (quantized: QDoRA) on its 4-bit NF4
    quantization (LoRALinear4bit, and PEFT on a bitsandbytes Linear4bit holding the same bytes)."""
    from lora_kernels import LoRALinear4bit, Weight4bit

    w4 = Weight4bit.quantize(base.weight.detach(), 64, quantized, double_quant=True) if quantized else None
    providers = []
    magnitude = None
    for name in ("ours", "ours-lora"):
        if name not in wanted and not (name == "ours-lora" and "ours" in wanted):
            continue
        options = dict(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, use_dora=name == "ours")
        layer = (LoRALinear.from_linear(base, **options) if w4 is None else
                 LoRALinear4bit(w4, base.bias, **options)).train(train)
        lora_params(layer.lora_A, layer.lora_B)
        if name == "ours":
            with torch.no_grad():
                layer.reset_dora_magnitude()
                jitter = torch.randn(layer.out_features, generator=torch.Generator().manual_seed(1)) * 0.1
                layer.lora_magnitude.mul_(1 + jitter.to(layer.lora_magnitude))
            magnitude = layer.lora_magnitude.detach().clone()
            trainable.append(layer.lora_magnitude)
        # an optimizer step between two timed steps: the DoRA layer must recompute its cached norm
        layer_prepare = _chain(prepare, _optimizer_step_of(layer)) if train and name == "ours" else prepare
        providers.append(Provider(name, step(layer), layer_prepare, list(layer.parameters())))
    layer = None
    if "peft" in wanted:
        layer = peft_linear(base, r, lora_alpha, dropout, use_dora=True) if w4 is None else \
            peft_linear4bit(base, w4, r, lora_alpha, dropout, use_dora=True) if have("bitsandbytes") else None
    if layer is not None:
        layer.train(train)
        lora_params(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        peft_magnitude = layer.lora_magnitude_vector["default"].weight
        if magnitude is not None:
            with torch.no_grad():
                peft_magnitude.copy_(magnitude)
        trainable.append(peft_magnitude)
        providers.append(Provider("peft", step(layer), prepare, list(layer.parameters())))
    return providers


def _optimizer_step_of(layer):
    """A prepare hook changing the layer's adapter in place, as an optimizer step does (the values barely move)."""
    def step() -> None:
        with torch.no_grad():
            layer.lora_A.mul_(1.0)
            layer.lora_B.mul_(1.0)

    return step


def peft_linear(base: nn.Linear, r: int, lora_alpha: float, dropout: float = 0.0, use_dora: bool = False):
    """A PEFT LoRA layer around `base`, or None (with a note) when peft is missing or its constructor
    does not take these arguments: PEFT's Linear gained a required `config` in 0.14-era releases, and
    a provider that cannot be built must not cost the case its other providers."""
    if not have("peft"):
        return None
    from peft.tuners.lora import Linear as PeftLinear
    from peft.tuners.lora import LoraConfig

    attempts = (
        lambda: PeftLinear(base, "default", config=LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout,
                                                              target_modules=["base"], use_dora=use_dora),
                           r=r, lora_alpha=lora_alpha, lora_dropout=dropout, use_dora=use_dora),
        lambda: PeftLinear(base, "default", r=r, lora_alpha=lora_alpha, lora_dropout=dropout, use_dora=use_dora),
    )
    errors = []
    for attempt in attempts:
        try:
            return attempt()
        except TypeError as error:
            errors.append(str(error))
    print(f"peft provider skipped: its LoRA Linear took none of the known signatures ({'; '.join(errors)})",
          file=sys.stderr)
    return None


def _chain(*hooks):
    def run() -> None:
        for hook in hooks:
            hook()

    return run


def merge_providers(d_out, d_in, r, dtype, device, wanted) -> list[Provider]:
    """Providers merging one adapter into a [d_out, d_in] weight (prepare() unmerges, untimed)."""
    torch.manual_seed(0)
    factory = dict(device=device, dtype=dtype)
    lora_A = torch.randn(r, d_in, **factory) / math.sqrt(d_in)
    lora_B = torch.randn(d_out, r, **factory) * 0.01
    providers = []
    if "floor" in wanted:
        weight = torch.randn(d_out, d_in, **factory)
        providers.append(Provider("floor", lambda: weight.mul_(1.0)))
    if "gemm" in wanted:
        providers.append(Provider("gemm", lambda: torch.mm(lora_B, lora_A)))
    for name, safe in (("ours", False), ("ours-safe", True)):
        if name not in wanted:
            continue
        layer = LoRALinear(d_in, d_out, r=r, lora_alpha=2 * r, **factory)
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        providers.append(Provider(name, lambda layer=layer, safe=safe: layer.merge(safe=safe),
                                  _chain(_with_backend(None), layer.unmerge)))
    peft_layer = peft_linear(nn.Linear(d_in, d_out, **factory).requires_grad_(False), r, 2 * r) \
        if "peft" in wanted else None
    if peft_layer is not None:
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(lora_A)
            peft_layer.lora_B["default"].weight.copy_(lora_B)

        def peft_unmerge(layer=peft_layer):
            if layer.merged:
                layer.unmerge()

        providers.append(Provider("peft", peft_layer.merge, peft_unmerge))
    return providers
