"""MultiLoRALinear: a linear layer holding several named adapters, each row of a batch on its own adapter.

    layer = MultiLoRALinear.from_linear(nn.Linear(1024, 1024), capacity=32, r_max=16)
    layer.add_adapter("sql", r=8, lora_alpha=16)
    layer.add_adapter("chat", r=16, lora_alpha=16, use_rslora=True)
    y = layer(x, adapter_names=["sql", "chat", None, ...])   # one name per row (or per sequence); None: base only

A separate class from LoRALinear (whose one adapter keeps loralib's state-dict keys and the
zero-cost merged path): here the adapters live in preallocated stacks, lora_A [capacity, r_max, in]
and lora_B [capacity, out, r_max], with per-slot scalings and ranks as buffers, so adding, removing
or swapping adapters changes values, never shapes, and a compiled model does not recompile. An
adapter of rank r < r_max uses the first r ranks of its slot; the op computes only those. Training
works as for LoRALinear; the gradients of adapters absent from a batch are zero (an optimizer with
weight decay or momentum still moves them: give each adapter its own optimizer, or mask, if that
matters).

Model level: inject_multi_lora(model, targets, capacity, r_max), add_adapter / remove_adapter /
set_adapter(model, ...) on every layer at once (same slot everywhere), and `with adapter_batch(model,
names): model(x)` for a mixed batch through a whole model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoRAConfig
from .functional import lora_linear_multi, merge_, unmerge_
from .model_setup import mark_only_lora_as_trainable, replace_module, target_names
from .modules import is_conv1d, linear_holding, register_merge_hooks
from .weight4bit import is_bnb_linear4bit

__all__ = ["MultiLoRALinear", "inject_multi_lora", "add_adapter", "remove_adapter", "set_adapter", "adapter_batch",
           "multi_lora_layers"]

NO_ADAPTER = -1


class MultiLoRALinear(nn.Module):
    """y[m] = x[m] W0ᵀ + b + s_a · B_a A_a drop(x[m]) with a the adapter of row m (none: the base layer).

    Parameters: weight [out, in] (frozen), bias [out], lora_A [capacity, r_max, in], lora_B [capacity,
    out, r_max]; buffers scalings [capacity] (float64), ranks [capacity] (int64). Each adapter has its
    own rank, alpha, rsLoRA flag and dropout (lora_dropout: the default for new adapters). Adapters are named;
    `set_adapter(name)` picks the one used when a call names none. `merge(name)` folds one adapter
    into the weight for a batch served by that adapter alone.
    """

    def __init__(self, in_features: int, out_features: int, capacity: int = 8, r_max: int = 16,
                 lora_dropout: float = 0.0, bias: bool = True, device=None, dtype=None,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(in_features, out_features, linear.weight, linear.bias, capacity, r_max, lora_dropout,
                    adapter_dtype or linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, capacity: int = 8, r_max: int = 16, lora_dropout: float = 0.0,
                    adapter_dtype: torch.dtype | None = None) -> "MultiLoRALinear":
        """Wrap an nn.Linear, sharing (not copying) its weight and bias; the weight is frozen."""
        if not isinstance(linear, nn.Linear) or is_conv1d(linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if is_bnb_linear4bit(linear):
            raise TypeError("linear is a bitsandbytes Linear4bit: MultiLoRALinear4bit.from_bnb wraps it")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.in_features, linear.out_features, linear.weight, linear.bias, capacity, r_max,
                     lora_dropout, adapter_dtype or linear.weight.dtype)
        return layer

    def _setup(self, in_features, out_features, weight, bias, capacity, r_max, lora_dropout, adapter_dtype) -> None:
        for name, value in (("capacity", capacity), ("r_max", r_max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        LoRAConfig(r=r_max, lora_dropout=lora_dropout)  # checks lora_dropout
        self.out_features, self.in_features = out_features, in_features
        self.capacity, self.r_max, self.lora_dropout = capacity, r_max, float(lora_dropout)
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.zeros(capacity, r_max, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(capacity, self.out_features, r_max, **factory))
        self.register_buffer("scalings", torch.zeros(capacity, dtype=torch.float64))
        self.register_buffer("ranks", torch.ones(capacity, dtype=torch.int64))
        # each slot's dropout probability: a CPU tensor (not a buffer: .to(device) leaves it here), read by
        # the kernels on the host, updated in place so that torch.compile sees the same input
        self.__dict__["dropouts"] = torch.zeros(capacity, dtype=torch.float64)
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.alphas: dict[str, tuple[float, bool, float]] = {}  # name -> (lora_alpha, use_rslora, lora_dropout)
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.adapter_disabled = False
        self.batch_ids: Tensor | None = None  # set by adapter_batch() for the calls inside it
        register_merge_hooks(self)  # a merged adapter is never saved inside the weight

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype), .half(), .bfloat16() cast every floating buffer: the scalings keep float64, as LoRALinear's
        # float does (16/3 in bfloat16 is 5.34375; 1e5 in float16 is inf). They follow the device.
        scalings = self.scalings
        super()._apply(fn, *args, **kwargs)
        if self.scalings.dtype != torch.float64:
            source = scalings if scalings.device.type != "meta" else self.scalings
            self.scalings = source.to(device=self.scalings.device, dtype=torch.float64)
        return self

    # -- adapters -----------------------------------------------------------

    @torch.no_grad()
    def add_adapter(self, name: str, r: int, lora_alpha: float | None = None, use_rslora: bool = False,
                    lora_A: Tensor | None = None, lora_B: Tensor | None = None, slot: int | None = None,
                    lora_dropout: float | None = None) -> int:
        """Put adapter `name` (rank r <= r_max) into a free slot (or `slot`) and return the slot.

        Without lora_A [r, in] / lora_B [out, r] it is initialised as LoRALinear does (A kaiming-uniform,
        B zeros: the base layer's output). lora_dropout: this adapter's (default: the layer's). The
        first adapter added becomes the active one.
        """
        config, slot = self._adapter_to_add(name, r, lora_alpha, use_rslora, lora_A, lora_B, slot, lora_dropout)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if lora_A is None:
            nn.init.kaiming_uniform_(self.lora_A[slot, :r], a=math.sqrt(5))
        else:
            self.lora_A[slot, :r] = lora_A
            self.lora_B[slot, :, :r] = lora_B
        self.scalings[slot] = config.scaling
        self.ranks[slot] = r
        self.dropouts[slot] = config.lora_dropout
        self.slots[name] = slot
        self.alphas[name] = (config.lora_alpha, use_rslora, float(config.lora_dropout))
        if self.active_adapter is None:
            self.active_adapter = name
        return slot

    def _adapter_to_add(self, name, r, lora_alpha, use_rslora, lora_A, lora_B, slot, lora_dropout
                        ) -> tuple[LoRAConfig, int]:
        """Every check of add_adapter, with nothing written: (its config, its slot)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if name in self.slots:
            raise ValueError(f"adapter {name!r} exists already (remove_adapter first)")
        config = LoRAConfig(r=r, lora_alpha=8 if lora_alpha is None else lora_alpha, use_rslora=use_rslora,
                            lora_dropout=self.lora_dropout if lora_dropout is None else lora_dropout)
        if r > self.r_max:
            raise ValueError(f"r must be <= r_max={self.r_max}, got {r}")
        used = set(self.slots.values())
        if slot is None:
            free = [s for s in range(self.capacity) if s not in used]
            if not free:
                raise ValueError(f"all {self.capacity} adapter slots are in use (capacity={self.capacity})")
            slot = free[0]
        elif not 0 <= slot < self.capacity or slot in used:
            raise ValueError(f"slot must be a free slot in [0, {self.capacity}), got {slot}")
        if (lora_A is None) != (lora_B is None):
            raise ValueError("give both lora_A and lora_B, or neither")
        if lora_A is not None and (tuple(lora_A.shape) != (r, self.in_features)
                                   or tuple(lora_B.shape) != (self.out_features, r)):
            raise ValueError(f"lora_A must be [{r}, {self.in_features}] and lora_B [{self.out_features}, {r}], "
                             f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        return config, slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free the adapter's slot (its values are zeroed)."""
        slot = self._slot(name)
        if self.merged_adapter == name:
            self.unmerge()
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot] = 0.0
        self.dropouts[slot] = 0.0
        del self.slots[name], self.alphas[name]
        if self.active_adapter == name:
            self.active_adapter = None

    delete_adapter = remove_adapter  # PEFT's name

    def set_adapter(self, name: str | None) -> None:
        """The adapter of calls that name none (None: the base layer)."""
        self._check_can_activate(name)
        self.active_adapter = name

    def _check_can_activate(self, name: str | None) -> None:
        if name is not None:
            self._slot(name)
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the weight: unmerge() first")

    def _slot(self, name: str) -> int:
        if name not in self.slots:
            raise KeyError(f"no adapter named {name!r}; adapters: {sorted(self.slots)}")
        return self.slots[name]

    def adapter_ids(self, names: Sequence[str | None]) -> Tensor:
        """The slot of each name (None: -1, the base layer only) as an int64 tensor on the weight's device."""
        return torch.tensor([NO_ADAPTER if n is None else self._slot(n) for n in names], dtype=torch.int64,
                            device=self.weight.device)

    # -- forward ------------------------------------------------------------

    def forward(self, x: Tensor, adapter_names: Sequence[str | None] | None = None,
                adapter_ids: Tensor | None = None) -> Tensor:
        """x [..., in] -> [..., out]. Rows take their adapter from adapter_ids (slots, one per row or per
        sequence), else adapter_names (names or None), else adapter_batch()'s ids, else the active adapter."""
        if adapter_ids is None:
            if adapter_names is not None:
                adapter_ids = self.adapter_ids(adapter_names)
            elif self.batch_ids is not None:
                adapter_ids = self.batch_ids
        if self.adapter_disabled:
            if self.merged_adapter is not None:
                raise RuntimeError(f"adapter {self.merged_adapter!r} is merged: unmerge() before disabling adapters")
            return self._forward(x, None)
        if adapter_ids is None:  # the whole batch on the active adapter (or on none)
            if self.active_adapter is None or self.merged_adapter is not None:
                return self._forward(x, None)
            adapter_ids = torch.full(x.shape[:-1], self.slots[self.active_adapter], dtype=torch.int64,
                                     device=x.device)
        elif self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the weight: a batch that names "
                               "adapters needs the unmerged weight (unmerge() first)")
        return self._forward(x, adapter_ids)

    def _forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        """Rows on their adapters (adapter_ids), or the base layer alone (None)."""
        if adapter_ids is None:
            return F.linear(x, self.weight, self.bias)
        return lora_linear_multi(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scalings, adapter_ids,
                                 self.ranks, self.dropouts, self.training)

    # -- merging ------------------------------------------------------------

    def _adapter_tensors(self, name: str) -> tuple[Tensor, Tensor, float]:
        slot = self._slot(name)
        r = int(self.ranks[slot])
        return self.lora_A[slot, :r], self.lora_B[slot, :, :r], float(self.scalings[slot])

    def merge(self, name: str | None = None, safe: bool = False) -> None:
        """Fold adapter `name` (default: the active one) into the weight; calls that name no adapter then
        cost one plain GEMM, and calls that name adapters are refused until unmerge()."""
        name = self.active_adapter if name is None else name
        if name is None or self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            self.unmerge()
        merge_(self.weight, *self._adapter_tensors(name), safe=safe)
        self.merged_adapter = self.active_adapter = name

    def unmerge(self) -> None:
        if self.merged_adapter is not None:
            unmerge_(self.weight, *self._adapter_tensors(self.merged_adapter))
            self.merged_adapter = None

    # what the state-dict hooks (register_merge_hooks) ask of a layer
    def merged_adapter_tensors(self):
        return self._adapter_tensors(self.merged_adapter) if self.merged_adapter is not None else None

    def _merge_token(self):
        return self.merged_adapter

    def _forget_merge(self) -> None:
        self.merged_adapter = None

    def _merge_again(self, name: str) -> None:
        # in with the new: the adapter active after the load (a loaded state names its own), if the layer has it
        active = self.active_adapter
        if active is not None and active in self.slots:
            self.merge(active)

    def merge_and_unload(self, name: str | None = None) -> nn.Linear:
        """An nn.Linear holding W0 + s·B A of adapter `name` (default: the active one): the weight merged in place
        and shared. Without any adapter to merge, the base layer as it is."""
        self.merge(name)
        return self._base_layer()

    def unload(self) -> nn.Linear:
        """The base layer with no adapter in its weight (unmerged first if one is merged)."""
        self.unmerge()
        return self._base_layer()

    def _base_layer(self) -> nn.Linear:
        return linear_holding(self.weight, self.bias)

    # -- state --------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"slots": dict(self.slots), "alphas": dict(self.alphas), "active_adapter": self.active_adapter}

    def set_extra_state(self, state: dict) -> None:
        if self.merged_adapter is not None:
            raise RuntimeError("load_state_dict into a layer with a merged adapter: unmerge() first")
        self.slots, self.alphas = dict(state["slots"]), {n: tuple(v) for n, v in state["alphas"].items()}
        self.active_adapter = state["active_adapter"]
        self.dropouts.zero_()
        for name, slot in self.slots.items():
            self.dropouts[slot] = self.alphas[name][2]

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: slot {s} r={int(self.ranks[s])}" for n, s in self.slots.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, capacity={self.capacity}, "
                f"r_max={self.r_max}, lora_dropout={self.lora_dropout}, adapters={{{adapters}}}, "
                f"active={self.active_adapter!r}"
                + (f", merged={self.merged_adapter!r}" if self.merged_adapter else ""))


# -- model level ----------------------------------------------------------------------------------------------

def multi_lora_layers(model: nn.Module) -> list[tuple[str, MultiLoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def inject_multi_lora(model: nn.Module, target_modules: str | Iterable[str], capacity: int = 8, r_max: int = 16,
                      lora_dropout: float = 0.0, freeze_base: bool = True,
                      adapter_dtype: torch.dtype | None = None, quantize: str | None = None) -> nn.Module:
    """Replace every nn.Linear that target_modules names (inject_lora's rules) by a MultiLoRALinear; a bitsandbytes
    Linear4bit (or, with quantize="nf4"/"fp4", every target quantized here) by a MultiLoRALinear4bit."""
    from .modules4bit import MultiLoRALinear4bit

    names = [n for n in target_names(model, target_modules) if isinstance(model.get_submodule(n), nn.Linear)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model")
    for name in names:
        linear = model.get_submodule(name)
        if is_bnb_linear4bit(linear):
            layer = MultiLoRALinear4bit.from_bnb(linear, capacity, r_max, lora_dropout, adapter_dtype=adapter_dtype)
        elif quantize is not None:
            layer = MultiLoRALinear4bit.quantize(linear, capacity, r_max, lora_dropout, quant_type=quantize,
                                                 adapter_dtype=adapter_dtype)
        else:
            layer = MultiLoRALinear.from_linear(linear, capacity, r_max, lora_dropout, adapter_dtype)
        replace_module(model, name, layer)
    if freeze_base:
        mark_only_lora_as_trainable(model)
    return model


def _layers(model: nn.Module) -> list[MultiLoRALinear]:
    layers = [m for _, m in multi_lora_layers(model)]
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layers (inject_multi_lora first)")
    return layers


def common_free_slot(layers: Iterable[MultiLoRALinear]) -> int | None:
    """The first slot free in every one of the layers (so that a name means one slot everywhere), or None."""
    layers = list(layers)
    used = set().union(*(set(layer.slots.values()) for layer in layers))
    return next((s for s in range(min(layer.capacity for layer in layers)) if s not in used), None)


def add_adapter(model: nn.Module, name: str, r: int, lora_alpha: float | None = None,
                use_rslora: bool = False, lora_dropout: float | None = None) -> int:
    """Add adapter `name` to every MultiLoRALinear of the model, in the same slot everywhere; returns it."""
    layers = _layers(model)
    slot = common_free_slot(layers)
    if slot is None:
        raise ValueError(f"no slot is free in every layer (capacity={layers[0].capacity})")
    for layer in layers:  # every layer checked before any changes: a refusal leaves the model as it was
        layer._adapter_to_add(name, r, lora_alpha, use_rslora, None, None, slot, lora_dropout)
    for layer in layers:
        layer.add_adapter(name, r, lora_alpha, use_rslora, slot=slot, lora_dropout=lora_dropout)
    return slot


def remove_adapter(model: nn.Module, name: str) -> None:
    layers = _layers(model)
    for layer in layers:
        layer._slot(name)
    for layer in layers:
        layer.remove_adapter(name)


def set_adapter(model: nn.Module, name: str | None) -> None:
    layers = _layers(model)
    for layer in layers:  # all or none
        layer._check_can_activate(name)
    for layer in layers:
        layer.set_adapter(name)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str | None]):
    """Within the block every MultiLoRALinear of the model serves row (or sequence) i on adapter_names[i]."""
    layers = _layers(model)
    names = list(adapter_names)
    slot_of: dict[str, int] = {}
    for layer in layers:
        for name, slot in layer.slots.items():
            if slot_of.setdefault(name, slot) != slot:
                raise ValueError(f"the layers hold adapter {name!r} in different slots: add adapters with "
                                 "lora_kernels.add_adapter(model, ...) so that a name means one slot everywhere")
    unknown = sorted({n for n in names if n is not None and n not in slot_of})
    if unknown:
        raise KeyError(f"no adapter named {unknown}; adapters: {sorted(slot_of)}")
    # a layer that lacks an adapter (one loaded for some layers only) serves its rows on the base layer, as PEFT
    previous = {layer: layer.batch_ids for layer in layers}
    for layer in layers:
        layer.batch_ids = torch.tensor([layer.slots.get(n, NO_ADAPTER) if n is not None else NO_ADAPTER
                                        for n in names], dtype=torch.int64, device=layer.weight.device)
    try:
        yield model
    finally:
        for layer, outer in previous.items():  # nested blocks: the outer block's rows again
            layer.batch_ids = outer
