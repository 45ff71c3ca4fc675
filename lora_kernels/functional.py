"""Functional API: argument checks, autocast, then the custom ops (which pick a backend).

    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False)
    merge_(weight, lora_A, lora_B, scaling, safe=False, exact=False)
    unmerge_(weight, lora_A, lora_B, scaling, record=None)
    switch_(weight, lora_A, lora_B, scaling, new_A, new_B, new_scaling, safe=False)

Every check runs before anything is computed or written, so a call that raises
leaves every tensor as it was.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import Tensor

from .ops import lora_linear as _lora_linear_ops
from .ops.merge import MergeRecord, merge_exact_, merge_op

__all__ = ["lora_linear", "merge_", "unmerge_", "switch_", "MergeRecord"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_MAX = sys.float_info.max


def _check_float_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(reference_name: str, reference: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} must be on {reference_name}'s device {reference.device}, got {t.device}")


def _check_same_dtype(reference_name: str, reference: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"{name} must have {reference_name}'s dtype {reference.dtype}, got {t.dtype}")


def _check_same_dtype_device(reference_name: str, reference: Tensor, **others) -> None:
    _check_same_device(reference_name, reference, **others)
    _check_same_dtype(reference_name, reference, **others)


def _check_scaling(name: str, scaling) -> float:
    if isinstance(scaling, Tensor) and scaling.dim() == 0 and scaling.is_floating_point() and scaling.device.type == "cpu":
        scaling = scaling.item()  # a 0-d CPU tensor (what LoRALinear keeps for torch.compile) is accepted too
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scaling).__name__}")
    try:
        value = float(scaling)
    except OverflowError:  # an int beyond float64's range
        raise ValueError(f"{name} must be finite, got an integer of {int(scaling).bit_length()} bits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {scaling}")
    return value


def _check_not_learnable_scaling(scaling) -> None:
    """The fused op has no gradient for the scaling: a tensor that asks for one is refused, not ignored."""
    if isinstance(scaling, Tensor) and scaling.requires_grad:
        raise ValueError("scaling must not require grad: lora_linear computes no gradient for it (a learnable "
                         "scaling would silently stay constant); pass a float or a tensor with requires_grad=False")


def _dtensor_class():
    """torch.distributed.tensor.DTensor once something imported it (no DTensor exists before), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _check_not_distributed_tensor(**tensors) -> None:
    """A DTensor (tensor parallelism, or FSDP2's sharded parameters outside its forward) holds only a shard:
    running the kernels on its local piece would be silently wrong."""
    dtensor = _dtensor_class()
    for name, t in tensors.items():
        if dtensor is not None and isinstance(t, dtensor):
            raise TypeError(f"{name} is a DTensor (placements {tuple(t.placements)}): lora_kernels runs on whole, "
                            "local tensors; tensor-parallel (DTensor) weights are not supported. FSDP2 "
                            "(fully_shard) and DDP are: they hand the layer ordinary tensors in forward")


def _check_adapter(weight: Tensor, lora_A, lora_B, a_name: str = "lora_A", b_name: str = "lora_B") -> None:
    """lora_A [r, in] and lora_B [out, r] for weight [out, in], r >= 1."""
    _check_float_tensor(a_name, lora_A, 2)
    _check_float_tensor(b_name, lora_B, 2)
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != in_features:
        raise ValueError(f"{a_name} must be [r >= 1, in_features={in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{b_name} must be [out_features={out_features}, r={r}], got {tuple(lora_B.shape)}")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def draw_seed() -> Tensor:
    """A dropout seed (0-d int64 CPU tensor) from torch's default CPU generator.

    A tensor, not an int, so that torch.compile keeps it in the graph instead of
    specialising on its value; torch.manual_seed makes the sequence reproducible.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _plain_valid_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> bool:
    """True for the everyday call: valid arguments, one dtype and device, no autocast.

    One expression instead of a dozen helper calls: the per-call Python cost is
    visible next to small layers. Anything else goes through _check_and_autocast,
    which gives the precise error (or applies autocast). Under torch.compile,
    scaling's value cannot be checked at trace time: LoRALinear passes it as a
    0-d tensor (a graph input), and Dynamo traces a float argument of a compiled
    function as a symbolic float.
    """
    return (
        isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
        and isinstance(lora_B, Tensor) and (bias is None or isinstance(bias, Tensor))
        and x.dtype in _FLOAT_DTYPES
        and weight.dtype == x.dtype and lora_A.dtype == x.dtype and lora_B.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and weight.device == x.device and lora_A.device == x.device and lora_B.device == x.device
        and (bias is None or bias.device == x.device)
        and x.dim() >= 1 and weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2
        and lora_A.shape[0] >= 1 and x.shape[-1] == weight.shape[1] == lora_A.shape[1]
        and lora_B.shape[0] == weight.shape[0] and lora_B.shape[1] == lora_A.shape[0]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
        and (type(scaling) is float and (torch.compiler.is_compiling() or math.isfinite(scaling))
             or type(scaling) is int and -_FLOAT_MAX <= scaling <= _FLOAT_MAX
             or isinstance(scaling, Tensor) and torch.compiler.is_compiling() and not scaling.requires_grad)
        and type(dropout_p) in (float, int) and 0.0 <= dropout_p < 1.0
        and _autocast_dtype(x.device.type) is None
        and (_dtensor_class() is None or not any(isinstance(t, _dtensor_class()) for t in (x, weight, bias, lora_A, lora_B)))
    )


def _check_and_autocast(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Every check of lora_linear with its error message; returns the (autocast) tensors."""
    _check_float_tensor("x", x)
    _check_float_tensor("weight", weight, 2)
    if bias is not None:
        _check_float_tensor("bias", bias, 1)
    if x.dim() < 1:
        raise ValueError(f"x must be [..., in_features], got a 0-d tensor")
    out_features, in_features = weight.shape
    if in_features != x.shape[-1]:
        # Blame the odd one out: the weight when x and lora_A agree on in_features, else x.
        if isinstance(lora_A, Tensor) and lora_A.dim() == 2 and lora_A.shape[1] == x.shape[-1]:
            raise ValueError(f"weight must be [out_features, in_features={x.shape[-1]}] (the last dimension of x "
                             f"and lora_A), got {tuple(weight.shape)}")
        raise ValueError(f"x must be [..., in_features={in_features}], got {tuple(x.shape)}")
    _check_adapter(weight, lora_A, lora_B)
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias must be [out_features={out_features}], got {tuple(bias.shape)}")
    _check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    _check_not_distributed_tensor(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    _check_not_learnable_scaling(scaling)
    if not (isinstance(scaling, Tensor) and torch.compiler.is_compiling()):  # a traced value cannot be read
        _check_scaling("scaling", scaling)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")

    cast_to = _autocast_dtype(x.device.type)
    if cast_to is not None:
        # As nn.Linear under autocast: compute in the autocast dtype; the casts are
        # differentiable, so float32 parameters still receive float32 gradients.
        x, weight, lora_A, lora_B = (t.to(cast_to) if t.dtype != torch.float64 else t for t in (x, weight, lora_A, lora_B))
        if bias is not None and bias.dtype != torch.float64:
            bias = bias.to(cast_to)
    _check_same_dtype("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)

    return x, weight, bias, lora_A, lora_B


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T, fused.

    x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r];
    returns [..., out]. Dropout (probability dropout_p) is applied only when
    training; its mask comes from a seed drawn from torch's default generator, so
    torch.manual_seed makes runs reproducible. Differentiable in x, lora_A,
    lora_B, bias (and weight, if it requires grad). Under torch.autocast it
    computes in the autocast dtype like nn.Linear does.
    """
    if not _plain_valid_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        x, weight, bias, lora_A, lora_B = _check_and_autocast(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    out_features = weight.shape[0]
    seed = draw_seed() if training and dropout_p > 0.0 else None
    # [M, in] for the kernels (flatten, not reshape(-1, in): in_features may be 0)
    x2d = x if x.dim() == 2 else x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)
    if torch.compiler.is_compiling():
        # The custom op, traced without graph breaks; scaling as a tensor is a graph
        # input, so another value (LoRALinear keeps one in sync) does not recompile.
        # A float becomes a tensor by a multiplication, which Dynamo keeps symbolic
        # (torch.tensor(scaling) would specialise on the value and recompile).
        if not isinstance(scaling, Tensor):
            scaling = torch.ones((), dtype=torch.float64) * scaling
        args = (x2d, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed)
        y, _ = _lora_linear_ops.lora_linear_fwd(*args)
    else:
        args = (x2d, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
            y, _ = _lora_linear_ops.LoRALinearFunction.apply(*args)
        else:
            y, _ = _lora_linear_ops.forward(*args)  # inference: no autograd bookkeeping at all
    if x.dim() == 2:
        return y
    # Not y.view(...): a view as the layer's output would let an in-place op on it slip
    # past autograd hooks on the output (FSDP2's pre-backward hook). nn.Linear does the same.
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], out_features))


def _check_no_shared_elements(name: str, t: Tensor) -> None:
    """An in-place result is only defined if no two elements of t share memory (as in an expand()ed view).

    Sufficient test: each dimension, taken by increasing stride, steps past the span of the smaller ones.
    """
    span = 1
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1):
        if stride < span:
            raise ValueError(f"{name} must not have elements that share memory (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}, e.g. an expand()ed view): an in-place update of it is undefined")
        span = stride * size


def _check_merge_args(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling) -> float:
    _check_float_tensor("weight", weight, 2)
    _check_no_shared_elements("weight", weight)
    if weight.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("weight is an inference tensor (created under torch.inference_mode()): like torch's own "
                           "in-place ops, merge_/unmerge_/switch_ update it only inside torch.inference_mode()")
    _check_adapter(weight, lora_A, lora_B)
    _check_same_dtype_device("weight", weight, lora_A=lora_A, lora_B=lora_B)
    _check_not_distributed_tensor(weight=weight, lora_A=lora_A, lora_B=lora_B)
    return _check_scaling("scaling", scaling)


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last) byte addresses that t's elements can occupy."""
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def _unaliased(t: Tensor | None, weight: Tensor) -> Tensor | None:
    """t, or a copy of it when its memory may overlap weight's (merge_(W, W[:2], ...)): the merge
    reads t while it writes weight, so it must read values that the write cannot change."""
    if (t is None or t.numel() == 0 or weight.numel() == 0 or t.device != weight.device
            or t.device.type == "meta" or torch.compiler.is_compiling()):
        return t
    (t0, t1), (w0, w1) = _byte_span(t), _byte_span(weight)
    return t.clone() if t0 < w1 and w0 < t1 else t


@torch.no_grad()
def merge_(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, safe: bool = False, exact: bool = False
) -> MergeRecord | None:
    """weight += scaling · lora_B @ lora_A, in place, one rounding per element; returns weight's record.

    weight [out, in], lora_A [r, in], lora_B [out, r]. The product is accumulated
    in float32 (float64 for float64 weights) tile by tile: no [out, in] temporary.
    safe=True: raise RuntimeError, weight untouched, if any merged value would be
    NaN/Inf. exact=True: return a MergeRecord with which unmerge_ restores the
    weight bit for bit (otherwise None).

    What a plain merge/unmerge cycle guarantees: each rounding is to nearest, so
    an element is off by at most half an ulp of the merged value W0 + s·BA, plus
    half an ulp of the result. That is an ulp or two of W0 when |s·BA| is not much
    larger than |W0|, and proportionally more when it is (an ulp of the larger
    value is lost in the round trip). Further cycles do not drift: unmerge
    subtracts exactly what merge added, so the weight stays where the first cycle
    left it. exact=True removes even that first-cycle error.
    Adapter tensors that share memory with weight are read from a copy.
    """
    scaling = _check_merge_args(weight, lora_A, lora_B, scaling)
    lora_A, lora_B = _unaliased(lora_A, weight), _unaliased(lora_B, weight)
    if exact:
        return merge_exact_(weight, lora_A, lora_B, scaling, safe)
    merge_op(weight, lora_A, lora_B, scaling, None, None, 0.0, safe)
    return None


@torch.no_grad()
def unmerge_(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, record: MergeRecord | None = None
) -> None:
    """weight -= scaling · lora_B @ lora_A, in place; with merge_'s record, restores it exactly."""
    scaling = _check_merge_args(weight, lora_A, lora_B, scaling)
    if record is not None:
        if not isinstance(record, MergeRecord):
            raise TypeError(f"record must be a MergeRecord from merge_(..., exact=True), got {type(record).__name__}")
        if record.shape != weight.shape or record.values.dtype != weight.dtype:
            raise ValueError(
                f"record was made for a {tuple(record.shape)} {record.values.dtype} weight, "
                f"got weight {tuple(weight.shape)} {weight.dtype}"
            )
    lora_A, lora_B = _unaliased(lora_A, weight), _unaliased(lora_B, weight)
    merge_op(weight, lora_A, lora_B, -scaling, None, None, 0.0, False)
    if record is not None:
        record.restore_(weight)


@torch.no_grad()
def switch_(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    new_A: Tensor,
    new_B: Tensor,
    new_scaling: float,
    safe: bool = False,
) -> None:
    """Replace the merged adapter (lora_A, lora_B, scaling) by (new_A, new_B, new_scaling) in one pass.

    weight += new_scaling · new_B new_A − scaling · lora_B lora_A, both products in
    float32, one rounding. Switching back applies the exact negation, so
    alternating adapters drifts no more than merge/unmerge does. The ranks may differ.
    """
    scaling = _check_merge_args(weight, lora_A, lora_B, scaling)
    _check_adapter(weight, new_A, new_B, "new_A", "new_B")
    _check_same_dtype_device("weight", weight, new_A=new_A, new_B=new_B)
    new_scaling = _check_scaling("new_scaling", new_scaling)
    new_A, new_B, lora_A, lora_B = (_unaliased(t, weight) for t in (new_A, new_B, lora_A, lora_B))
    merge_op(weight, new_A, new_B, new_scaling, lora_A, lora_B, scaling, safe)
