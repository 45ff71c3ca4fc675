"""A roofline model of lora_linear's two GPU paths: what each kernel launches, moves and computes.

    predict("triton", M, out, in, r)      -> Prediction (microseconds, kernels)
    predict("cuda", M, out, in, r, train=True)
    predict_dora("cuda", M, out, in, r, train=True, dropout=True)   dora_linear as built (ops/dora_linear.py)
    predict_4bit("triton", M, out, in, r, train=True)   lora_linear_4bit (QLoRA): W0 in bitsandbytes' NF4 layout

Paths: "triton" (this package's fused kernels: the launchers' own grids and tiles), "cuda" (the C++
backend's cuBLAS composition: addmm + two skinny GEMMs), and, for comparison, "peft" (PEFT's layer: base,
lora_A, lora_B, scale, add) and "base" (F.linear; its train step is F.linear + dx = dy W0, the weight being
frozen). Each kernel is a (launches, bytes from HBM, tensor-core flops, float32 flops, programs, bytes in flight
per program) record; its time is

    max(flops / (peak · efficiency), bytes / bandwidth) + launch gap,   bandwidth = min(HBM, programs resident ·
                                                                                  bytes in flight / latency)

so a kernel with too few programs (a 32-program shrink) is latency-bound, as on hardware. Bytes count each
operand once from HBM (tiles re-read by other programs come from L2: the grouped tile order and the small
adapters keep them there). No GPU has measured any of this: the efficiencies below are assumptions (cuBLAS at
75 % of the dense peak, Triton's non-persistent GEMM at 65 %), and the first GPU run (benchmarks/gpu_check.py)
prints its measurements next to these predictions. benchmarks/cost_model.py prints the table; `auto` uses
predict() to choose a path per shape until a measured table exists (lora_kernels/gpu_paths.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Device:
    """The numbers the model needs of a GPU."""

    name: str
    dense_tflops: float  # 16-bit tensor cores, dense
    tf32_tflops: float  # TF32 tensor cores, dense (three of them per float32 product: see triton_common.dot)
    hbm_tb_s: float  # usable HBM bandwidth
    sms: int
    latency_us: float = 1.0  # from a load's issue to its data, HBM under load
    launch_gap_us: float = 1.0  # between two back-to-back kernels on one stream (GPU time, not host time)
    cublas_efficiency: float = 0.75
    triton_efficiency: float = 0.65
    resident_programs_per_sm: int = 1  # the large tiles here fill an SM's shared memory
    alu_tops: float = 33.4  # scalar lane-operations per second (10^12): 132 SMs x 128 lanes x 1.98 GHz


H200 = Device("H200 (model)", dense_tflops=989.0, tf32_tflops=494.0, hbm_tb_s=4.1, sms=132)


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float = 0.0  # on 16-bit tensor cores
    tf32x3_flops: float = 0.0  # float32 products as three TF32 products
    programs: int | None = None  # None: a library kernel that fills the GPU
    inflight_bytes: float = 0.0  # per program: its pipelined loads (stages × tile bytes)
    library: bool = False  # cuBLAS (its efficiency) or ours (Triton's)
    alu_ops: float = 0.0  # lane-operations outside the tensor cores (dequantizing 4-bit tiles)
    alu_overlaps: bool = False  # they run while the asynchronous MMA does (else after it)

    def time_us(self, device: Device) -> float:
        efficiency = device.cublas_efficiency if self.library else device.triton_efficiency
        compute_s = self.flops / (device.dense_tflops * 1e12 * efficiency)
        compute_s += 3 * self.tf32x3_flops / (device.tf32_tflops * 1e12 * efficiency)
        # The 4-bit large-M GEMMs hand the dequantized tile to wgmma in registers and wait for one MMA group
        # less than they issue (wait_group 1), so the next tile's dequantization runs under the MMA: the larger
        # of the two counts. Decode's mma.sync tiles go through shared memory: the two add.
        alu_s = self.alu_ops / (device.alu_tops * 1e12)
        compute_s = max(compute_s, alu_s) if self.alu_overlaps else compute_s + alu_s
        bandwidth = device.hbm_tb_s * 1e12
        if self.programs is not None:
            if self.flops:  # a tiled kernel: the last wave runs part-empty
                waves = self.programs / device.sms
                compute_s *= math.ceil(waves) / waves
            resident = min(self.programs, device.sms * device.resident_programs_per_sm)
            bandwidth = min(bandwidth, resident * self.inflight_bytes / (device.latency_us * 1e-6))
        return max(compute_s, self.bytes / bandwidth) * 1e6 + device.launch_gap_us


@dataclass
class Prediction:
    path: str
    kernels: list[Kernel] = field(default_factory=list)
    device: Device = H200

    @property
    def us(self) -> float:
        return sum(k.time_us(self.device) for k in self.kernels)

    @property
    def launches(self) -> int:
        return len(self.kernels)

    @property
    def megabytes(self) -> float:
        return sum(k.bytes for k in self.kernels) / 1e6

    @property
    def gflops(self) -> float:
        return sum(k.flops + k.tf32x3_flops for k in self.kernels) / 1e9


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _meta(*shape, element_bytes: int = 2):
    import torch

    dtype = {2: torch.bfloat16, 4: torch.float32}[element_bytes]
    return torch.empty(*shape, dtype=dtype, device="meta")


def _tiles(launch) -> tuple[int, dict]:
    """(programs, tile sizes and stages) of a launcher's *_launch_args result; for an autotuned kernel, its first
    config the pruner keeps (the autotuner's pick is only known on a GPU)."""
    from .ops.triton_common import fitting_configs

    kernel, grid, args, flags = launch
    tiles = dict(flags)
    if hasattr(kernel, "configs"):
        names = kernel.fn.arg_names
        config = fitting_configs(kernel.gpu_configs, dict(zip(names, args)), **flags)[0]
        tiles.update(config.kwargs, num_stages=config.num_stages)
        grid = grid(tiles)
    tiles.setdefault("num_stages", 3)  # Triton's default on NVIDIA GPUs
    return math.prod(grid), tiles


# A 4-bit weight (bitsandbytes' NF4, blocksize 64, double quantization): bytes per element from HBM, and the
# instructions per lane to dequantize one element, counted in the sm_90 SASS (cuobjdump -sass, Triton 3.8.0,
# 2026-12-03) of each kernel's K loop less the 16-bit kernel's loop in the same config: the swapped large-M GEMM
# (128×128×64) 11.8, the decode (16×16×256; its tile goes through shared memory to the MMA) 17.8, and the
# whole-weight dequantization kernel 12.8 (all its instructions). Issued at one per lane per clock (alu_tops).
W4_BYTES = 0.516
DEQUANT_OPS = {"gemm": 12, "decode": 18, "whole": 13}


def _w_operand(lin, w, w4: bool, transposed: bool):
    """(w_kn, launcher keywords, W0's bytes per element) of the fused GEMM on a dense or a 4-bit W0 [N, K]."""
    if not w4:
        return (w.t() if transposed else w), {}, w.element_size()
    from .weight4bit import empty_kernel_args

    return None, dict(w4=empty_kernel_args(*w.shape, device="meta"), w4_transposed=transposed), W4_BYTES


def _triton_forward(M, N, K, R, e, ea, w4=False):
    from .ops import triton_lora_linear as lin
    from .ops.triton_common import as_launched_on_gpu

    with as_launched_on_gpu():
        return _triton_forward_kernels(lin, M, N, K, R, e, ea, w4)


def _triton_forward_kernels(lin, M, N, K, R, e, ea, w4=False):
    x, w, y = _meta(M, K, element_bytes=e), _meta(N, K, element_bytes=e), _meta(M, N, element_bytes=e)
    A, B, xa, bias = (_meta(R, K, element_bytes=ea), _meta(N, R, element_bytes=ea), _meta(M, R, element_bytes=ea),
                      _meta(N, element_bytes=e))
    w_kn, w4_args, ew = _w_operand(lin, w, w4, transposed=True)
    if M <= lin.DECODE_MAX_M:  # one launch: W0 streamed once, the shrink in its K loop (K split: two launches)
        from .gpu_paths import decode_splits

        return _decode_kernels(lin, M, N, K, R, e, ea, w4, decode_splits(M, N, K, R, w4, H200.sms))
    programs, t = _tiles(lin.shrink_launch_args(x, A.t(), xa, 0.0, None))
    shrink = Kernel("shrink xa", M * K * e + K * R * ea + M * R * ea, flops=2 * M * K * R, programs=programs,
                    inflight_bytes=t["num_stages"] * (t["BLOCK_M"] + t["BLOCK_R"]) * t["BLOCK_K"] * e)
    programs, t = _tiles(lin.fused_gemm_launch_args(x, w_kn, bias, xa, B.t(), None, y, 2.0, 0.0, None,
                                                    shrink_in_loop=False, dropout_epilogue=False, **w4_args))
    gemm = Kernel("fused GEMM y", M * K * e + N * K * ew + M * N * e + M * R * ea + N * R * ea + N * e,
                  flops=2 * M * N * K + 2 * M * N * R, programs=programs,
                  # every row block of the grid dequantizes every W0 tile it reads
                  alu_ops=DEQUANT_OPS["gemm"] * N * K * _cdiv(M, t["BLOCK_M"]) if w4 else 0.0, alu_overlaps=True,
                  inflight_bytes=t["num_stages"] * (t["BLOCK_M"] * e + t["BLOCK_N"] * ew) * t["BLOCK_K"])
    return [shrink, gemm]


def _decode_kernels(lin, M, N, K, R, e, ea, w4: bool, splits: int) -> list[Kernel]:
    """The decode launch (M <= 16), its K in `splits` slices (then the finish launch that adds them)."""
    from .ops.triton_common import block_r

    x, w, y = _meta(M, K, element_bytes=e), _meta(N, K, element_bytes=e), _meta(M, N, element_bytes=e)
    A, B, xa, bias = (_meta(R, K, element_bytes=ea), _meta(N, R, element_bytes=ea), _meta(M, R, element_bytes=ea),
                      _meta(N, element_bytes=e))
    w_kn, w4_args, ew = _w_operand(lin, w, w4, transposed=True)
    part = dict(part=_meta(splits, M, N, element_bytes=4), part_l=_meta(splits, M, block_r(R), element_bytes=4))
    programs, t = _tiles(lin.fused_gemm_launch_args(x, w_kn, bias, xa, B.t(), A.t(), y, 2.0, 0.0, None,
                                                    shrink_in_loop=True, dropout_epilogue=False, **w4_args,
                                                    **(part if splits > 1 else {})))
    kernels = [Kernel("decode (fused)" + (f", K in {splits} slices" if splits > 1 else ""),
                      N * K * ew + M * K * e + (K + N) * R * ea + (splits * M * N * 4 if splits > 1 else M * N * e),
                      flops=2 * M * N * K + 4 * M * N * R, programs=programs,
                      alu_ops=DEQUANT_OPS["decode"] * N * K if w4 else 0.0,
                      inflight_bytes=t["num_stages"] * (t["BLOCK_N"] * ew + t["BLOCK_M"] * e) * t["BLOCK_K"])]
    if splits > 1:
        programs, t = _tiles(lin.split_finish_launch_args(part["part"], part["part_l"], bias, xa, B.t(), y, 2.0, 0.0))
        kernels.append(Kernel("split decode finish", splits * M * N * 4 + N * R * ea + M * N * e, flops=2 * M * N * R,
                              programs=programs, inflight_bytes=splits * t["BLOCK_M"] * t["BLOCK_N"] * 4))
    return kernels


def decode_us(M: int, N: int, K: int, r: int, w4: bool, splits: int, element_bytes: int = 2,
              device: Device = H200) -> float:
    """The predicted microseconds of one decode forward (16-bit x and adapters) with K in `splits` slices."""
    from .ops import triton_lora_linear as lin
    from .ops.triton_common import as_launched_on_gpu

    with as_launched_on_gpu():
        kernels = _decode_kernels(lin, M, N, K, r, element_bytes, element_bytes, w4, splits)
    return sum(k.time_us(device) for k in kernels)


def _triton_backward(M, N, K, R, e, ea, w4=False):
    from .ops import triton_lora_linear as lin
    from .ops.triton_common import as_launched_on_gpu

    with as_launched_on_gpu():
        return _triton_backward_kernels(lin, M, N, K, R, e, ea, w4)


def _triton_backward_kernels(lin, M, N, K, R, e, ea, w4=False):
    from .ops.triton_common import full_precision

    x, w, dy, dx = (_meta(M, K, element_bytes=e), _meta(N, K, element_bytes=e), _meta(M, N, element_bytes=e),
                    _meta(M, K, element_bytes=e))
    A, B, xa, gb = (_meta(R, K, element_bytes=ea), _meta(N, R, element_bytes=ea), _meta(M, R, element_bytes=ea),
                    _meta(M, R, element_bytes=4))
    programs, t = _tiles(lin.shrink_launch_args(dy, B, gb, 0.0, None))
    kernels = [Kernel("shrink gb = dy B", M * N * e + N * R * ea + M * R * 4, flops=2 * M * N * R, programs=programs,
                      inflight_bytes=t["num_stages"] * (t["BLOCK_M"] + t["BLOCK_R"]) * t["BLOCK_K"] * e)]
    for name, g, q, out in (("dA", gb, x, A), ("dB", xa, dy, B.t())):
        cols = q.shape[1]
        full = full_precision(g, q)
        splits, rows_per_split = lin.weight_grad_splits(M, cols, 4 * H200.sms, full)
        part = _meta(splits, R, cols, element_bytes=4)
        programs, t = _tiles(lin.weight_grad_launch_args(g, q, part, rows_per_split, 0.0, None))
        product = dict(tf32x3_flops=2 * M * cols * R) if full else dict(flops=2 * M * cols * R)
        g_bytes = g.element_size()
        kernels.append(Kernel(f"weight grad {name}", M * cols * e + M * R * g_bytes + splits * R * cols * 4,
                              programs=programs, **product,
                              inflight_bytes=t["num_stages"] * t["BLOCK_M"] * (t["BLOCK_N"] * e + R * g_bytes)))
        programs, t = _tiles(lin.finish_launch_args(part, out, 2.0, 1.0))
        kernels.append(Kernel(f"finish {name}", splits * R * cols * 4 + R * cols * ea, programs=programs,
                              inflight_bytes=t["SPLIT_CHUNK"] * t["BLOCK"] * 4))
    w_op, w4_args, ew = _w_operand(lin, w, w4, transposed=False)
    programs, t = _tiles(lin.fused_gemm_launch_args(dy, w_op, None, gb, A, None, dx, 2.0, 0.0, None,
                                                    shrink_in_loop=False, dropout_epilogue=True, **w4_args))
    kernels.append(Kernel("fused GEMM dx", M * N * e + N * K * ew + M * K * e + M * R * 4 + K * R * ea,
                          flops=2 * M * N * K, tf32x3_flops=2 * M * K * R, programs=programs,
                          alu_ops=DEQUANT_OPS["gemm"] * N * K * _cdiv(M, t["BLOCK_M"]) if w4 else 0.0, alu_overlaps=True,
                          inflight_bytes=t["num_stages"] * (t["BLOCK_M"] * e + t["BLOCK_N"] * ew) * t["BLOCK_K"]))
    return kernels


def _gemm(name, m, n, k, a_bytes, b_bytes, c_bytes, accumulate=False):
    """A library GEMM C[m, n] (+)= A[m, k] B[k, n]: each operand once from HBM, C read too when accumulated."""
    return Kernel(name, m * k * a_bytes + k * n * b_bytes + m * n * c_bytes * (2 if accumulate else 1),
                  flops=2 * m * n * k, library=True)


def _cuda_forward(M, N, K, R, e, ea):
    return [_gemm("cuBLAS addmm y = b + x W0ᵀ", M, N, K, e, e, e), _gemm("cuBLAS xa = x Aᵀ", M, R, K, e, ea, ea),
            _gemm("cuBLAS y += s·xa Bᵀ", M, N, R, ea, ea, e, accumulate=True)]


def _cuda_backward(M, N, K, R, e, ea):
    return [_gemm("cuBLAS dB = s·dyᵀ xa", N, R, M, e, ea, ea), _gemm("cuBLAS gb = s·dy B", M, R, N, e, ea, ea),
            _gemm("cuBLAS dA = gbᵀ x", R, K, M, ea, e, ea), _gemm("cuBLAS dx = dy W0", M, K, N, e, e, e),
            _gemm("cuBLAS dx += gb A", M, K, R, ea, ea, e, accumulate=True)]


def _peft_forward(M, N, K, R, e, ea):
    return [_gemm("F.linear", M, N, K, e, e, e), _gemm("lora_A", M, R, K, e, ea, ea),
            _gemm("lora_B", M, N, R, ea, ea, e), Kernel("* scaling", 2 * M * N * e, library=True),
            Kernel("result + lora", 3 * M * N * e, library=True)]


def _base_forward(M, N, K, R, e, ea):
    return [_gemm("F.linear", M, N, K, e, e, e)]


def _base_backward(M, N, K, R, e, ea):
    return [_gemm("dx = dy W0", M, K, N, e, e, e)]


_PATHS = {"triton": (_triton_forward, _triton_backward), "cuda": (_cuda_forward, _cuda_backward),
          "base": (_base_forward, _base_backward), "peft": (_peft_forward, None)}
PATHS = tuple(_PATHS)


def predict(path: str, M: int, out_features: int, in_features: int, r: int, train: bool = False,
            element_bytes: int = 2, adapter_bytes: int | None = None, device: Device = H200) -> Prediction:
    """The predicted GPU time of one forward (train: forward + backward) of a LoRA linear [M, in] -> [M, out]
    of rank r on `path`, without dropout. PEFT's backward is not modelled (autograd's choice of kernels)."""
    forward, backward = _PATHS[path]
    shape = (M, out_features, in_features, r, element_bytes, adapter_bytes or element_bytes)
    kernels = list(forward(*shape))
    if train:
        if backward is None:
            raise ValueError(f"the model has no backward for path {path!r}")
        kernels += backward(*shape)
    return Prediction(path, kernels, device)


def step_us(step: str, path: str, M: int, out_features: int, in_features: int, r: int) -> float:
    """The predicted microseconds of one "forward" or one "backward" (a train step less its forward)."""
    forward = predict(path, M, out_features, in_features, r).us
    if step == "forward":
        return forward
    return predict(path, M, out_features, in_features, r, train=True).us - forward


# ---- DoRA (ops/dora_linear.py as built: the LoRA path's kernels, the gain in the Triton GEMMs' epilogue or in
# ops/triton_dora.py's one pass after cuBLAS, and ops/triton_dora.py's backward epilogue) -------------------------

def _elementwise(name: str, elements: int, bytes_per_element: float) -> Kernel:
    """An ATen elementwise kernel (or reduction) over `elements`, moving bytes_per_element each."""
    return Kernel(name, elements * bytes_per_element, library=True)


def _dora_extra(M, N, K, R, e, train: bool, dropout: bool, gain_in_gemm: bool) -> list[Kernel]:
    """What dora_linear adds to the LoRA op: the row norm (training: A and B changed since the last step), the gain
    y = g ⊙ z + b (gain_in_gemm: in the GEMM's epilogue, counted there by predict_dora; else ops/triton_dora.py's
    pass: z read, y written), with dropout the mask, x̃ and the second product x W0ᵀ (as the LoRA op on x̃ plus a
    GEMM: the stacked product [x; x̃] W0ᵀ has the same flops and bytes); in the backward g ⊙ dy with the row sums
    of dy ⊙ z for dm (one pass over dy and z) and, with dropout, ((1 − g) ⊙ dy) W0 masked."""
    f32 = 4
    kernels = []
    if train:
        kernels += [_gemm("norm: W0 Aᵀ", N, R, K, e, e, f32), Kernel("norm: [out] terms", 12 * N * f32, library=True)]
    if dropout:
        kernels += [_elementwise("dropout mask", M * K, f32), _elementwise("x̃ = x ⊙ mask", M * K, 2 * e + f32),
                    _gemm("x W0ᵀ (second product)", M, N, K, e, e, e),
                    _elementwise("y = P + (g−1) z + s·xa Bᵀ (fp32)", M * N, 2 * e + 3 * f32 + e)]
    elif not gain_in_gemm:
        kernels.append(_elementwise("g ⊙ z + b (Triton, one pass)", M * N, 2 * e))
    if train:
        kernels += [_elementwise("g ⊙ dy, Σ dy ⊙ z (Triton, one pass)", M * N, 3 * e),
                    Kernel("Σ row blocks (dm)", _cdiv(M, 32) * N * f32 + N * f32, library=True)]
        if dropout:
            kernels += [_elementwise("dropout mask", M * K, f32), _elementwise("(1 − g) ⊙ dy (Triton)", M * N, 2 * e),
                        _gemm("((1 − g) dy) W0", M, K, N, e, e, e),
                        _elementwise("dx += (1 − mask) ⊙ ... (fp32)", M * K, 2 * e + 3 * f32 + e)]
    return kernels


def predict_dora(path: str, M: int, out_features: int, in_features: int, r: int, train: bool = False,
                 dropout: bool = False, element_bytes: int = 2, device: Device = H200) -> Prediction:
    """The predicted GPU time of dora_linear (16-bit tensors and adapters) on a LoRA path ("triton" or "cuda"):
    the LoRA op's kernels (with dropout, on x̃) plus _dora_extra. On the triton path without dropout the gain is in
    the GEMM's epilogue: the kernel that writes y reads g and, in training, also writes z. Unmeasured, like
    everything here."""
    lora = predict(path, M, out_features, in_features, r, train, element_bytes, device=device)
    kernels = list(lora.kernels)
    gain_in_gemm = path == "triton" and not dropout
    if gain_in_gemm:
        writes_y = len(predict(path, M, out_features, in_features, r, False, element_bytes, device=device).kernels) - 1
        epilogue = out_features * 4 + (M * out_features * element_bytes if train else 0)
        gemm = kernels[writes_y]
        kernels[writes_y] = replace(gemm, name=gemm.name + (" + gain, z" if train else " + gain"),
                                    bytes=gemm.bytes + epilogue)
    extra = _dora_extra(M, out_features, in_features, r, element_bytes, train, dropout, gain_in_gemm)
    return Prediction(f"dora on {path}", kernels + extra, device)


# ---- QLoRA (lora_linear_4bit): W0 in bitsandbytes' 4-bit layout ------------------------------------------------

def _dequantize(N: int, K: int, e: int) -> Kernel:
    """W0 dequantized whole into a 16-bit temporary (ops/triton_lora_linear.dequantize_4bit, or bitsandbytes')."""
    return Kernel("dequantize W0 (whole)", N * K * (W4_BYTES + e), alu_ops=DEQUANT_OPS["whole"] * N * K, library=True)


def predict_4bit(path: str, M: int, out_features: int, in_features: int, r: int, train: bool = False,
                 element_bytes: int = 2, device: Device = H200) -> Prediction:
    """The predicted GPU time of lora_linear_4bit (16-bit x and adapters, an NF4 W0) on a path of PATHS_4BIT:
    "fused" (the fused GEMMs dequantizing W0's tiles in their K loops), "dequantize+triton" (W0 dequantized whole
    by our kernel, in the forward and again in the backward, then the 16-bit fused kernels: the triton backend's
    other path), "dequantize+cuda" (the same with the cuBLAS composition: bitsandbytes' and PEFT's way) and "base"
    (bf16 F.linear on the dequantized weight, the targets' yardstick). Unmeasured, like everything here."""
    shape = (M, out_features, in_features, r, element_bytes, element_bytes)
    dequant = _dequantize(out_features, in_features, element_bytes)
    if path == "fused":
        kernels = _triton_forward(*shape, w4=True) + (_triton_backward(*shape, w4=True) if train else [])
    elif path in ("dequantize+triton", "dequantize+cuda"):
        forward, backward = _PATHS[path.split("+")[1]]
        kernels = [dequant] + forward(*shape) + ([dequant] + backward(*shape) if train else [])
    elif path == "base":
        kernels = _base_forward(*shape) + (_base_backward(*shape) if train else [])
    else:
        raise ValueError(f"unknown 4-bit path {path!r}: one of {', '.join(PATHS_4BIT)}")
    return Prediction(path, kernels, device)


PATHS_4BIT = ("fused", "dequantize+triton", "dequantize+cuda", "base")


def step_us_4bit(step: str, path: str, M: int, out_features: int, in_features: int, r: int) -> float:
    """The predicted microseconds of one "forward" or one "backward" of lora_linear_4bit on `path`."""
    forward = predict_4bit(path, M, out_features, in_features, r).us
    if step == "forward":
        return forward
    return predict_4bit(path, M, out_features, in_features, r, train=True).us - forward
