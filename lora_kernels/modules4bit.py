"""LoRALinear4bit and MultiLoRALinear4bit: LoRALinear and MultiLoRALinear on a frozen 4-bit base weight (QLoRA),
served by the 4-bit kernels.

    layer = LoRALinear4bit.quantize(nn.Linear(4096, 4096), r=16)     # quantized here (no bitsandbytes needed)
    layer = LoRALinear.from_linear(bnb_linear4bit, r=16)              # a bitsandbytes Linear4bit, tensors shared
    layer.merge_and_unload()                                          # a 16-bit nn.Linear holding W0 + s·BA
    serving = MultiLoRALinear4bit.from_bnb(bnb_linear4bit, capacity=32, r_max=16)  # one 4-bit base, many adapters

The state dict is bitsandbytes' Linear4bit's (``weight`` the packed codes, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) plus ``lora_A`` / ``lora_B``: a transformers/PEFT
QLoRA checkpoint reads it, and it reads theirs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import validation
from .config import LoRAConfig
from .functional import lora_linear, lora_linear_multi, merge_
from .modules import LoRALinear, linear_holding
from .multi import MultiLoRALinear
from .weight4bit import Weight4bit, is_bnb_linear4bit

__all__ = ["LoRALinear4bit", "MultiLoRALinear4bit"]

_SCALES = ("absmax", "nested_absmax", "offset")


def _as_bytes(t: Tensor) -> Tensor:
    """A scale tensor's bytes (uint8, 1-D, shared): how the layer holds its scales."""
    return t.reshape(-1).view(torch.uint8)


class _Holds4bitWeight:
    """The frozen 4-bit base weight of a layer, held as bitsandbytes' Linear4bit holds it.

    The codes are the Parameter ``weight`` (uint8 [out·in/2, 1], frozen, as bitsandbytes stores them, so that .to()
    and optimizers see the layer as they see a Linear4bit). The scales are frozen Parameters too, ``weight_absmax``,
    ``weight_nested_absmax`` and ``weight_offset``, each held as its bytes (uint8, 1-D): FSDP2 shards and all-gathers
    them with the codes (4-bit data on the wire, each rank holding its shard of codes and scales), and no dtype
    cast (.half(), an FSDP2 mixed-precision param_dtype) can round them. The state dict carries bitsandbytes' keys
    (FSDP2's sharded state dict: these parameters, as DTensor shards). compute_dtype: the dtype the layer computes
    in (x is cast to it and the result back, as bitsandbytes' Linear4bit does); None: x's.
    """

    compute_dtype: torch.dtype | None

    def _set_weight4bit(self, weight: Weight4bit) -> None:
        if not isinstance(weight, Weight4bit):
            raise TypeError(f"weight must be a Weight4bit, got {type(weight).__name__}")
        self.weight = nn.Parameter(weight.codes.view(-1, 1), requires_grad=False)
        for name in _SCALES:
            value = getattr(weight, name)
            self.register_parameter(f"weight_{name}", None if value is None else
                                    nn.Parameter(_as_bytes(value), requires_grad=False))
        self.weight_format = (weight.shape, weight.blocksize, weight.quant_type, weight.dtype)
        self.__dict__["_code_table"] = weight.table.cpu()  # bitsandbytes', or a torchao weight's own
        self.__dict__["_weight4bit"] = (self._weight_sources(), weight)

    def _weight_sources(self) -> tuple:
        return tuple(self._parameters.get(name) for name in ("weight", *(f"weight_{n}" for n in _SCALES)))

    def base_weight(self) -> Weight4bit:
        """W0 as a Weight4bit over this layer's current tensors (rebuilt after .to(), a load, a merge, or FSDP2's
        swap of its parameters)."""
        cached = self.__dict__.get("_weight4bit")
        sources = self._weight_sources()
        if cached is None or any(a is not b for a, b in zip(cached[0], sources)):
            cached = (sources, self._weight4bit_now())
            self.__dict__["_weight4bit"] = cached
        return cached[1]

    def _weight4bit_now(self) -> Weight4bit:
        validation.check_not_distributed_tensor(weight=self.weight)  # FSDP2's shards outside forward
        shape, blocksize, quant_type, dtype = self.weight_format
        nested = self.weight_nested_absmax
        # tensors over the parameters' data, never the Parameters themselves: merge replaces a parameter's data, and
        # the weight kept for unmerge must keep the original scales
        absmax = self.weight_absmax.data if nested is not None else self.weight_absmax.view(torch.float32)
        return Weight4bit(self.weight.data.reshape(-1), absmax, shape, blocksize, quant_type, dtype,
                          None if nested is None else nested.view(torch.float32),
                          None if nested is None else self.weight_offset.view(torch.float32).reshape(()),
                          table=self.__dict__["_code_table"].to(self.weight.device))

    def _weight_changed(self) -> None:
        # built now, eagerly (a torch.compile'd call then reads attributes), except over FSDP2's shards
        sharded = validation.is_dtensor(self.weight)
        self.__dict__["_weight4bit"] = None if sharded else (self._weight_sources(), self._weight4bit_now())

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # codes and scales are uint8: dtype casts leave them, moves move them
        self._weight_changed()
        return self

    def _reset_base_parameters(self) -> None:
        raise RuntimeError("a 4-bit base weight is frozen; quantize a float layer instead (.quantize)")

    def _to_compute_dtype(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x in the compute dtype, the bias in x's new dtype)."""
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return x, bias

    def _base_only(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x W0ᵀ + b through the 4-bit kernels with a rank-1 zero adapter (no whole dequantized weight)."""
        w4 = self.base_weight()
        key = (x.device, x.dtype)
        zeros = self.__dict__.get("_zero_adapter")
        if zeros is None or zeros[0] != key:
            zeros = (key, (x.new_zeros(1, w4.in_features), x.new_zeros(w4.out_features, 1)))
            self.__dict__["_zero_adapter"] = zeros
        return lora_linear(x, w4, bias, *zeros[1], 0.0)

    def _replace_weight(self, weight: Weight4bit) -> None:
        self.__dict__["_code_table"] = weight.table.cpu()
        with torch.no_grad():
            self.weight.data = weight.codes.view(-1, 1)
            for name in _SCALES:
                value = getattr(weight, name)
                if value is not None:
                    getattr(self, f"weight_{name}").data = _as_bytes(value)
        self._weight_changed()

    def _dense_with(self, original: Weight4bit, lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype,
                    safe: bool = False, magnitude: Tensor | None = None) -> Tensor:
        """W0 + s·BA [out, in] in `dtype` (DoRA, a magnitude given: g ⊙ (W0 + s·BA), g = m / ‖W0 + s·BA‖ per row):
        W0 dequantized (exact in float64), the rest in float64, one rounding."""
        dense = original.dequantize(torch.float32).double()
        merge_(dense, lora_A.detach().double(), lora_B.detach().double(), scaling, safe=safe)
        if magnitude is not None:
            gain = magnitude.detach().double() / torch.linalg.vector_norm(dense, dim=1)
            if not bool(torch.isfinite(gain).all()):
                raise ValueError("DoRA's gain magnitude / ‖W0 + s·BA‖ is not finite in "
                                 f"{int((~torch.isfinite(gain)).sum())} rows (a row of W0 + s·BA is zero)")
            dense.mul_(gain[:, None])
        return dense.to(dtype)

    def _dense_layer(self, weight: Tensor) -> nn.Module:
        weight = nn.Parameter(weight, requires_grad=False)
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().to(weight.dtype),
                                                           self.bias.requires_grad)
        return linear_holding(weight, bias)

    def _bnb_layer(self, w4: Weight4bit) -> nn.Module:
        """A bitsandbytes Linear4bit holding w4's codes and scales (shared) and this layer's bias."""
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(w4.in_features, w4.out_features, bias=self.bias is not None,
                                  compute_dtype=self.compute_dtype, compress_statistics=w4.double_quant,
                                  quant_type=w4.quant_type, device="meta")
        layer.weight = w4.to_bnb()
        layer.bias = self.bias
        return layer

    # -- state dict: bitsandbytes' keys ---------------------------------------------------------------------
    def _saved_weight(self) -> Weight4bit:
        """The weight the state dict holds (LoRALinear4bit: the original one while an adapter is merged)."""
        return self.base_weight()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """nn.Module's entries, with bitsandbytes' keys of the weight in place of the scale parameters (kept as
        they are, DTensor shards, when FSDP2 holds the layer sharded)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if validation.is_dtensor(self.weight):
            return
        for name in _SCALES:
            destination.pop(prefix + f"weight_{name}", None)
        for key, value in self._saved_weight().state_dict_entries(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """bitsandbytes' keys of the weight turned into this layer's scale parameters for nn.Module to load (a
        loaded weight of another format is an error, nothing loaded); a state dict holding the scale parameters
        themselves (FSDP2's) is loaded as it is."""
        quantized = [k for k in state_dict if k.startswith(prefix + "weight.")]
        table = None
        if quantized:
            loaded = Weight4bit.from_state_dict(state_dict, prefix + "weight")
            if (loaded.shape, loaded.blocksize, loaded.quant_type) != self.weight_format[:3] or \
                    loaded.double_quant != (self.weight_nested_absmax is not None):
                error_msgs.append(f"{prefix}weight: a {loaded} cannot be loaded into a layer holding "
                                  f"{self.weight_format[2]} {self.weight_format[0]} blocksize {self.weight_format[1]}"
                                  + (" double quantized" if self.weight_nested_absmax is not None else ""))
                return
            state_dict = {k: v for k, v in state_dict.items() if k not in quantized}
            for name in _SCALES:
                value = getattr(loaded, name)
                if value is not None:
                    state_dict[prefix + f"weight_{name}"] = _as_bytes(value)
            table = loaded.table.cpu()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if table is not None:
            self.__dict__["_code_table"] = table
        self._weight_changed()

    def extra_repr(self) -> str:
        shape, blocksize, quant_type, dtype = self.weight_format
        return (super().extra_repr() + f", base={quant_type} blocksize={blocksize}"
                + (", double_quant" if self.weight_nested_absmax is not None else "")
                + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype else ""))


class LoRALinear4bit(_Holds4bitWeight, LoRALinear):
    """y = x W0ᵀ + b + scaling · B A dropout(x) with W0 a frozen Weight4bit (bitsandbytes' NF4/FP4 layout); with
    use_dora=True, DoRA on it (QDoRA: lora_kernels.dora_linear on the Weight4bit, the magnitude trained, W0 never
    dequantized whole).

    The weight is held as _Holds4bitWeight describes (codes as the Parameter ``weight``, float32 scales,
    bitsandbytes' state-dict keys, compute_dtype). Merging into the 4-bit weight requantizes it, so it is only done
    when asked (merge(requantize=True), which records the error it introduces and keeps the original codes for an
    exact unmerge); merge_and_unload() gives a 16-bit nn.Linear instead (W0 dequantized, s·BA added in float64, one
    rounding): how QLoRA adapters ship.
    """

    def __init__(self, weight: Weight4bit, bias: Tensor | None = None, config: LoRAConfig | None = None, *,
                 adapter_dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None, **options):
        nn.Module.__init__(self)
        config = LoRAConfig.of(config, options)
        if config.fan_in_fan_out:
            raise ValueError("fan_in_fan_out does not apply to a 4-bit weight (it is stored [out, in])")
        self.compute_dtype = compute_dtype
        self._set_weight4bit(weight)
        self._setup(weight.in_features, weight.out_features, self.weight, _as_parameter(bias), config,
                    adapter_dtype or compute_dtype or weight.dtype)
        self.base_layer_type = nn.Linear
        self._unmerged = None
        self.merge_error = None
        self.reset_lora_parameters()

    # -- making one -----------------------------------------------------------------------------------------
    @classmethod
    def quantize(cls, linear: nn.Linear, config: LoRAConfig | None = None, *, blocksize: int = 64,
                 quant_type: str = "nf4", double_quant: bool = True, adapter_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = None, **options) -> "LoRALinear4bit":
        """Quantize an nn.Linear's weight (bitsandbytes' bytes, Weight4bit.quantize) and wrap it; its bias is
        shared."""
        weight = _quantized_weight(linear, blocksize, quant_type, double_quant)
        return cls(weight, linear.bias, config, adapter_dtype=adapter_dtype, compute_dtype=compute_dtype, **options)

    @classmethod
    def from_bnb(cls, linear: nn.Module, config: LoRAConfig | None = None, *,
                 adapter_dtype: torch.dtype | None = None, **options) -> "LoRALinear4bit":
        """Wrap a bitsandbytes Linear4bit (quantized: moved to a device), sharing its codes, scales and bias; its
        compute_dtype is kept."""
        weight = Weight4bit.from_bnb(linear.weight)
        compute_dtype = getattr(linear, "compute_dtype", None)
        layer = cls(weight, linear.bias, config, adapter_dtype=adapter_dtype or compute_dtype or weight.dtype,
                    compute_dtype=compute_dtype, **options)
        layer.base_layer_type = type(linear)
        return layer

    @LoRALinear.scaling.setter
    def scaling(self, value: float) -> None:
        if self.__dict__.get("merged"):
            raise RuntimeError("unmerge() before changing the scaling of a layer merged into its 4-bit weight")
        LoRALinear.scaling.fset(self, value)

    def switch_adapter(self, lora_A: Tensor, lora_B: Tensor, lora_alpha: float | None = None,
                       safe: bool = False) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before switching the adapter of a layer merged into its 4-bit weight")
        super().switch_adapter(lora_A, lora_B, lora_alpha, safe)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x, bias = self._to_compute_dtype(x)
        if self.merged or self.adapter_disabled:
            y = self._base_only(x, bias)
        elif self.use_dora:
            y = self._dora_forward(x, self.base_weight(), bias)
        else:
            y = lora_linear(x, self.base_weight(), bias, self.lora_A, self.lora_B, self._scaling_for(x),
                            self.lora_dropout, self.training)
        return y if y.dtype == dtype else y.to(dtype)

    # -- merging --------------------------------------------------------------------------------------------
    def merge(self, safe: bool = False, requantize: bool = False) -> None:
        """Fold scaling · B A (DoRA: W ← g ⊙ (W0 + s·BA)) into the 4-bit weight: only with requantize=True (the
        merged weight is quantized again; merge_error then holds the largest |requantized − (W0 + s·BA)|, and
        unmerge() restores the original codes exactly). For a merged 16-bit model use merge_and_unload()."""
        if self.merged:
            return
        if not requantize:
            raise RuntimeError("merging into a 4-bit weight requantizes it (an error of up to half a 4-bit step "
                               "per element): call merge(requantize=True) to accept it, or merge_and_unload() "
                               "for a 16-bit layer holding W0 + s·BA exactly")
        original = self.base_weight()
        exact = self._merged_dense(torch.float32, safe)
        merged = Weight4bit.quantize(exact, original.blocksize, original.quant_type, original.double_quant)
        self.merge_error = float((merged.dequantize(torch.float32) - exact).abs().max()) if exact.numel() else 0.0
        self._unmerged = original
        self._replace_weight(merged.to(dtype=original.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Put the original codes and scales back (bit for bit)."""
        if self.merged:
            self._replace_weight(self._unmerged)
            self._unmerged, self.merged, self.merge_error = None, False, None

    def _merged_dense(self, dtype: torch.dtype, safe: bool = False) -> Tensor:
        """W0 + s·BA [out, in] in `dtype`, W0 the original weight when the layer is merged."""
        original = self._unmerged if self.merged else self.base_weight()
        return self._dense_with(original, self.lora_A, self.lora_B, self.scaling, dtype, safe,
                                self.lora_magnitude if self.use_dora else None)

    def merged_adapter_tensors(self):
        return None  # the state dict writes the original codes itself (_save_to_state_dict)

    def _merge_token(self):
        return None

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """An nn.Linear in `dtype` (default: the 4-bit weight's dtype) holding W0 + s·BA (DoRA: g ⊙ (W0 + s·BA)),
        rounded once."""
        return self._dense_layer(self._merged_dense(dtype or self.weight_format[3]))

    def unload(self) -> nn.Module:
        """The base layer without the adapter: a bitsandbytes Linear4bit holding the original codes (shared)."""
        self.unmerge()
        return self._bnb_layer(self.base_weight())

    # -- state dict -----------------------------------------------------------------------------------------
    def _saved_weight(self) -> Weight4bit:
        return self._unmerged if self.merged else self.base_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged = self.merged
        if merged and any(k.startswith(prefix + "weight.") for k in state_dict):
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if merged and not self.merged:
            self.merge(requantize=True)  # the loaded adapter into the loaded weight (or, the load refused, again)


def _as_parameter(bias: Tensor | None) -> nn.Parameter | None:
    if bias is not None and not isinstance(bias, nn.Parameter):
        bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return bias


def _quantized_weight(linear: nn.Module, blocksize: int, quant_type: str, double_quant: bool) -> Weight4bit:
    if not isinstance(linear, nn.Linear) or is_bnb_linear4bit(linear):
        raise TypeError(f"linear must be a float nn.Linear, got {type(linear).__name__}")
    return Weight4bit.quantize(linear.weight.detach(), blocksize, quant_type, double_quant)


class MultiLoRALinear4bit(_Holds4bitWeight, MultiLoRALinear):
    """MultiLoRALinear on a frozen 4-bit base: one quantized W0 serving many adapters, each row of a batch on its
    own (the serving case of QLoRA adapters), through lora_linear_multi's 4-bit kernels.

    The weight is held as _Holds4bitWeight describes; adapters, slots and the model-level functions are
    MultiLoRALinear's. An adapter is not merged into the 4-bit weight (that would requantize the base every
    other adapter shares): merge_and_unload(name) gives a 16-bit nn.Linear holding W0 + s·BA of one adapter.
    """

    def __init__(self, weight: Weight4bit, bias: Tensor | None = None, capacity: int = 8, r_max: int = 16,
                 lora_dropout: float = 0.0, *, adapter_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.compute_dtype = compute_dtype
        self._set_weight4bit(weight)
        self._setup(weight.in_features, weight.out_features, self.weight, _as_parameter(bias), capacity, r_max,
                    lora_dropout, adapter_dtype or compute_dtype or weight.dtype)

    @classmethod
    def quantize(cls, linear: nn.Linear, capacity: int = 8, r_max: int = 16, lora_dropout: float = 0.0, *,
                 blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                 adapter_dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = None) -> "MultiLoRALinear4bit":
        """Quantize an nn.Linear's weight (bitsandbytes' bytes) and wrap it; its bias is shared."""
        weight = _quantized_weight(linear, blocksize, quant_type, double_quant)
        return cls(weight, linear.bias, capacity, r_max, lora_dropout, adapter_dtype=adapter_dtype,
                   compute_dtype=compute_dtype)

    @classmethod
    def from_bnb(cls, linear: nn.Module, capacity: int = 8, r_max: int = 16, lora_dropout: float = 0.0, *,
                 adapter_dtype: torch.dtype | None = None) -> "MultiLoRALinear4bit":
        """Wrap a bitsandbytes Linear4bit, sharing its codes, scales and bias; its compute_dtype is kept."""
        weight = Weight4bit.from_bnb(linear.weight)
        compute_dtype = getattr(linear, "compute_dtype", None)
        return cls(weight, linear.bias, capacity, r_max, lora_dropout,
                   adapter_dtype=adapter_dtype or compute_dtype or weight.dtype, compute_dtype=compute_dtype)

    def _forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        dtype = x.dtype
        x, bias = self._to_compute_dtype(x)
        if adapter_ids is None:
            y = self._base_only(x, bias)
        else:
            y = lora_linear_multi(x, self.base_weight(), bias, self.lora_A, self.lora_B, self.scalings, adapter_ids,
                                  self.ranks, self.dropouts, self.training)
        return y if y.dtype == dtype else y.to(dtype)

    def merge(self, name: str | None = None, safe: bool = False) -> None:
        raise RuntimeError("an adapter is not merged into a shared 4-bit base (it would requantize the weight every "
                           "adapter uses): merge_and_unload(name) gives a 16-bit layer holding W0 + s·BA")

    def merge_and_unload(self, name: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """An nn.Linear in `dtype` (default: the 4-bit weight's dtype) holding W0 + s·BA of adapter `name`
        (default: the active one; none: the dequantized base), rounded once. This layer is left as it was."""
        name = self.active_adapter if name is None else name
        dtype = dtype or self.weight_format[3]
        if name is None:
            return self._dense_layer(self.base_weight().dequantize(dtype))
        return self._dense_layer(self._dense_with(self.base_weight(), *self._adapter_tensors(name), dtype))

    def unload(self) -> nn.Module:
        """The base layer without adapters: a bitsandbytes Linear4bit holding the codes (shared)."""
        return self._bnb_layer(self.base_weight())

