"""LoRALinear: a drop-in LoRA linear layer on top of the fused ops."""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoRAConfig
from .dora import DoRAMerge, DoRANormCache, cached_dora_linear, dora_merge_, dora_unmerge_
from .functional import dora_weight_norm, lora_linear, merge_, switch_, unmerge_
from .validation import check_adapter, check_scaling

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """y = x W0ᵀ + b + scaling · B A dropout(x), with W0 frozen and A, B trained.

    Parameters and state-dict keys follow loralib: ``weight`` [out, in] (frozen;
    [in, out] when fan_in_fan_out, as in GPT-2's Conv1D), ``bias`` [out],
    ``lora_A`` [r, in], ``lora_B`` [out, r]. Initialised as loralib and PEFT do:
    A kaiming-uniform(a=√5), B zeros, so a new layer equals its base layer.
    ``scaling`` is lora_alpha / r, or lora_alpha / √r with use_rslora.

    Merging: ``merge()`` folds scaling · B A into the weight in place (forward
    becomes the plain base GEMM), ``unmerge()`` takes it out again. With
    ``merge_weights=True`` the layer does this itself as loralib does: merged in
    eval(), unmerged in train(). ``state_dict()`` always holds the unmerged W0,
    and loading into a merged layer re-merges the loaded adapter, so a state dict
    never carries the adapter twice.

    adapter_dtype: the dtype of lora_A and lora_B (default: the weight's); float32
    on a float16/bfloat16 weight is PEFT's default and computes the LoRA branch
    from float32 adapters (see lora_kernels.reference.lora_linear).

    use_dora=True: DoRA (PEFT's use_dora), y = g ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b with g = m / ‖W0 + s·BA‖ per
    output row (lora_kernels.dora_linear; dropout as PEFT applies it). ``lora_magnitude`` [out] (adapter dtype,
    trained) starts as ‖W0 + s·BA‖, so a new layer equals its base layer. The norm is cached while W0, A, B and
    the scaling are unchanged (eval, and training between optimizer steps; ‖W0‖² while W0 is), tracked by their
    version counters: a write through ``.data`` is not seen; call ``clear_dora_cache()`` after one. merge() folds
    g ⊙ (W0 + s·BA) into the weight. ``dora_norm_gradient = True`` also differentiates the norm (DoRA and PEFT
    detach it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
        merge_weights: bool = False,
        device=None,
        dtype=None,
        adapter_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ):
        super().__init__()
        config = LoRAConfig(r, lora_alpha, lora_dropout, use_rslora, fan_in_fan_out, merge_weights, use_dora)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        bias_param = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._setup(in_features, out_features, weight, bias_param, config, adapter_dtype)
        self._reset_base_parameters()
        self.reset_lora_parameters()

    def _setup(self, in_features, out_features, weight, bias, config: LoRAConfig, adapter_dtype=None) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.lora_dropout = config.r, config.lora_alpha, float(config.lora_dropout)
        self.fan_in_fan_out, self.use_rslora = config.fan_in_fan_out, config.use_rslora
        self.merge_weights = config.merge_weights
        self.weight = weight
        self.bias = bias
        self.scaling = config.scaling
        factory = {"device": weight.device, "dtype": adapter_dtype or weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r, **factory))
        self.use_dora = config.use_dora
        self.dora_norm_gradient = False  # True: the gradient through ‖W0 + s·BA‖ too (dora_linear(norm_gradient=))
        if config.use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(out_features, **factory))
        self._dora_merged: DoRAMerge | None = None
        self.clear_dora_cache()
        self.merged = False
        self.adapter_disabled = False
        self.base_layer_type = nn.Linear  # what merge_and_unload() / unload() give back
        register_merge_hooks(self)

    @property
    def config(self) -> LoRAConfig:
        """This layer's options as a LoRAConfig."""
        return LoRAConfig(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.fan_in_fan_out,
                          self.merge_weights, self.use_dora)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: LoRAConfig | None = None, *,
                    adapter_dtype: torch.dtype | None = None, **options) -> "LoRALinear":
        """Wrap an existing linear layer, sharing (not copying) its weight and bias.

        config, or LoRAConfig's options as keywords (r, lora_alpha, lora_dropout,
        use_rslora, fan_in_fan_out, merge_weights). The weight is frozen
        (requires_grad=False). A transformers Conv1D (GPT-2), whose weight is
        [in, out], is read with fan_in_fan_out=True whatever the option says, and
        an nn.Linear with fan_in_fan_out=False: the option only matters for other
        modules. merge_and_unload() gives back the wrapped module's class. A bitsandbytes Linear4bit gives a
        LoRALinear4bit (lora_kernels.modules4bit) on its 4-bit weight.
        """
        from .modules4bit import LoRALinear4bit, is_bnb_linear4bit

        if is_bnb_linear4bit(linear):  # a 4-bit base (QLoRA): its own layer class, the codes shared
            return LoRALinear4bit.from_bnb(linear, config, adapter_dtype=adapter_dtype, **options)
        config = LoRAConfig.of(config, options)
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"linear must have a 2-D weight Parameter, got {type(linear).__name__}")
        if is_conv1d(linear) or isinstance(linear, nn.Linear):
            config = config.replace(fan_in_fan_out=is_conv1d(linear))
        in_features, out_features = weight.shape if config.fan_in_fan_out else weight.shape[::-1]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        weight.requires_grad_(False)
        layer._setup(in_features, out_features, weight, getattr(linear, "bias", None), config, adapter_dtype)
        if is_conv1d(linear):
            layer.base_layer_type = type(linear)
        layer.reset_lora_parameters()
        return layer

    def _reset_base_parameters(self) -> None:
        # nn.Linear's initialisation (for layers built from scratch).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=√5), B = 0 (loralib / PEFT); DoRA's magnitude = ‖W0 + s·BA‖ = ‖W0‖ per row."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.reset_dora_magnitude()

    @torch.no_grad()
    def reset_dora_magnitude(self) -> None:
        """magnitude = ‖W0 + s·BA‖ per row (PEFT's initialisation): the layer then computes what plain LoRA does."""
        if self.merged:
            raise RuntimeError("reset_dora_magnitude on a merged layer: unmerge() first")
        norm = dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)
        self.lora_magnitude.copy_(norm.to(self.lora_magnitude.dtype))

    def clear_dora_cache(self) -> None:
        """Forget the cached norms (needed only after writing a tensor through .data)."""
        self.__dict__["_dora_norms"] = DoRANormCache()

    @property
    def scaling(self) -> float:
        """lora_alpha / r (lora_alpha / √r with rsLoRA); assignable."""
        return self._scaling

    def __setattr__(self, name, value):
        # nn.Module files an nn.Parameter away before the property setter could refuse it (and then fails with
        # "attribute 'scaling' already exists"): say what is wrong instead. A learnable scaling is not supported.
        if name == "scaling" and isinstance(value, nn.Parameter):
            raise ValueError("scaling must be a number, not an nn.Parameter: no gradient is computed for a scaling "
                             "(a learnable one would silently stay constant)")
        super().__setattr__(name, value)

    @scaling.setter
    def scaling(self, value: float) -> None:
        # Checked here, on the host: on a GPU the kernels read the tensor below, and nothing else looks at it.
        value = check_scaling("scaling", value)
        if self.__dict__.get("merged") and value != self._scaling and self.use_dora:
            self.unmerge()  # g depends on s: out with the old merge, in with a new one
            self._store_scaling(value)
            self.merge()
            return
        if self.__dict__.get("merged") and value != self._scaling:
            # the weight holds s·BA with the old s: out with the old, in with the new, one rounding (switch_)
            switch_(self.base_weight(), self.lora_A, self.lora_B, self._scaling, self.lora_A, self.lora_B, value)
        self._store_scaling(value)

    def _store_scaling(self, value: float) -> None:
        """Keep a checked scaling (the weight is not touched: merge state is the caller's business)."""
        self._scaling = value
        # The same value as a 0-d float64 tensor, updated in place, which the op gets under
        # torch.compile (a graph input rather than a constant, so a new alpha does not recompile)
        # and on a GPU (see _scaling_for). On a CUDA weight it lives on the weight's device and the
        # kernels read it there: a replayed CUDA graph uses the current scaling, and no CPU tensor
        # keeps torch.compile(mode="reduce-overhead") from using CUDA graphs. A plain attribute,
        # not a buffer (state dicts stay PEFT's); _apply keeps it on the weight's device.
        if "_scaling_tensor" in self.__dict__:
            self._scaling_tensor.fill_(self._scaling)
        else:
            self.__dict__["_scaling_tensor"] = torch.tensor(self._scaling, dtype=torch.float64, device="cpu")
            self._keep_scaling_with_weight()

    def _keep_scaling_with_weight(self) -> None:
        device = self.weight.device
        device = device if device.type == "cuda" else torch.device("cpu")
        if self._scaling_tensor.device != device:
            self.__dict__["_scaling_tensor"] = torch.tensor(self._scaling, dtype=torch.float64, device=device)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), .to_empty(): the scaling follows the weight
        self._keep_scaling_with_weight()
        return self

    def base_weight(self) -> Tensor:
        """W0 (possibly merged) as [out, in]: a view, never a copy."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.adapter_disabled:
            return F.linear(x, self.base_weight(), self.bias)
        if self.use_dora:
            return self._dora_forward(x, self.base_weight(), self.bias)
        return lora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self._scaling_for(x),
                           self.lora_dropout, self.training)

    def _dora_forward(self, x: Tensor, weight, bias: Tensor | None) -> Tensor:
        """dora_linear on W0 (a tensor or a Weight4bit) with the cached norm and gain (DoRANormCache)."""
        return cached_dora_linear(self._dora_norms, x, weight, bias, self.lora_A, self.lora_B, self.lora_magnitude,
                                  self._scaling, self.lora_dropout, self.training, self.dora_norm_gradient,
                                  self._scaling_for(x))

    def _scaling_for(self, x: Tensor):
        """The scaling as the op gets it. On a GPU always the 0-d tensor on x's device, eager calls too: the
        kernels that run eagerly (a capture's warm-up) are then the ones a CUDA graph records, and they read
        the scaling at run time. On the CPU a float (cheapest), or the CPU tensor under torch.compile."""
        if not x.is_cuda:
            return self._scaling_tensor if torch.compiler.is_compiling() else self._scaling
        if self._scaling_tensor.device != x.device and not torch.compiler.is_compiling():
            self._keep_scaling_with_weight()  # weights moved in without .to() (a loader assigning parameters)
        return self._scaling_tensor

    # -- merging ------------------------------------------------------------

    def merge(self, safe: bool = False) -> None:
        """Fold scaling · B A (DoRA: W ← g ⊙ (W0 + s·BA)) into the weight in place; forward then costs one plain
        GEMM."""
        if not self.merged:
            if self.use_dora:
                self._dora_merged = dora_merge_(self.base_weight(), self.lora_A, self.lora_B, self.lora_magnitude,
                                                self.scaling, safe=safe)
            else:
                merge_(self.base_weight(), self.lora_A, self.lora_B, self.scaling, safe=safe)
            self.merged = True

    def unmerge(self) -> None:
        """Take scaling · B A (DoRA: the gain and s·BA) out of the weight again."""
        if self.merged:
            if self.use_dora:
                dora_unmerge_(self.base_weight(), self.lora_A, self.lora_B, self.scaling, self._dora_merged)
                self._dora_merged = None
            else:
                unmerge_(self.base_weight(), self.lora_A, self.lora_B, self.scaling)
            self.merged = False

    # what the state-dict hooks (register_merge_hooks) ask of a layer
    def merged_adapter_tensors(self):
        if not self.merged:
            return None
        if self.use_dora:
            return self.lora_A, self.lora_B, self.scaling, self._dora_merged
        return self.lora_A, self.lora_B, self.scaling

    def _merge_token(self):
        return True if self.merged else None

    def _forget_merge(self) -> None:
        self.merged = False
        self._dora_merged = None

    def _merge_again(self, token) -> None:
        self.merge()

    @torch.no_grad()
    def switch_adapter(self, lora_A: Tensor, lora_B: Tensor, lora_alpha: float | None = None,
                       safe: bool = False) -> None:
        """Load another adapter (its rank may differ); if merged, swap it in the weight in one pass.

        Same rank: the values are copied into the existing lora_A / lora_B Parameters, so
        an optimizer built before keeps training them. Another rank: they are replaced by
        new Parameters (a UserWarning says so: optimizers must be rebuilt).
        """
        if self.use_dora:
            raise ValueError("switch_adapter does not apply to a DoRA layer (use_dora=True): an adapter there is "
                             "lora_A, lora_B and lora_magnitude; load it with load_state_dict")
        lora_alpha = self.lora_alpha if lora_alpha is None else lora_alpha
        r = lora_A.shape[0] if lora_A.dim() == 2 else 0
        if r < 1:
            raise ValueError(f"lora_A must be [r >= 1, {self.in_features}], got {tuple(lora_A.shape)}")
        scaling = self.config.replace(r=r, lora_alpha=lora_alpha).scaling
        new_A = lora_A.to(self.lora_A.dtype)
        new_B = lora_B.to(self.lora_B.dtype)
        if self.merged:
            switch_(self.base_weight(), self.lora_A, self.lora_B, self.scaling, new_A, new_B, scaling, safe=safe)
        else:
            check_adapter(self.base_weight(), new_A, new_B)
        if new_A.shape == self.lora_A.shape:
            self.lora_A.copy_(new_A)
            self.lora_B.copy_(new_B)
        else:
            warnings.warn(f"switch_adapter: the rank changed ({self.r} -> {r}), so lora_A and lora_B are new "
                          "Parameters; an optimizer built before still holds the old ones", stacklevel=3)
            self.lora_A = nn.Parameter(new_A.clone(), requires_grad=self.lora_A.requires_grad)
            self.lora_B = nn.Parameter(new_B.clone(), requires_grad=self.lora_B.requires_grad)
        self.r, self.lora_alpha = r, lora_alpha
        self._store_scaling(check_scaling("scaling", scaling))  # a merged weight has it already (switch_ above)

    def merge_and_unload(self) -> nn.Module:
        """The base layer holding W0 + scaling · B A: this layer's weight, merged in place and shared.

        An nn.Linear (the weight copied only for fan_in_fan_out on a non-Conv1D layer,
        to turn [in, out] into [out, in]), or the transformers Conv1D it wrapped.
        """
        self.merge()
        return self._base_layer()

    def unload(self) -> nn.Module:
        """The base layer with the adapter taken out (unmerged first if merged): W0 as it was wrapped."""
        self.unmerge()
        return self._base_layer()

    def _base_layer(self) -> nn.Module:
        if self.base_layer_type is not nn.Linear:  # transformers' Conv1D: [in, out] weight, kept as is
            layer = self.base_layer_type.__new__(self.base_layer_type)
            nn.Module.__init__(layer)
            layer.nf, layer.nx = self.out_features, self.in_features
            layer.weight, layer.bias = self.weight, self.bias
            return layer
        weight = nn.Parameter(self.base_weight().contiguous(), requires_grad=False) if self.fan_in_fan_out else self.weight
        return linear_holding(weight, self.bias)

    def train(self, mode: bool = True) -> "LoRALinear":
        super().train(mode)
        if self.merge_weights:
            if mode:
                self.unmerge()
            else:
                self.merge()
        return self

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}")
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "merge_weights", "merged", "adapter_disabled"):
            if getattr(self, flag):
                text += f", {flag}=True"
        return text


def linear_holding(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear whose weight [out, in] and bias are these Parameters (shared, not copied)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


def is_conv1d(module: nn.Module) -> bool:
    """Whether module is transformers' Conv1D (GPT-2 & co.: a linear layer with an [in, out] weight).
    Checked without importing transformers: no Conv1D can exist before it is imported."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


# A merged layer's state dict holds W0, not W0 + s·BA: a state dict must mean the same thing whatever the layer's
# state when it was taken, or loading it into a fresh model (and, with merge_weights, calling eval()) would count
# the adapter twice. The hooks serve LoRALinear and MultiLoRALinear through four methods both define:
# merged_adapter_tensors() -> (A, B, s) of the adapter in the weight or None, _merge_token() -> what to merge again
# (None when unmerged), _forget_merge() (the weight is about to be replaced by a W0) and _merge_again(token).

def register_merge_hooks(module: nn.Module) -> None:
    module._register_state_dict_hook(_unmerged_weight_in_state_dict)
    module._register_load_state_dict_pre_hook(_take_adapter_out_before_load, with_module=True)
    module.register_load_state_dict_post_hook(_merge_again_after_load)


def _unmerged_weight_in_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    key = prefix + "weight"
    merged = module.merged_adapter_tensors()
    if merged is not None and key in state:
        weight = state[key].detach().clone()
        target = weight.t() if getattr(module, "fan_in_fan_out", False) else weight
        if isinstance(merged[-1], DoRAMerge):
            dora_unmerge_(target, *merged)
        else:
            unmerge_(target, *merged)
        state[key] = weight


def _take_adapter_out_before_load(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Loading into a merged layer: take the adapter out first (or let the loaded W0 replace the merged
    weight), then _merge_again_after_load merges the adapter the layer holds after the load. A tensor of
    another shape than the layer's is refused here, before anything of the layer changes (PyTorch would skip
    it and load the rest, and the merge would then be taken out of, or put into, the wrong weight)."""
    module._merge_after_load = None
    token = module._merge_token()
    if token is None:
        return
    for name in ("weight", "bias", "lora_A", "lora_B", "lora_magnitude"):
        mine = getattr(module, name, None)
        theirs = state.get(prefix + name)
        if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and theirs.shape != mine.shape:
            raise RuntimeError(f"load_state_dict into a merged layer: {prefix + name} has shape "
                               f"{tuple(theirs.shape)}, the layer's is {tuple(mine.shape)}; nothing of this layer "
                               "was changed")
    if any(prefix + name in state for name in ("weight", "lora_A", "lora_B", "lora_magnitude", "_extra_state")):
        if prefix + "weight" in state:
            module._forget_merge()
        else:
            module.unmerge()
        module._merge_after_load = token


def _merge_again_after_load(module: nn.Module, incompatible_keys) -> None:
    token = module.__dict__.pop("_merge_after_load", None)
    if token is not None:
        module._merge_again(token)
