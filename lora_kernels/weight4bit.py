"""A frozen [out, in] weight in bitsandbytes' 4-bit layout (NF4 or FP4), read by the kernels as it is stored.

    w4 = Weight4bit.quantize(weight, blocksize=64, quant_type="nf4", double_quant=True)
    w4.dequantize(torch.bfloat16)          # [out, in], equal to bitsandbytes.functional.dequantize_4bit bit for bit
    Weight4bit.from_bnb(linear4bit.weight) # a bitsandbytes Params4bit, its tensors shared (no copy)
    w4.to_bnb()                            # and back

The layout (bitsandbytes' own, so that a transformers/PEFT QLoRA model is served without conversion):
- codes: uint8 [ceil(out·in / 2)], the row-major flattened weight two codes per byte, the first in the high nibble;
- one scale (absmax) per block of `blocksize` consecutive elements of the flattened weight (a last block may be
  partial, and blocks run across rows when in_features is not a multiple of blocksize):
  element e = code_table[nibble(e)] · absmax[e // blocksize], one float32 product, then rounded to the dtype asked;
- double quantization (bitsandbytes' compress_statistics): absmax is stored as 8-bit codes of bitsandbytes' dynamic
  map, per block of 256 scales with a float32 absmax each, after subtracting their mean (`offset`):
  absmax[b] = nested_code[absmax_codes[b]] · nested_absmax[b // 256] + offset (two float32 roundings, as
  bitsandbytes does). About 0.516 bytes per weight with blocksize 64 (0.5625 without).

The kernels never build the whole dequantized weight: they dequantize it a panel (CPU) or a tile at a time.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .reference import NESTED_BLOCKSIZE, block_scales, dequantize_4bit

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
QUANT_TYPES = ("nf4", "fp4")

# The 16 values of each 4-bit code (bitsandbytes' tables, as float32). NF4: quantiles of a normal distribution,
# sorted, code 7 is exactly 0. FP4: a 1-2-1 minifloat, code 8 the sign bit.
_TABLES = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    # FP4 as bitsandbytes builds it: these minifloat values divided by the largest, in float32
    "fp4": (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0),
}


@functools.lru_cache(maxsize=None)
def _code_table_cpu(quant_type: str) -> Tensor:
    table = torch.tensor(_TABLES[quant_type], dtype=torch.float32)
    return table / table.abs().max()


def code_table(quant_type: str, device=None) -> Tensor:
    """The 16 float32 values of the 4-bit codes of `quant_type` ('nf4' or 'fp4')."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return _code_table_cpu(quant_type).to(device)


@functools.lru_cache(maxsize=None)
def dynamic_code() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-1, 1]) that codes double-quantized
    scales: for each exponent 10^-6 .. 10^0, the midpoints of an evenly spaced fraction grid, both signs, plus
    0 and 1. Tensor operations only (each product rounded to float32 as bitsandbytes' list of floats is), so that a
    Weight4bit can be built inside a torch.compile'd function."""
    exponent_bits = 7  # signed, 8 bits: 7 exponent bits, no fixed fraction bits
    parts = []
    for i in range(exponent_bits):
        grid = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        midpoints = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        parts += [scale * midpoints, -scale * midpoints]
    parts.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.cat(parts).sort().values


def _scaled_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(values scaled into [-1, 1], absmax per block) of a flat float32 tensor, bitsandbytes' way: whole blocks
    multiplied by 1/absmax (an all-zero block keeps absmax 0 and scales by 1/1e-38), a last partial block divided
    by its absmax (stored clamped to 1e-38)."""
    n = flat.numel()
    full = n - n % blocksize
    whole = flat[:full].view(-1, blocksize)
    absmax = whole.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(whole * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return scaled, absmax


def _nearest(scaled: Tensor, sorted_code: Tensor) -> Tensor:
    """Index of the nearest value of a sorted code (a value on a midpoint takes the lower one)."""
    return torch.bucketize(scaled, (sorted_code[:-1] + sorted_code[1:]) / 2)


def _quantize_blockwise_8bit(values: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(uint8 codes, float32 absmax per block) of float32 `values` by a sorted 256-entry code: bitsandbytes'
    quantize_blockwise as its reference (PyTorch) backend computes it. Its CPU library kernel searches the code
    approximately and differs on ~0.1% of values, by one code, near midpoints (README, QLoRA)."""
    scaled, absmax = _scaled_blocks(values, blocksize)
    return _nearest(scaled, code).to(torch.uint8), absmax


@dataclass(eq=False)
class Weight4bit:
    """A frozen weight [out_features, in_features] quantized to 4 bits in bitsandbytes' layout (module docstring).

    codes: uint8 [ceil(out·in / 2)]; absmax: float32 [blocks], or uint8 [blocks] when double quantized, with
    nested_absmax float32 [ceil(blocks / 256)] and offset a 0-d float32 tensor; dtype: the dtype the weight had
    (bitsandbytes' quant_state.dtype: what dequantize() returns by default). Not a tensor: the ops take it in
    place of `weight`, and its tensors move with .to().
    """

    codes: Tensor
    absmax: Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32
    nested_absmax: Tensor | None = None
    offset: Tensor | None = None
    _bnb_codes: Tensor | None = field(default=None, repr=False)  # the Params4bit data this was read from
    # the 16-entry table and (double quantization) the 256-entry map, on the codes' device: made here once (or
    # taken from a weight of the same format: over_bnb), so that a call under torch.compile reads attributes only
    table: Tensor | None = field(default=None, repr=False)
    nested_code: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        check_weight4bit(self)
        if self.table is None:
            self.table = code_table(self.quant_type, self.codes.device)
        if self.nested_code is None and self.nested_absmax is not None:
            self.nested_code = dynamic_code().to(self.codes.device)

    # -- what it is ------------------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def blocks(self) -> int:
        return -(-self.shape[0] * self.shape[1] // self.blocksize)

    def nbytes(self) -> int:
        """Bytes of the stored weight: codes and scales (the two 16-entry/256-entry tables are shared)."""
        parts = [self.codes, self.absmax] + ([self.nested_absmax, self.offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def kernel_args(self) -> tuple:
        """(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, blocksize): how the ops
        and kernels take it (tensors and ints, so that it passes through torch.library custom ops)."""
        return (self.codes, self.absmax, self.nested_absmax, self.nested_code, self.offset, self.table,
                self.out_features, self.blocksize)

    def scales(self) -> Tensor:
        """The float32 absmax of every block [blocks] (decoded from its 8-bit codes when double quantized)."""
        return block_scales(self.absmax, self.nested_absmax, self.nested_code, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole weight [out, in] in `dtype` (default self.dtype): for inspection, export and merging into a
        16-bit model; the ops never call it."""
        codes, absmax, nested_absmax, nested_code, offset, table, out_features, blocksize = self.kernel_args()
        return dequantize_4bit(codes, absmax, nested_absmax, nested_code, offset, table, out_features,
                               self.in_features, blocksize, dtype or self.dtype)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Weight4bit":
        """A copy on `device` (the codes and scales keep their dtypes); `dtype` changes only the default
        dequantization dtype."""
        move = (lambda t: None if t is None else t.to(device)) if device is not None else (lambda t: t)
        return Weight4bit(move(self.codes), move(self.absmax), self.shape, self.blocksize, self.quant_type,
                          dtype or self.dtype, move(self.nested_absmax), move(self.offset))

    def __repr__(self) -> str:
        nested = ", double_quant" if self.double_quant else ""
        return (f"Weight4bit({self.quant_type}, shape={self.shape}, blocksize={self.blocksize}{nested}, "
                f"dtype={self.dtype}, device={self.device})")

    # -- making one ------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor, blocksize: int = 64, quant_type: str = "nf4",
                 double_quant: bool = False) -> "Weight4bit":
        """Quantize a float weight [out, in] as bitsandbytes' quantize_4bit does (the same bytes, the same scales;
        double_quant is its compress_statistics), without bitsandbytes."""
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D float tensor [out, in], got "
                             f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"weight must be float32, bfloat16 or float16 (what bitsandbytes quantizes), "
                             f"got {weight.dtype}")
        _check_format(blocksize, quant_type)
        codes, absmax = quantize_4bit(weight, blocksize, quant_type)
        nested_absmax = offset = None
        if double_quant:
            offset = absmax.mean()
            absmax, nested_absmax = _quantize_blockwise_8bit(absmax - offset, dynamic_code().to(absmax.device),
                                                             NESTED_BLOCKSIZE)
        return cls(codes, absmax, tuple(weight.shape), blocksize, quant_type, weight.dtype, nested_absmax, offset)

    # -- bitsandbytes ----------------------------------------------------------------------------------------
    @classmethod
    def from_bnb(cls, param) -> "Weight4bit":
        """The weight of a bitsandbytes Linear4bit (a Params4bit with its quant_state), its tensors shared."""
        state = getattr(param, "quant_state", None)
        if state is None:
            raise ValueError("param has no quant_state: a bitsandbytes Params4bit is quantized when it is moved to "
                             "a device (.to('cpu') / .cuda()); this one was not")
        if state.nested:
            if state.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"double quantization with blocks of {state.state2.blocksize} scales is not read "
                                 f"(bitsandbytes writes {NESTED_BLOCKSIZE})")
            if not torch.equal(state.state2.code.cpu(), dynamic_code()):
                raise ValueError("the double-quantized scales use a code map other than bitsandbytes' dynamic map")
        if not torch.equal(state.code.float().cpu(), code_table(state.quant_type)):
            raise ValueError(f"quant_state.code is not bitsandbytes' {state.quant_type} table")
        return cls.over_bnb(param)

    @classmethod
    def over_bnb(cls, param, checked: "Weight4bit | None" = None) -> "Weight4bit":
        """from_bnb without its checks (data-dependent), for a Params4bit whose quant_state from_bnb has accepted
        (`checked`, whose tables are reused): how it is read inside a torch.compile'd function."""
        state = param.quant_state
        # bitsandbytes' CPU inference path (eval, no gradients) repacks in place, editing this same quant_state:
        # a flag, not data, so it is read under torch.compile too.
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("this Params4bit was repacked by bitsandbytes' CPU inference path (its codes are no longer "
                             "in the 4-bit layout): wrap the Linear4bit before running it without gradients")
        codes = param.data.reshape(-1).view(torch.uint8)
        nested_absmax = offset = None
        if state.nested:
            nested_absmax = state.state2.absmax
            offset = torch.as_tensor(state.offset, dtype=torch.float32).to(codes.device)
        tables = {}
        if checked is not None:
            tables = {"table": checked.table.to(codes.device),
                      "nested_code": None if checked.nested_code is None else checked.nested_code.to(codes.device)}
        return cls(codes, state.absmax, tuple(state.shape), state.blocksize, state.quant_type, state.dtype,
                   nested_absmax, offset, _bnb_codes=param.data, **tables)

    @classmethod
    def from_torchao(cls, tensor) -> "Weight4bit":
        """A torchao NF4Tensor (torchtune's QLoRA weight), dequantized exactly as torchao dequantizes it.

        The codes are the same bytes (two per byte, the first element in the high nibble: bitsandbytes' layout)
        and are shared. What changes: torchao's second-level quantization (int8 scalers, linear per block of
        scaler_block_size, plus their mean) is decoded once by torchao's own dequantize_scalers, so each block
        keeps exactly the scale torchao multiplies with, held as float32 absmax (0.5625 bytes per weight against
        torchao's ~0.52); and the weight keeps torchao's code table (its NF4 values rounded to 4 decimals and
        held in the tensor's dtype: up to 5e-5 from bitsandbytes' values in float32, 1.6e-3 in bfloat16), so it
        has no bitsandbytes form (to_bnb refuses it; its state dict carries the table as quant_map)."""
        if type(tensor).__name__ != "NF4Tensor" or not hasattr(tensor, "quantized_data"):
            raise TypeError(f"tensor must be a torchao NF4Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"tensor must be a 2-D weight [out, in], got shape {tuple(tensor.shape)}")
        scales = tensor.dequantize_scalers(tensor.quantized_scalers, tensor.quantization_factor,
                                           tensor.scaler_block_size)
        codes = tensor.quantized_data.reshape(-1).view(torch.uint8)
        return cls(codes, scales.float(), tuple(tensor.shape), int(tensor.block_size), "nf4", tensor.dtype,
                   table=tensor.nf4.float().to(codes.device))

    def has_bnb_table(self) -> bool:
        """Whether the 16-entry code table is bitsandbytes' own for quant_type (False for a torchao weight)."""
        return torch.equal(self.table.cpu(), code_table(self.quant_type))

    def quant_state(self):
        """A bitsandbytes QuantState describing this weight (its tensors shared)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.table,
                          blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                          offset=self.offset, state2=state2)

    def to_bnb(self, requires_grad: bool = False):
        """A bitsandbytes Params4bit holding these codes (shared) and a QuantState of these scales."""
        from bitsandbytes.nn import Params4bit

        if not self.has_bnb_table():
            raise ValueError("this weight's code table is not bitsandbytes' (a torchao NF4Tensor's, read by "
                             "from_torchao): bitsandbytes' kernels would dequantize it with their own table")
        data = self._bnb_codes if self._bnb_codes is not None else self.codes.view(-1, 1)
        return Params4bit(data, requires_grad=requires_grad, quant_state=self.quant_state(),
                          blocksize=self.blocksize, compress_statistics=self.double_quant,
                          quant_type=self.quant_type, quant_storage=data.dtype, bnb_quantized=True,
                          module=None)

    def state_dict_entries(self, prefix: str = "weight") -> dict[str, Tensor]:
        """The tensors bitsandbytes' Linear4bit writes into a state dict (and safetensors file) for its weight:
        `weight` (the codes [n/2, 1]), `weight.absmax`, `weight.quant_map`, with double quantization
        `weight.nested_absmax` and `weight.nested_quant_map`, and `weight.quant_state.bitsandbytes__<type>`
        (a JSON of the rest, as uint8)."""
        info = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        entries = {prefix: self.codes.view(-1, 1), f"{prefix}.absmax": self.absmax,
                   f"{prefix}.quant_map": self.table}
        if self.double_quant:
            entries[f"{prefix}.nested_absmax"] = self.nested_absmax
            entries[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.offset))
        packed = torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8)
        entries[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = packed
        return entries

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "weight") -> "Weight4bit":
        """Read what state_dict_entries (or bitsandbytes' Linear4bit) wrote under `prefix`."""
        packed = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(packed) != 1:
            raise KeyError(f"expected one '{prefix}.quant_state.bitsandbytes__<nf4|fp4>' entry, found {packed}")
        info = json.loads(bytes(state_dict[packed[0]].cpu().tolist()).decode("utf-8"))
        codes = state_dict[prefix].reshape(-1).view(torch.uint8)
        nested = f"{prefix}.nested_absmax" in state_dict
        if nested and info.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise ValueError(f"{prefix}: double quantization with blocks of {info['nested_blocksize']} is not read")
        table = state_dict[f"{prefix}.quant_map"].float().reshape(-1)
        if table.numel() != 16 or not bool(torch.isfinite(table).all()):
            raise ValueError(f"{prefix}.quant_map must hold 16 finite values, got {tuple(table.shape)}")
        offset = (torch.tensor(float(info["nested_offset"]), dtype=torch.float32, device=codes.device)
                  if nested else None)
        # the file's own table: bitsandbytes' (what it writes), or torchao's (a weight read by from_torchao)
        return cls(codes, state_dict[f"{prefix}.absmax"], tuple(info["shape"]), int(info["blocksize"]),
                   info["quant_type"], getattr(torch, info["dtype"]),
                   state_dict[f"{prefix}.nested_absmax"] if nested else None, offset, table=table.to(codes.device))


def _check_format(blocksize, quant_type) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_weight4bit(w: Weight4bit) -> None:
    """Clear errors for a 4-bit weight whose parts disagree (shape, blocksize, scales, dtypes, devices)."""
    _check_format(w.blocksize, w.quant_type)
    if len(w.shape) != 2 or min(w.shape) < 0:
        raise ValueError(f"shape must be (out_features, in_features), got {w.shape}")
    n = w.shape[0] * w.shape[1]
    if not isinstance(w.codes, Tensor) or w.codes.dtype != torch.uint8 or w.codes.dim() != 1:
        raise ValueError(f"codes must be a 1-D uint8 tensor, got "
                         f"{getattr(w.codes, 'dtype', type(w.codes).__name__)} {tuple(getattr(w.codes, 'shape', ()))}")
    if w.codes.numel() != (n + 1) // 2:
        raise ValueError(f"codes must hold {(n + 1) // 2} bytes for a {w.shape} weight (two codes per byte), got "
                         f"{w.codes.numel()}")
    blocks = -(-n // w.blocksize)
    expected = torch.uint8 if w.nested_absmax is not None else torch.float32
    if w.absmax.dtype != expected or w.absmax.shape != (blocks,):
        kind = "uint8 codes (double quantization)" if w.nested_absmax is not None else "float32"
        raise ValueError(f"absmax must be {kind} [{blocks}] (one per block of {w.blocksize} of {n} elements), got "
                         f"{w.absmax.dtype} {tuple(w.absmax.shape)}")
    if w.nested_absmax is not None:
        nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
        if w.nested_absmax.dtype != torch.float32 or w.nested_absmax.shape != (nested_blocks,):
            raise ValueError(f"nested_absmax must be float32 [{nested_blocks}], got {w.nested_absmax.dtype} "
                             f"{tuple(w.nested_absmax.shape)}")
        if w.offset is None or w.offset.numel() != 1 or w.offset.dtype != torch.float32:
            raise ValueError("offset must be a 0-d float32 tensor (the mean subtracted before double quantization)")
    elif w.offset is not None:
        raise ValueError("offset is given without nested_absmax")
    parts = [t for t in (w.absmax, w.nested_absmax, w.offset) if t is not None]
    if any(t.device != w.codes.device for t in parts):
        raise ValueError(f"codes and scales must be on one device, got "
                         f"{[str(t.device) for t in [w.codes, *parts]]}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {w.dtype}")


def quantize_4bit(weight: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """(codes uint8 [ceil(n/2)], absmax float32 [blocks]) of a float tensor, bitsandbytes' bytes: each block scaled
    by 1/absmax (the last, partial block divided by it), clamped to [-1, 1], and coded by the nearest table value
    (ties to the lower code of the sorted table)."""
    table = code_table(quant_type, weight.device)
    order = torch.argsort(table)  # NF4's table is sorted; FP4's is not: bucket i is code order[i]
    scaled, absmax = _scaled_blocks(weight.reshape(-1).float(), blocksize)
    # an odd count is padded with a 0.0 (coded as such) to fill the last byte
    nibbles = order[_nearest(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2)), table[order])]
    nibbles = nibbles.to(torch.uint8)
    return (nibbles[0::2] << 4) | nibbles[1::2], absmax


def empty_kernel_args(out_features: int, in_features: int, blocksize: int = 64, double_quant: bool = True,
                      device="cpu") -> tuple:
    """Weight4bit.kernel_args() of an uninitialised 4-bit weight [out, in] (NF4 table): for what reads only shapes
    and dtypes, the GPU compile check (benchmarks/gpu_compile_check.py) and the cost model (on the meta device)."""
    n = out_features * in_features
    blocks = -(-n // blocksize)
    codes = torch.empty(-(-n // 2), dtype=torch.uint8, device=device)
    table = torch.empty(16, dtype=torch.float32, device=device)
    if not double_quant:
        return codes, torch.empty(blocks, dtype=torch.float32, device=device), None, None, None, table, \
            out_features, blocksize
    return (codes, torch.empty(blocks, dtype=torch.uint8, device=device),
            torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
            torch.empty(256, dtype=torch.float32, device=device), torch.empty((), dtype=torch.float32, device=device),
            table, out_features, blocksize)


def is_bnb_linear4bit(module) -> bool:
    """Whether module is a bitsandbytes Linear4bit (checked by its weight's class: no import of bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" and hasattr(weight, "quant_state")
