// What the fused LoRA ops (lora_linear.cpp, lora_linear_multi.cpp) share: the per-device
// parts (dropout mask generator, row-block size), the scaled GEMM, the argument checks
// and the single-adapter op itself, which the multi-adapter op runs for a batch on one adapter.
#pragma once

#include "cpu/parallel.h"
#include "lora_kernels.h"

#include <algorithm>
#include <tuple>

namespace lora_kernels {
namespace fused {

// What differs between the CPU and CUDA versions of the op: the dropout mask
// generator, and the size of the row blocks that the blocked paths work on
// (~256 KB of float32 on CPU, so that a block stays in L2 between its uses; ~64 MB
// on CUDA, enough to keep cuBLAS busy; either way small next to the [M, in] copy
// of x they avoid).
struct DeviceParts {
  at::Tensor (*dropout_mask)(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed,
                             at::TensorOptions options);
  int64_t block_bytes;
  // CPU: the row blocks are shared out over the threads in one parallel region, each block worked by one
  // thread (the ATen and BLAS calls inside then run single-threaded). Three parallel regions per block
  // (mask, multiply, GEMM) made a call wait ~130 times for every thread: on a busy machine, a descheduled
  // one each time (issue 18: 5.8x slower with other processes running, PEFT only in proportion).
  bool threaded_blocks;

  // Whether the LoRA branch's products for `rows` rows of width `width` (in or out) and rank r are small enough
  // to run on the calling thread alone (SerialCalls): on the CPU, up to 4M multiply-adds each (~0.1 ms on one
  // core), where a parallel region's end costs more than the second thread saves as soon as the machine is busy.
  bool serial_lora(int64_t rows, int64_t width, int64_t r) const {
    return threaded_blocks && rows * width * r <= (int64_t{1} << 22);
  }

  // Rows per block when the widest row involved has `width` elements.
  int64_t block_rows(int64_t width) const {
    return std::max<int64_t>(16, block_bytes / std::max<int64_t>(1, width * 4));
  }

  // Rows row0 .. row0+rows-1 of x's dropout mask: 1/(1-p) where kept, 0 where dropped. float32, whose
  // 1/(1-p) is exact enough for 16- and 32-bit x; for float64 x the value is re-made in float64
  // (a float32 1/(1-p) is off by ~1e-8, far above float64's rounding).
  at::Tensor mask_rows(const at::Tensor& x, int64_t row0, int64_t rows, double p, int64_t seed) const {
    const at::Tensor mask = dropout_mask(row0, rows, x.size(1), p, seed, x.options());
    if (x.scalar_type() != at::kDouble) return mask;
    return mask.ne(0).to(at::kDouble).mul_(1.0 / (1.0 - p));
  }
};

inline constexpr DeviceParts kCpu{&dropout_mask_cpu, int64_t{256} << 10, true};
#ifdef LORA_KERNELS_WITH_CUDA
inline constexpr DeviceParts kCuda{&dropout_mask_cuda, int64_t{64} << 20, false};
#endif

// Fixed shares of the row blocks for sums over blocks (dA, dB): each share has its own partial sum, added in
// share order, so that results do not depend on how many threads ran them.
inline constexpr int64_t kBlockShares = 8;

// How many shares `blocks` row blocks are cut into: on the CPU up to kBlockShares, on a GPU one.
inline int64_t block_shares(const DeviceParts& device, int64_t blocks) {
  return device.threaded_blocks ? std::max<int64_t>(1, std::min(blocks, kBlockShares)) : 1;
}

// body(first_block, end_block, share) for each of the block_shares() shares of `blocks` row blocks: on the
// CPU (threaded_blocks) in one parallel region, one share per task; on a GPU in order, in one share (the
// launches are asynchronous anyway).
template <typename Body>
void for_block_shares(const DeviceParts& device, int64_t blocks, const Body& body) {
  if (blocks == 0) return;
  const int64_t shares = block_shares(device, blocks);
  auto share_range = [&](int64_t share) {
    body(share * blocks / shares, (share + 1) * blocks / shares, share);
  };
  if (shares == 1) {
    share_range(0);
    return;
  }
  parallel_pieces(shares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t share = begin; share < end; ++share) share_range(share);
  });
}

// s · (a b) with the scaling applied to the GEMM's accumulator (alpha), so a 16-bit
// result is rounded once, after scaling. BLAS skips the product when alpha = 0, which
// would hide NaN/Inf in a or b: then the product is formed (in float32 for 16-bit
// inputs, so that it cannot overflow) and multiplied by 0 explicitly.
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scaling) {
  if (scaling == 0.0) {
    const auto wide = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return at::mm(a.to(wide), b.to(wide)).mul_(scaling).to(a.scalar_type());
  }
  // beta = 0: the input is not read (BLAS semantics; NaN in it does not propagate), so an empty one serves: a
  // zero fill of [out, r] would be one more parallel region per call (a wait for every thread on a busy machine)
  return at::addmm(at::empty({a.size(0), b.size(1)}, a.options()), a, b, /*beta=*/0, /*alpha=*/scaling);
}

// out = s · (a b), written into out (a view of a larger buffer, say) without a temporary.
inline void scaled_mm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double scaling) {
  if (scaling == 0.0) {
    out.copy_(scaled_mm(a, b, scaling));  // see scaled_mm: alpha = 0 would hide NaN/Inf
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/scaling);
  }
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name = "x") {
  LK_CHECK(t.scalar_type() == x.scalar_type(), name, " must have ", x_name, "'s dtype ", x.scalar_type(),
           ", got ", t.scalar_type());
  LK_CHECK(t.device() == x.device(), name, " must be on ", x_name, "'s device ", x.device(), ", got ",
           t.device());
}

// float32 adapters on a 16-bit x (mixed precision: see the top of lora_linear.cpp)
inline bool is_mixed(const at::Tensor& x, const at::Tensor& lora_A) {
  return lora_A.scalar_type() == at::kFloat &&
         (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
}

struct Packed4bit;  // weight4bit.h

// The frozen base layer W0 [out, in] of a fused op: a dense weight (its products are BLAS / cuBLAS GEMMs) or,
// on the CPU, a packed 4-bit one (weight4bit.h), whose products dequantize it a panel at a time.
struct Base {
  at::Tensor dense;
  const Packed4bit* packed = nullptr;

  int64_t out_features() const;
  int64_t in_features() const;
  at::Tensor forward(const at::Tensor& x, const OptionalTensor& bias) const;  // bias + x W0ᵀ
  at::Tensor input_grad(const at::Tensor& grad_y) const;                      // dy W0
  void check(const at::Tensor& x) const;  // a dense weight has x's dtype and device
};

// The fused op's argument checks (lora_linear.cpp), for a dense or a packed base: x [M, in], lora_A [r, in],
// lora_B [out, r] in x's dtype (or float32 on a 16-bit x), bias [out], dropout_p in [0, 1).
void check_lora_args(const at::Tensor& x, const Base& base, const OptionalTensor& bias, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, double dropout_p);

// lora_linear in parts, so that the multi-adapter op can run the LoRA part per adapter on views of its
// batch: base_forward is bias + x W0ᵀ; add_lora_forward writes xa = drop(x) Aᵀ and adds s · xa Bᵀ to y
// (y and xa may be views); lora_backward returns (dA, dB) and adds dx's LoRA term to dx (when defined).
// row0 is the first row of x within the batch, so that the dropout mask is the batch's.
at::Tensor base_forward(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias);

void add_lora_forward(const DeviceParts& device, const at::Tensor& x, at::Tensor y, at::Tensor xa,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                      int64_t seed, int64_t row0);

// The fused forwards' optional gain [out] (DoRA's forward without gradient, ops/dora_linear.py): checked against
// x and the adapters (which must be in x's dtype), then y <- gain ⊙ y + bias in one ATen op, in place when y and
// gain share a dtype, else computed in gain's dtype and rounded once to y's. A fused forward with a gain leaves
// the bias out of its base product.
void check_gain(const OptionalTensor& gain, const at::Tensor& x, const at::Tensor& lora_A, int64_t out);
at::Tensor apply_gain(at::Tensor y, const at::Tensor& gain, const OptionalTensor& bias);

std::tuple<at::Tensor, at::Tensor> lora_backward(const DeviceParts& device, const at::Tensor& grad_y,
                                                 const at::Tensor& x, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
                                                 double dropout_p, int64_t seed, int64_t row0, at::Tensor dx);

std::tuple<at::Tensor, at::Tensor> fused_forward(const DeviceParts& device, const at::Tensor& x,
                                                 const at::Tensor& weight, const OptionalTensor& bias,
                                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                 double scaling, double dropout_p, int64_t seed,
                                                 const OptionalTensor& gain);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const DeviceParts& device, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    double dropout_p, int64_t seed, bool need_dx);

}  // namespace fused
}  // namespace lora_kernels
