"""Argument checks (and autocast) of the public functions, before anything is computed or written.

Every check raises ValueError/TypeError/RuntimeError naming the argument and what was expected,
so a call that raises leaves every tensor as it was. `plain_valid_call` is the one-expression
test of the everyday call (the per-call Python cost shows next to small layers); anything else
goes through the full checks, which give the precise error.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_MAX = sys.float_info.max


def check_float_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(reference_name: str, reference: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} must be on {reference_name}'s device {reference.device}, got {t.device}")


def check_same_dtype(reference_name: str, reference: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"{name} must have {reference_name}'s dtype {reference.dtype}, got {t.dtype}")


def check_same_dtype_device(reference_name: str, reference: Tensor, **others) -> None:
    check_same_device(reference_name, reference, **others)
    check_same_dtype(reference_name, reference, **others)


def check_scaling(name: str, scaling) -> float:
    if isinstance(scaling, Tensor) and scaling.requires_grad:  # .item() would silently make it a constant
        raise ValueError(f"{name} must not require grad: no gradient is computed for a scaling (a learnable one "
                         "would silently stay constant); pass a number or a tensor with requires_grad=False")
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


def check_scaling_in_memory(scaling: Tensor, x: Tensor) -> None:
    """A scaling the kernels read in device memory (CUDA-graph capture): a 0-d float tensor on x's
    device. Its value is not checked: reading it would wait for the GPU, which capture forbids."""
    if scaling.dim() != 0 or not scaling.is_floating_point() or scaling.device != x.device:
        raise ValueError(f"a tensor scaling must be a 0-d floating tensor on the CPU or on x's device {x.device}, "
                         f"got {tuple(scaling.shape)} {scaling.dtype} on {scaling.device}")


def check_not_learnable_scaling(scaling) -> None:
    """The fused op has no gradient for the scaling: a tensor that asks for one is refused, not ignored."""
    if isinstance(scaling, Tensor) and scaling.requires_grad:
        raise ValueError("scaling must not require grad: lora_linear computes no gradient for it (a learnable "
                         "scaling would silently stay constant); pass a float or a tensor with requires_grad=False")


def is_dtensor(t) -> bool:
    """Whether t is a torch.distributed.tensor.DTensor (none can exist before that module is imported,
    so the usual answer costs one dictionary lookup)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def check_not_distributed_tensor(**tensors) -> None:
    """A DTensor (tensor parallelism, or FSDP2's sharded parameters outside its forward) holds only a shard:
    running the kernels on its local piece would be silently wrong."""
    for name, t in tensors.items():
        if is_dtensor(t):
            raise TypeError(f"{name} is a DTensor (placements {tuple(t.placements)}): lora_kernels runs on whole, "
                            "local tensors; tensor-parallel (DTensor) weights are not supported. FSDP2 "
                            "(fully_shard) and DDP are: they hand the layer ordinary tensors in forward")


def check_adapter(weight: Tensor, lora_A, lora_B, a_name: str = "lora_A", b_name: str = "lora_B") -> None:
    """lora_A [r, in] and lora_B [out, r] for weight [out, in], r >= 1."""
    check_float_tensor(a_name, lora_A, 2)
    check_float_tensor(b_name, lora_B, 2)
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != in_features:
        raise ValueError(f"{a_name} must be [r >= 1, in_features={in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{b_name} must be [out_features={out_features}, r={r}], got {tuple(lora_B.shape)}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def plain_valid_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> bool:
    """True for the everyday call: valid arguments, one dtype and device, no autocast.

    One expression instead of a dozen helper calls: the per-call Python cost is
    visible next to small layers. Anything else goes through check_and_autocast,
    which gives the precise error (or applies autocast). Under torch.compile,
    scaling's value cannot be checked at trace time: LoRALinear passes it as a
    0-d tensor (a graph input), and Dynamo traces a float argument of a compiled
    function as a symbolic float. A 0-d tensor on x's GPU is read by the kernels,
    never here (that would wait for the GPU).
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
             or isinstance(scaling, Tensor) and not scaling.requires_grad and (
                 torch.compiler.is_compiling()
                 or scaling.dim() == 0 and scaling.device == x.device and scaling.device.type != "cpu"
                 and scaling.is_floating_point()))
        and type(dropout_p) in (float, int) and 0.0 <= dropout_p < 1.0
        and autocast_dtype(x.device.type) is None
        and not (is_dtensor(x) or is_dtensor(weight) or is_dtensor(lora_A) or is_dtensor(lora_B) or is_dtensor(bias))
    )


def check_base_layer(x, weight, bias) -> None:
    """x [..., in], weight [out, in'], bias [out] or None: types, x's rank and bias's length. Whether in and in'
    agree is the caller's check, whose message can name the odd one out."""
    check_float_tensor("x", x)
    check_float_tensor("weight", weight, 2)
    if bias is not None:
        check_float_tensor("bias", bias, 1)
    if x.dim() < 1:
        raise ValueError("x must be [..., in_features], got a 0-d tensor")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [out_features={weight.shape[0]}], got {tuple(bias.shape)}")


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_and_autocast(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Every check of lora_linear with its error message; returns the (autocast) tensors."""
    check_base_layer(x, weight, bias)
    in_features = weight.shape[1]
    if in_features != x.shape[-1]:
        # Blame the odd one out: the weight when x and lora_A agree on in_features, else x.
        if isinstance(lora_A, Tensor) and lora_A.dim() == 2 and lora_A.shape[1] == x.shape[-1]:
            raise ValueError(f"weight must be [out_features, in_features={x.shape[-1]}] (the last dimension of x "
                             f"and lora_A), got {tuple(weight.shape)}")
        raise ValueError(f"x must be [..., in_features={in_features}], got {tuple(x.shape)}")
    check_adapter(weight, lora_A, lora_B)
    check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    check_not_distributed_tensor(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    check_not_learnable_scaling(scaling)
    if isinstance(scaling, Tensor) and scaling.device.type != "cpu":
        check_scaling_in_memory(scaling, x)
    elif not (isinstance(scaling, Tensor) and torch.compiler.is_compiling()):  # a traced value cannot be read
        check_scaling("scaling", scaling)
    check_dropout_p(dropout_p)

    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    check_same_dtype("x", x, weight=weight, bias=bias)
    check_adapter_dtype(x, lora_A, lora_B)
    return x, weight, bias, lora_A, lora_B


def check_magnitude(magnitude, weight: Tensor, adapter_dtype: torch.dtype, name: str = "magnitude") -> None:
    """DoRA's magnitude m: a 1-D floating tensor [out_features] with lora_A's dtype, on the weight's device."""
    check_float_tensor(name, magnitude, 1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"{name} must be [out_features={weight.shape[0]}], got {tuple(magnitude.shape)}")
    if magnitude.dtype != adapter_dtype:
        raise TypeError(f"{name} must have lora_A's dtype {adapter_dtype}, got {magnitude.dtype}")
    check_same_device("weight", weight, **{name: magnitude})
    check_not_distributed_tensor(**{name: magnitude})


def check_weight_norm(weight_norm, weight: Tensor) -> None:
    """A precomputed DoRA row norm: a 1-D floating tensor [out_features] on the weight's device, without gradient."""
    check_float_tensor("weight_norm", weight_norm, 1)
    if weight_norm.shape[0] != weight.shape[0]:
        raise ValueError(f"weight_norm must be [out_features={weight.shape[0]}], got {tuple(weight_norm.shape)}")
    if weight_norm.requires_grad:
        raise ValueError("weight_norm must not require grad: DoRA's norm is a constant (see dora_weight_norm)")
    check_same_device("weight", weight, weight_norm=weight_norm)


def check_4bit_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """lora_linear's checks with a 4-bit weight (a Weight4bit): every argument as for a dense weight of the same
    shape, on the codes' device; returns the (autocast) x, bias, lora_A, lora_B."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    # a stand-in of the weight's shape, x's dtype and device (one element, expanded), for the shared checks
    stand_in = x.new_empty(()).expand(weight.shape)
    x, _, bias, lora_A, lora_B = check_and_autocast(x, stand_in, bias, lora_A, lora_B, scaling, dropout_p)
    if weight.device != x.device:
        raise ValueError(f"the 4-bit weight must be on x's device {x.device}, got {weight.device}")
    return x, bias, lora_A, lora_B


def _autocast(x, weight, bias, lora_A, lora_B):
    """As nn.Linear under autocast: every operand in the autocast dtype (float64 ones excepted); the
    casts are differentiable, so float32 parameters still receive float32 gradients."""
    cast_to = autocast_dtype(x.device.type)
    if cast_to is None:
        return x, weight, bias, lora_A, lora_B
    return tuple(t.to(cast_to) if t is not None and t.dtype != torch.float64 else t
                 for t in (x, weight, bias, lora_A, lora_B))


def check_adapter_dtype(x: Tensor, lora_A: Tensor, lora_B: Tensor, x_name: str = "x",
                        a_name: str = "lora_A", b_name: str = "lora_B") -> None:
    """lora_A and lora_B have x's dtype, or are both float32 on a float16/bfloat16 x (mixed precision)."""
    if x.dtype in (torch.float16, torch.bfloat16) and lora_A.dtype == torch.float32:
        check_same_dtype(a_name, lora_A, **{b_name: lora_B})
        return
    if lora_A.dtype != x.dtype:
        also = f" (or float32, for both {a_name} and {b_name})" if x.dtype in (torch.float16, torch.bfloat16) else ""
        raise TypeError(f"{a_name} must have {x_name}'s dtype {x.dtype}{also}, got {lora_A.dtype}")
    check_same_dtype(x_name, x, **{b_name: lora_B})


def check_no_shared_elements(name: str, t: Tensor) -> None:
    """An in-place result is only defined if no two elements of t share memory (as in an expand()ed view).

    Sufficient test: each dimension, taken by increasing stride, steps past the span of the smaller ones.
    """
    span = 1
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1):
        if stride < span:
            raise ValueError(f"{name} must not have elements that share memory (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}, e.g. an expand()ed view): an in-place update of it is undefined")
        span = stride * size


def check_weight_and_adapter(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """weight [out, in] and its adapter lora_A [r, in], lora_B [out, r]: shapes, device, dtypes, no DTensor shards."""
    check_float_tensor("weight", weight, 2)
    check_adapter(weight, lora_A, lora_B)
    check_same_device("weight", weight, lora_A=lora_A, lora_B=lora_B)
    check_adapter_dtype(weight, lora_A, lora_B, "weight")
    check_not_distributed_tensor(weight=weight, lora_A=lora_A, lora_B=lora_B)


def check_merge_args(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling) -> float:
    check_float_tensor("weight", weight, 2)
    check_no_shared_elements("weight", weight)
    if weight.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("weight is an inference tensor (created under torch.inference_mode()): like torch's own "
                           "in-place ops, merge_/unmerge_/switch_ update it only inside torch.inference_mode()")
    check_weight_and_adapter(weight, lora_A, lora_B)
    return check_scaling("scaling", scaling)


def byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last) byte addresses that t's elements can occupy."""
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def unaliased(t: Tensor | None, weight: Tensor) -> Tensor | None:
    """t, or a copy of it when its memory may overlap weight's (merge_(W, W[:2], ...)): the merge
    reads t while it writes weight, so it must read values that the write cannot change."""
    if (t is None or t.numel() == 0 or weight.numel() == 0 or t.device != weight.device
            or t.device.type == "meta" or torch.compiler.is_compiling()):
        return t
    (t0, t1), (w0, w1) = byte_span(t), byte_span(weight)
    return t.clone() if t0 < w1 and w0 < t1 else t


def check_multi_args(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropout_p):
    """Every check of lora_linear_multi (shapes, dtypes, devices; the id and rank values are checked by the
    kernels); returns (x, weight, bias, lora_A, lora_B, scalings, adapter_ids [M] int64, ranks), autocast
    applied."""
    check_base_layer(x, weight, bias)
    check_float_tensor("lora_A", lora_A, 3)
    check_float_tensor("lora_B", lora_B, 3)
    out_features, in_features = weight.shape
    n, r_max = lora_A.shape[:2]
    if x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., in_features={in_features}], got {tuple(x.shape)}")
    if n < 1 or r_max < 1 or lora_A.shape[2] != in_features:
        raise ValueError(f"lora_A must be [n >= 1, r_max >= 1, in_features={in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, out_features, r_max):
        raise ValueError(f"lora_B must be [n={n}, out_features={out_features}, r_max={r_max}], "
                         f"got {tuple(lora_B.shape)}")
    check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    check_not_distributed_tensor(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)

    if not isinstance(scalings, Tensor):
        if not isinstance(scalings, (list, tuple)):
            raise TypeError(f"scalings must be a tensor [n={n}] or a list of n numbers, got {type(scalings).__name__}")
        scalings = torch.tensor([check_scaling("scalings", s) for s in scalings], dtype=torch.float64)
    if not scalings.is_floating_point() or tuple(scalings.shape) != (n,):
        raise ValueError(f"scalings must be a float tensor [n={n}], got {tuple(scalings.shape)} {scalings.dtype}")
    if scalings.requires_grad:
        raise ValueError("scalings must not require grad: lora_linear_multi computes no gradient for it")
    if scalings.device.type != "cpu" and scalings.device != x.device:
        raise ValueError(f"scalings must be on the CPU or on x's device {x.device}, got {scalings.device}")
    # Values are checked on the CPU only: reading a GPU tensor would wait for the GPU on every call (and fail
    # during CUDA-graph capture). MultiLoRALinear's scalings live with its weight, written by add_adapter
    # from checked numbers.
    if scalings.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(scalings).all()):
        raise ValueError(f"scalings must be finite, got {scalings.tolist()}")

    if not isinstance(adapter_ids, Tensor) or adapter_ids.is_floating_point() or adapter_ids.dtype == torch.bool:
        got = getattr(adapter_ids, "dtype", type(adapter_ids).__name__)
        raise TypeError(f"adapter_ids must be an integer tensor, got {got}")
    rows = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) == rows:
        pass
    elif x.dim() >= 3 and tuple(adapter_ids.shape) == rows[:1]:  # one adapter per sequence
        adapter_ids = adapter_ids.view(-1, *([1] * (len(rows) - 1))).expand(rows)
    else:
        raise ValueError(f"adapter_ids must be one id per row of x, shape {list(rows)}"
                         + (f" (or one per sequence, [{rows[0]}])" if x.dim() >= 3 else "")
                         + f", got {list(adapter_ids.shape)}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids must be on x's device {x.device}, got {adapter_ids.device}")
    adapter_ids = adapter_ids.reshape(-1).to(torch.int64)

    if ranks is not None:
        if not isinstance(ranks, Tensor):
            ranks = torch.tensor(list(ranks), dtype=torch.int64)
        if ranks.is_floating_point() or ranks.dtype == torch.bool or tuple(ranks.shape) != (n,):
            raise ValueError(f"ranks must be an integer tensor [n={n}], got {tuple(ranks.shape)} {ranks.dtype}")
        ranks = ranks.to(torch.int64)
    dropouts = _adapter_dropouts(dropout_p, n)

    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    check_same_dtype("x", x, weight=weight, bias=bias)
    check_adapter_dtype(x, lora_A, lora_B)
    return x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts


def _adapter_dropouts(dropout_p, n: int) -> Tensor:
    """Each adapter's dropout probability as a float64 CPU tensor [n], from one number or n of them."""
    if not isinstance(dropout_p, (list, tuple, Tensor)):
        return torch.full((n,), check_dropout_p(dropout_p), dtype=torch.float64)
    if isinstance(dropout_p, (list, tuple)):
        dropout_p = torch.tensor([float(p) for p in dropout_p], dtype=torch.float64)
    if not isinstance(dropout_p, Tensor) or not dropout_p.is_floating_point() or tuple(dropout_p.shape) != (n,):
        raise ValueError(f"dropout_p must be a number in [0, 1) or one per adapter (a float tensor [n={n}]), "
                         f"got {dropout_p!r}")
    dropouts = dropout_p.detach().to("cpu", torch.float64)
    if not torch.compiler.is_compiling() and not bool(((dropouts >= 0) & (dropouts < 1)).all()):
        raise ValueError(f"dropout_p must be in [0, 1) for every adapter, got {dropouts.tolist()}")
    return dropouts
