"""Functional API: argument checks (validation.py), then the ops (ops/), which pick a backend.

    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False)
    lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks=None, dropout_p=0.0,
                      training=False)
    merge_(weight, lora_A, lora_B, scaling, safe=False, exact=False)
    unmerge_(weight, lora_A, lora_B, scaling, record=None)
    switch_(weight, lora_A, lora_B, scaling, new_A, new_B, new_scaling, safe=False)
    dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=False,
                weight_norm=None)
    dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm=None)

Every check runs before anything is computed or written, so a call that raises
leaves every tensor as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validation
from .merge_record import MergeRecord, merge_exact_
from .ops.lora_linear import lora_linear_op
from .ops.lora_linear_4bit import lora_linear_4bit_op, lora_linear_multi_4bit_op
from .weight4bit import Weight4bit
from .ops.lora_linear_multi import lora_linear_multi_op
from .ops.merge import merge_op
from .ops.dora_linear import dora_linear_4bit_op, dora_linear_op, dora_weight_norm_4bit_op, dora_weight_norm_op, \
    inference_forward as dora_inference_forward, norm_dtype

__all__ = ["lora_linear", "lora_linear_multi", "merge_", "unmerge_", "switch_", "MergeRecord", "dora_linear",
           "dora_weight_norm"]


def draw_seed(device: torch.device | str | None = None) -> Tensor:
    """A dropout seed: a 0-d int64 tensor drawn by torch's default generator of `device` (default: the CPU).

    A tensor, not an int, so that torch.compile keeps it in the graph instead of
    specialising on its value; torch.manual_seed makes the sequence reproducible.
    On a GPU it is drawn there, where the kernels read it: no host copy, and a CUDA
    graph that captured the draw draws a new seed (a new mask) at every replay.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def _seed_device(x: Tensor) -> torch.device:
    """Where the dropout seed is drawn: x's GPU, else the CPU (a meta x gets a CPU seed, as before)."""
    return x.device if x.is_cuda else torch.device("cpu")


def _rows(x: Tensor) -> Tensor:
    """x [..., in] as the kernels take it, [M, in] (flatten, not reshape(-1, in): in_features may be 0)."""
    return x if x.dim() == 2 else x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)


def _shaped(y: Tensor, x: Tensor) -> Tensor:
    """The kernels' y [M, out] as [..., out] for x [..., in]. Not y.view(...): a view as the layer's output would let
    an in-place op on it slip past autograd hooks on the output (FSDP2's pre-backward hook); nn.Linear does the same."""
    if x.dim() == 2:
        return y
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float | Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T, fused.

    x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r];
    scaling a number or a 0-d tensor (on x's GPU, the kernels read it in device memory: a
    CUDA graph captured with it sees later in-place changes); returns [..., out]. Dropout (probability dropout_p) is applied only when
    training; its mask comes from a seed drawn from torch's default generator, so
    torch.manual_seed makes runs reproducible. Differentiable in x, lora_A,
    lora_B, bias (and weight, if it requires grad). Under torch.autocast it
    computes in the autocast dtype like nn.Linear does.

    weight may be a Weight4bit (bitsandbytes' NF4/FP4 layout, QLoRA): the kernels then dequantize it a panel or
    a tile at a time, in x's dtype, forward and backward; it is frozen (no gradient).
    """
    if isinstance(weight, Weight4bit):
        return _lora_linear_4bit(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    if not validation.plain_valid_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        x, weight, bias, lora_A, lora_B = validation.check_and_autocast(x, weight, bias, lora_A, lora_B, scaling,
                                                                        dropout_p)
    seed = draw_seed(_seed_device(x)) if training and dropout_p > 0.0 else None
    x2d = _rows(x)
    y, _ = lora_linear_op(x2d, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed)
    return _shaped(y, x)


def _lora_linear_4bit(x, weight: Weight4bit, bias, lora_A, lora_B, scaling, dropout_p, training) -> Tensor:
    x, bias, lora_A, lora_B = validation.check_4bit_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    seed = draw_seed(_seed_device(x)) if training and dropout_p > 0.0 else None
    x2d = _rows(x)
    y, _ = lora_linear_4bit_op(x2d, *weight.kernel_args(), bias, lora_A, lora_B, scaling, float(dropout_p), seed)
    return _shaped(y, x)


def dora_weight_norm(weight: Tensor | Weight4bit, lora_A: Tensor, lora_B: Tensor, scaling: float | Tensor,
                     weight_sq_norm: Tensor | None = None) -> Tensor:
    """n = ‖W0 + s · B A‖ of every output row, [out] in float32 (float64 for float64 tensors), without gradient.

    weight [out, in] (or a Weight4bit: QDoRA; its float32 values, dequantized a block of rows at a time), lora_A
    [r, in], lora_B [out, r]. Computed as ‖W0_o‖² + 2s (W0 Aᵀ)_o · B_o + s² B_o (A Aᵀ) B_oᵀ, with no [out, in]
    temporary; rows where those terms cancel are computed densely (ops/dora_linear.py). weight_sq_norm: ‖W0_o‖²
    [out] when known (LoRALinear caches it while W0 is unchanged).
    """
    w4 = weight if isinstance(weight, Weight4bit) else None
    if w4 is not None:  # the shared checks on a stand-in of the weight's shape, on its device (any adapter dtype)
        weight = w4.codes.new_empty((), dtype=getattr(lora_A, "dtype", w4.dtype)).expand(w4.shape)
    validation.check_weight_and_adapter(weight, lora_A, lora_B)  # DTensor shards refused: a norm of a shard is wrong
    if not (isinstance(scaling, Tensor) and (scaling.device.type != "cpu" or torch.compiler.is_compiling())):
        scaling = validation.check_scaling("scaling", scaling)
    if weight_sq_norm is not None:
        validation.check_weight_norm(weight_sq_norm, weight)
    with torch.no_grad():
        if w4 is not None:
            return dora_weight_norm_4bit_op(*w4.kernel_args(), lora_A, lora_B, scaling, weight_sq_norm)
        return dora_weight_norm_op(weight, lora_A, lora_B, scaling, weight_sq_norm)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float | Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    weight_norm: Tensor | None = None,
    norm_gradient: bool = False,
) -> Tensor:
    """DoRA (weight-decomposed LoRA, PEFT's use_dora=True), fused, with no [out, in] temporary:

        y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s · (x̃ Aᵀ) Bᵀ,   g = m / ‖W0 + s·BA‖ (per output row),

    x̃ = dropout(x) (when training and dropout_p > 0; otherwise y = g ⊙ (x W0ᵀ + s · x Aᵀ Bᵀ) + b). x [..., in],
    weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r], magnitude m [out] (lora_A's dtype);
    returns [..., out]. The norm is a constant (no gradient through it, as in PEFT and the DoRA paper): weight_norm
    gives it precomputed (dora_weight_norm; LoRALinear reuses it in eval while nothing changes), else it is
    computed here. Differentiable in x, lora_A, lora_B, magnitude, bias (and weight, if it requires grad); the
    dropout mask is lora_linear's. norm_gradient=True also differentiates the norm (in lora_A, lora_B and a
    trainable weight; two more passes over W0 in the backward, no [out, in] tensor): the full gradient of
    m ⊙ (W0 + s·BA)/‖W0 + s·BA‖, which the DoRA paper and PEFT do not take. reference.dora_linear is the spec.

    weight may be a Weight4bit (QDoRA: DoRA on bitsandbytes' NF4/FP4 layout): the 4-bit kernels compute the
    products with W0 dequantized in x's dtype a panel or tile at a time; the norm is of its exact (float32) values,
    read a block of rows at a time (the spec: reference.dora_linear on Weight4bit.dequantize(x.dtype) with
    weight_norm = the norm of Weight4bit.dequantize(torch.float32)); it is frozen.
    """
    w4 = weight if isinstance(weight, Weight4bit) else None
    adapter_dtype = getattr(lora_A, "dtype", None)  # before autocast, which may cast the adapter
    if w4 is not None:
        x, bias, lora_A, lora_B = validation.check_4bit_call(x, w4, bias, lora_A, lora_B, scaling, dropout_p)
    elif not validation.plain_valid_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        x, weight, bias, lora_A, lora_B = validation.check_and_autocast(x, weight, bias, lora_A, lora_B, scaling,
                                                                        dropout_p)
    validation.check_magnitude(magnitude, weight, adapter_dtype)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    else:
        validation.check_weight_norm(weight_norm, weight)
        dtype = norm_dtype(weight, lora_A)
        if weight_norm.dtype != dtype:
            weight_norm = weight_norm.to(dtype)
    seed = draw_seed(_seed_device(x)) if training and dropout_p > 0.0 else None
    # z [M, out] is what the magnitude's gradient (and the norm's) needs
    keep_z = torch.is_grad_enabled() and (magnitude.requires_grad or (norm_gradient and (
        lora_A.requires_grad or lora_B.requires_grad or (w4 is None and weight.requires_grad))))
    x2d = _rows(x)
    if w4 is not None:
        y, _, _ = dora_linear_4bit_op(x2d, *w4.kernel_args(), bias, lora_A, lora_B, magnitude, weight_norm, scaling,
                                      float(dropout_p), seed, keep_z, bool(norm_gradient))
    else:
        y, _, _ = dora_linear_op(x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
                                 float(dropout_p), seed, keep_z, bool(norm_gradient))
    return _shaped(y, x)


def dora_linear_inference(x: Tensor, weight: Tensor | Weight4bit, bias: Tensor | None, lora_A: Tensor,
                          lora_B: Tensor, gain: Tensor, scaling: float | Tensor) -> Tensor:
    """dora_linear's y without gradient or dropout, from the gain g = m / ‖W0 + s·BA‖ [out] computed beforehand
    (dora.DoRANormCache.gain: a layer in eval keeps it while W0, A, B, m and s are unchanged, so a decode step costs
    what LoRA's does). The same checks of x, weight, bias, lora_A, lora_B and scaling, the same kernels, the same
    bits as dora_linear; the gain is the caller's (from a checked magnitude)."""
    if isinstance(weight, Weight4bit):
        x, bias, lora_A, lora_B = validation.check_4bit_call(x, weight, bias, lora_A, lora_B, scaling, 0.0)
    elif not validation.plain_valid_call(x, weight, bias, lora_A, lora_B, scaling, 0.0):
        x, weight, bias, lora_A, lora_B = validation.check_and_autocast(x, weight, bias, lora_A, lora_B, scaling, 0.0)
    return _shaped(dora_inference_forward(_rows(x), weight, bias, lora_A, lora_B, gain, scaling), x)


def lora_linear_multi(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scalings,
    adapter_ids: Tensor,
    ranks: Tensor | None = None,
    dropout_p: float | Tensor = 0.0,
    training: bool = False,
) -> Tensor:
    """Many adapters in one batch: row m gets adapter adapter_ids[m]'s LoRA term (none for -1).

    x [..., in], weight [out, in], bias [out] or None, lora_A [n, r_max, in], lora_B [n, out, r_max],
    scalings [n] (a tensor, so that new alphas do not recompile under torch.compile; a list of
    numbers is accepted), adapter_ids: an integer tensor with one id per row of x (x.shape[:-1]) or,
    for x [batch, seq, in], one per sequence ([batch]); ranks [n] (adapter a uses only its first
    ranks[a] ranks: no padded flops) or None; dropout_p: one probability, or one per adapter (a float
    tensor [n]), applied only when training, by lora_linear's rule (a batch on one adapter gets
    lora_linear's mask for the same seed). Returns [..., out]. Differentiable in x, lora_A, lora_B,
    bias (and weight); adapters with no rows get zero gradients. reference.lora_linear_multi is the spec.
    weight may be a Weight4bit (one 4-bit base, many adapters), as for lora_linear.
    """
    w4 = weight if isinstance(weight, Weight4bit) else None
    if w4 is not None:  # the shared checks on a stand-in of the weight's shape (one element, expanded)
        weight = x.new_empty(()).expand(w4.shape) if isinstance(x, Tensor) else weight
    x, weight, bias, lora_A, lora_B, scalings, ids, ranks, dropouts = validation.check_multi_args(
        x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropout_p)
    if w4 is not None and w4.device != x.device:
        raise ValueError(f"the 4-bit weight must be on x's device {x.device}, got {w4.device}")
    # a seed whenever some adapter drops (under torch.compile, whenever training: reading a tensor's
    # values would break the graph, and a seed with nothing to drop costs nothing)
    if isinstance(dropout_p, (int, float)):
        some_dropout = dropout_p > 0.0
    else:
        some_dropout = torch.compiler.is_compiling() or bool(dropouts.any())
    seed = draw_seed(_seed_device(x)) if training and some_dropout else None
    x2d = _rows(x)
    drops = dropouts if seed is not None else None
    if w4 is not None:
        y, _ = lora_linear_multi_4bit_op(x2d, *w4.kernel_args(), bias, lora_A, lora_B, scalings, ids, ranks, drops,
                                         seed)
    else:
        y, _ = lora_linear_multi_op(x2d, weight, bias, lora_A, lora_B, scalings, ids, ranks, drops, seed)
    return _shaped(y, x)


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
    value is lost in the round trip). Later cycles do not add to it: unmerge
    subtracts exactly what merge added (tested over 1000 cycles). exact=True
    removes even that first-cycle error.
    Adapter tensors that share memory with weight are read from a copy.
    """
    scaling = validation.check_merge_args(weight, lora_A, lora_B, scaling)
    lora_A, lora_B = validation.unaliased(lora_A, weight), validation.unaliased(lora_B, weight)
    if exact:
        return merge_exact_(weight, lora_A, lora_B, scaling, safe)
    merge_op(weight, lora_A, lora_B, scaling, None, None, 0.0, safe)
    return None


@torch.no_grad()
def unmerge_(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, record: MergeRecord | None = None
) -> None:
    """weight -= scaling · lora_B @ lora_A, in place; with merge_'s record, restores it exactly."""
    scaling = validation.check_merge_args(weight, lora_A, lora_B, scaling)
    if record is not None:
        if not isinstance(record, MergeRecord):
            raise TypeError(f"record must be a MergeRecord from merge_(..., exact=True), got {type(record).__name__}")
        if record.shape != weight.shape or record.values.dtype != weight.dtype:
            raise ValueError(
                f"record was made for a {tuple(record.shape)} {record.values.dtype} weight, "
                f"got weight {tuple(weight.shape)} {weight.dtype}"
            )
    lora_A, lora_B = validation.unaliased(lora_A, weight), validation.unaliased(lora_B, weight)
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
    scaling = validation.check_merge_args(weight, lora_A, lora_B, scaling)
    validation.check_adapter(weight, new_A, new_B, "new_A", "new_B")
    validation.check_same_device("weight", weight, new_A=new_A, new_B=new_B)
    validation.check_adapter_dtype(weight, new_A, new_B, "weight", "new_A", "new_B")
    new_scaling = validation.check_scaling("new_scaling", new_scaling)
    new_A, new_B, lora_A, lora_B = (validation.unaliased(t, weight) for t in (new_A, new_B, lora_A, lora_B))
    merge_op(weight, new_A, new_B, new_scaling, lora_A, lora_B, scaling, safe)
