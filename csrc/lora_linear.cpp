// Fused LoRA linear, forward and backward:
//
//   forward   y  = bias + x W0ᵀ             one BLAS/cuBLAS GEMM writes y once
//             xa = drop(x) Aᵀ                [M, r]
//             y += s · xa Bᵀ                 accumulated into y: no [M, out] temporary
//   backward  gb = dy B                      [M, r]
//             dx = dy W0 + s (gb A) ⊙ mask/(1-p)
//             dA = s gbᵀ drop(x)
//             dB = s dyᵀ xa
//
// Every product is one BLAS (CPU) or cuBLAS (CUDA) call: on the machine
// measured, MKL's r-wide GEMMs beat register-blocked loops of our own
// (benchmarks/NOTES.md). With dropout, x and dx's LoRA term are masked in row
// blocks whose mask is regenerated from the seed (cpu/dropout.cpp, or the CUDA
// kernel in cuda/dropout.cu), so the only [M, in] tensors are x and dx.
//
// Rounding follows reference.py: s · xa Bᵀ is added to y in the GEMM's float32
// accumulator; for float16 inputs gb, the LoRA part of dx, dA and dB stay in float32
// and each result is rounded once, so a large scaling cannot overflow (or a small
// gradient underflow) a float16 intermediate. bfloat16, which has float32's range,
// rounds gb = s·dy B once to bfloat16 (after scaling) and keeps its fast 16-bit GEMMs:
// widening it too cost +50% of a bf16 train step on an AMX CPU (benchmarks/NOTES.md).
//
// Mixed precision (float32 lora_A/lora_B on a float16/bfloat16 x, PEFT's default):
// the LoRA branch is computed from x widened to float32 a row block at a time, xa
// is float32, s · xa Bᵀ is added to the 16-bit y block by block (one rounding), and
// dA, dB come back in float32. The base GEMMs stay 16-bit.
#include "fused_common.h"

#include <algorithm>
#include <vector>

namespace lora_kernels {
namespace fused {

void check_lora_args(const at::Tensor& x, const Base& base, const OptionalTensor& bias, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, double dropout_p) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  base.check(x);
  const int64_t out = base.out_features();
  LK_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), "lora_A must be [r, ", x.size(1),
           "], got ", lora_A.sizes());
  LK_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == lora_A.size(0),
           "lora_B must be [", out, ", ", lora_A.size(0), "], got ", lora_B.sizes());
  if (is_mixed(x, lora_A)) {
    check_same(lora_B, "lora_B", lora_A, "lora_A");
    LK_CHECK(lora_A.device() == x.device(), "lora_A must be on x's device ", x.device(), ", got ", lora_A.device());
  } else {
    check_same(lora_A, "lora_A", x);
    check_same(lora_B, "lora_B", x);
  }
  if (bias.has_value()) {
    LK_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be [", out, "], got ", bias->sizes());
    check_same(*bias, "bias", x);
  }
  LK_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

at::Tensor base_forward(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias) {
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0) return y;
  if (bias.has_value()) {
    at::addmm_out(y, *bias, x, weight.t());
  } else {
    at::mm_out(y, x, weight.t());
  }
  return y;
}

void add_lora_forward(const DeviceParts& device, const at::Tensor& x, at::Tensor y, at::Tensor xa,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                      int64_t seed, int64_t row0) {
  const int64_t M = x.size(0);
  if (M == 0) return;
  const SerialCalls serial(device.serial_lora(M, std::max(x.size(1), y.size(1)), lora_A.size(0)));
  const bool mixed = is_mixed(x, lora_A);
  if (dropout_p == 0.0 && !mixed) {
    at::mm_out(xa, x, lora_A.t());
  } else {
    // Row blocks: the dropout mask and, when mixed, x widened to float32 exist a block at a time (on the
    // CPU, the blocks of one call in one parallel region: see DeviceParts::threaded_blocks).
    const int64_t block = device.block_rows(mixed ? std::max(x.size(1), y.size(1)) : x.size(1));
    const int64_t blocks = (M + block - 1) / block;
    for_block_shares(device, blocks, [&](int64_t first, int64_t end, int64_t) {
      for (int64_t b = first; b < end; ++b) {
        const int64_t m0 = b * block, rows = std::min(block, M - m0);
        at::Tensor x_rows = x.narrow(0, m0, rows);
        if (dropout_p != 0.0) x_rows = x_rows.mul(device.mask_rows(x, row0 + m0, rows, dropout_p, seed));
        at::Tensor xa_rows = xa.narrow(0, m0, rows);
        at::mm_out(xa_rows, x_rows.to(lora_A.scalar_type()), lora_A.t());
        if (mixed) y.narrow(0, m0, rows).add_(scaled_mm(xa_rows, lora_B.t(), scaling));  // one rounding into y
      }
    });
  }
  if (mixed) return;
  if (scaling != 0.0) {
    // alpha = s is applied to the float32 accumulator (BLAS / cuBLAS), before y is rounded.
    y.addmm_(xa, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  } else {
    y.add_(scaled_mm(xa, lora_B.t(), 0.0));  // alpha = 0 would let BLAS skip NaN/Inf (see scaled_mm)
  }
}

void check_gain(const OptionalTensor& gain, const at::Tensor& x, const at::Tensor& lora_A, int64_t out) {
  if (!gain.has_value()) return;
  LK_CHECK(gain->dim() == 1 && gain->size(0) == out, "gain must be [", out, "], got ", gain->sizes());
  LK_CHECK(gain->device() == x.device(), "gain must be on x's device ", x.device(), ", got ", gain->device());
  LK_CHECK(at::isFloatingType(gain->scalar_type()), "gain must be floating point, got ", gain->scalar_type());
  LK_CHECK(!is_mixed(x, lora_A), "a gain needs lora_A and lora_B in x's dtype ", x.scalar_type(), ", got ",
           lora_A.scalar_type());
}

at::Tensor apply_gain(at::Tensor y, const at::Tensor& gain, const OptionalTensor& bias) {
  // The same ATen op as the dora_gain op's epilogue in Python (AtenGain.dora_gained), so the bits are the same
  // whichever of the two runs it; here it saves a decode step a Python call and a dispatch.
  if (gain.scalar_type() == y.scalar_type()) {
    return bias.has_value() ? at::addcmul_out(y, *bias, y, gain) : y.mul_(gain);
  }
  return (bias.has_value() ? at::addcmul(*bias, y, gain) : y * gain).to(y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> fused_forward(const DeviceParts& device, const at::Tensor& x,
                                                 const at::Tensor& weight, const OptionalTensor& bias,
                                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                 double scaling, double dropout_p, int64_t seed,
                                                 const OptionalTensor& gain) {
  check_lora_args(x, Base{weight}, bias, lora_A, lora_B, dropout_p);
  check_gain(gain, x, lora_A, weight.size(0));
  at::Tensor y = base_forward(x, weight, gain.has_value() ? OptionalTensor() : bias);
  at::Tensor xa = at::empty({x.size(0), lora_A.size(0)}, lora_A.options());
  add_lora_forward(device, x, y, xa, lora_A, lora_B, scaling, dropout_p, seed, 0);
  if (gain.has_value()) y = apply_gain(y, *gain, bias);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor> lora_backward(const DeviceParts& device, const at::Tensor& grad_y,
                                                 const at::Tensor& x, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
                                                 double dropout_p, int64_t seed, int64_t row0, at::Tensor dx) {
  const int64_t M = x.size(0);
  const bool need_dx = dx.defined();
  const SerialCalls serial(device.serial_lora(M, std::max(x.size(1), grad_y.size(1)), lora_A.size(0)));
  // float16 keeps gb, dB and dx's LoRA term in float32 (s·dy B easily leaves its range);
  // bfloat16 has float32's range, so gb = s·dy B is rounded once to bfloat16 by the
  // GEMM itself (alpha = s), like any bf16 operand, and the fast 16-bit GEMMs stay.
  // float32 adapters (mixed) take the float32 path for every LoRA product.
  const bool widen = x.scalar_type() == at::kHalf || is_mixed(x, lora_A);
  const auto acc = widen ? at::kFloat : x.scalar_type();

  if (dropout_p == 0.0 && !widen) {
    at::Tensor dB = scaled_mm(grad_y.t(), xa, scaling);          // [out, r]
    at::Tensor gb_scaled = scaled_mm(grad_y, lora_B, scaling);  // s · dy B   [M, r]
    at::Tensor dA = at::mm(gb_scaled.t(), x);
    if (need_dx && M > 0) dx.addmm_(gb_scaled, lora_A);
    return {dA, dB};
  }

  // Row blocks: each block's dropout mask is regenerated once and serves dA (masked
  // x) and dx (masked LoRA term); float16 inputs are widened a block at a time. dA
  // accumulates over blocks in float32 for 16-bit inputs, rounded once at the end. On the CPU the
  // blocks run in one parallel region, in fixed shares with a partial dA (and dB) each, added in
  // share order: the same result whatever the number of threads.
  const at::Tensor lora_A_acc = lora_A.to(acc), lora_B_acc = lora_B.to(acc);
  const bool sixteen_bit = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto dA_type = sixteen_bit ? at::kFloat : x.scalar_type();
  const int64_t block = device.block_rows(std::max(x.size(1), widen ? grad_y.size(1) : 0));
  const int64_t blocks = (M + block - 1) / block;
  const int64_t shares = block_shares(device, blocks);
  // A share's partial sums are written by its first block (beta = 0 into an empty tensor: zero-filling [r, in]
  // would be one more parallel region per call, a wait for every thread on a busy machine); no rows: zeros.
  auto partial = [&](at::IntArrayRef sizes, at::ScalarType dtype) {
    return blocks == 0 ? at::zeros(sizes, x.options().dtype(dtype)) : at::empty(sizes, x.options().dtype(dtype));
  };
  at::Tensor dB = widen ? partial(lora_B.sizes(), acc) : scaled_mm(grad_y.t(), xa, scaling);
  std::vector<at::Tensor> dA_parts(shares), dB_parts(shares);
  for (int64_t share = 0; share < shares; ++share) {
    dA_parts[share] = partial(lora_A.sizes(), dA_type);
    dB_parts[share] = share == 0 || !widen ? dB : partial(lora_B.sizes(), acc);
  }
  for_block_shares(device, blocks, [&](int64_t first, int64_t end, int64_t share) {
    at::Tensor& dA_part = dA_parts[share];
    at::Tensor& dB_part = dB_parts[share];
    for (int64_t b = first; b < end; ++b) {
      const int64_t m0 = b * block, rows = std::min(block, M - m0);
      const double beta = b == first ? 0.0 : 1.0;  // the share's first block writes its partial sums
      const at::Tensor grad_y_rows = grad_y.narrow(0, m0, rows).to(acc);
      const at::Tensor gb_rows = scaled_mm(grad_y_rows, lora_B_acc, scaling);  // s · dy B
      if (widen) dB_part.addmm_(grad_y_rows.t(), xa.narrow(0, m0, rows).to(acc), beta);
      at::Tensor x_rows = x.narrow(0, m0, rows);
      at::Tensor mask;
      if (dropout_p != 0.0) {
        mask = device.mask_rows(x, row0 + m0, rows, dropout_p, seed);
        x_rows = x_rows.mul(mask);  // float32 for 16-bit x (type promotion with the float32 mask)
      }
      dA_part.addmm_(gb_rows.t().to(dA_type), x_rows.to(dA_type), beta);
      if (need_dx) {
        at::Tensor dx_rows = dx.narrow(0, m0, rows);
        const at::Tensor lora_rows = at::mm(gb_rows, lora_A_acc);
        // in place into dx's dtype: the sum is rounded once
        if (mask.defined()) {
          dx_rows.addcmul_(lora_rows, mask);
        } else {
          dx_rows.add_(lora_rows);
        }
      }
    }
  });
  at::Tensor dA = dA_parts[0];
  for (int64_t share = 1; share < shares; ++share) {
    dA.add_(dA_parts[share]);
    if (widen) dB.add_(dB_parts[share]);
  }
  if (widen) dB.mul_(scaling);
  return {dA.to(lora_A.scalar_type()), dB.to(lora_B.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const DeviceParts& device, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    double dropout_p, int64_t seed, bool need_dx) {
  check_lora_args(x, Base{weight}, c10::nullopt, lora_A, lora_B, dropout_p);
  LK_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0),
           "grad_y must be [", x.size(0), ", ", weight.size(0), "], got ", grad_y.sizes());
  LK_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0),
           "xa must be [", x.size(0), ", ", lora_A.size(0), "], got ", xa.sizes());
  check_same(grad_y, "grad_y", x);
  check_same(xa, "xa", lora_A, "lora_A");
  at::Tensor dx = need_dx ? at::mm(grad_y, weight) : at::Tensor();
  auto [dA, dB] = lora_backward(device, grad_y, x, lora_A, lora_B, xa, scaling, dropout_p, seed, 0, dx);
  return {need_dx ? dx : at::empty({0}, x.options()), dA, dB};
}

at::Tensor dropout_mask_of(const DeviceParts& device, const at::Tensor& x, double dropout_p, int64_t seed) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  LK_CHECK(dropout_p > 0.0 && dropout_p < 1.0, "dropout_p must be in (0, 1), got ", dropout_p);
  return device.dropout_mask(0, x.size(0), x.size(1), dropout_p, seed, x.options());
}

}  // namespace fused

at::Tensor dropout_mask_of_cpu(const at::Tensor& x, double dropout_p, int64_t seed) {
  return fused::dropout_mask_of(fused::kCpu, x, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const OptionalTensor& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     int64_t seed, const OptionalTensor& gain) {
  return fused::fused_forward(fused::kCpu, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gain);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed, bool need_dx) {
  return fused::fused_backward(fused::kCpu, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx);
}

#ifdef LORA_KERNELS_WITH_CUDA
at::Tensor dropout_mask_of_cuda(const at::Tensor& x, double dropout_p, int64_t seed) {
  return fused::dropout_mask_of(fused::kCuda, x, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const OptionalTensor& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, double scaling, double dropout_p,
                                                      int64_t seed, const OptionalTensor& gain) {
  return fused::fused_forward(fused::kCuda, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gain);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed, bool need_dx) {
  return fused::fused_backward(fused::kCuda, grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx);
}
#endif

}  // namespace lora_kernels
