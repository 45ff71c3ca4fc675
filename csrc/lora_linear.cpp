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
// Without dropout every product is one BLAS (CPU) or cuBLAS (CUDA) call: on the
// machines measured, MKL's skinny GEMMs beat our own loops (benchmarks/NOTES.md).
// With dropout, CPU tensors go through lora_cpu_kernels.cpp, which applies the
// mask where it reads x (shrink, dA) or writes dx's LoRA term (expand); CUDA
// tensors get row blocks masked by a CUDA kernel (lora_kernels_cuda.cu). Either
// way the mask is regenerated from the seed (philox.h): the only [M, in]
// tensors are x and dx.
#include "lora_cpu_kernels.h"
#include "lora_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <vector>

namespace lora_kernels {
namespace {

// CUDA dropout works on row blocks of x (or of dx) of about 64 MB: large enough
// to keep cuBLAS busy, small next to the [M, in] copy it avoids.
int64_t dropout_block_rows(const at::Tensor& x) {
  const int64_t row_bytes = std::max<int64_t>(1, x.size(1) * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(8, (int64_t{64} << 20) / row_bytes);
}

at::Tensor dropped_rows(const at::Tensor& src, int64_t row0, double p, int64_t seed) {
#ifdef LORA_KERNELS_WITH_CUDA
  return dropped_rows_cuda(src, row0, p, seed);
#else
  LK_CHECK(false, "this build of lora_kernels._C has no CUDA kernels");
#endif
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  LK_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
           ", got ", t.scalar_type());
  LK_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
           t.device());
}

void check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, double dropout_p) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  LK_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be [out, ",
           x.size(1), "], got ", weight.sizes());
  LK_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), "lora_A must be [r, ", x.size(1),
           "], got ", lora_A.sizes());
  LK_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight.size(0) &&
               lora_B.size(1) == lora_A.size(0),
           "lora_B must be [", weight.size(0), ", ", lora_A.size(0), "], got ", lora_B.sizes());
  check_same(weight, "weight", x);
  check_same(lora_A, "lora_A", x);
  check_same(lora_B, "lora_B", x);
  if (bias.has_value()) {
    LK_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [",
             weight.size(0), "], got ", bias->sizes());
    check_same(*bias, "bias", x);
  }
  LK_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias,
                                                 const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, double scaling,
                                                 double dropout_p, int64_t seed) {
  check_forward_args(x, weight, bias, lora_A, lora_B, dropout_p);
  const int64_t M = x.size(0), r = lora_A.size(0);
  at::Tensor y = at::empty({M, weight.size(0)}, x.options());
  at::Tensor xa = at::empty({M, r}, x.options());
  if (M == 0) return {y, xa};

  if (bias.has_value()) {
    at::addmm_out(y, *bias, x, weight.t());
  } else {
    at::mm_out(y, x, weight.t());
  }
  if (x.is_cpu() && dropout_p > 0.0) {  // dropout fused into the shrink: no dropped copy of x
    xa = shrink_cpu(x, lora_A.t(), 1.0, dropout_p, seed);
    y.addmm_(xa, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
    return {y, xa};
  }
  if (dropout_p == 0.0) {
    at::mm_out(xa, x, lora_A.t());
  } else {
    const int64_t block = dropout_block_rows(x);
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t rows = std::min(block, M - m0);
      at::Tensor xa_rows = xa.narrow(0, m0, rows);
      at::mm_out(xa_rows, dropped_rows(x.narrow(0, m0, rows), m0, dropout_p, seed), lora_A.t());
    }
  }
  y.addmm_(xa, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    double dropout_p, int64_t seed, bool need_dx) {
  check_forward_args(x, weight, c10::nullopt, lora_A, lora_B, dropout_p);
  LK_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0),
           "grad_y must be [", x.size(0), ", ", weight.size(0), "], got ", grad_y.sizes());
  LK_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0),
           "xa must be [", x.size(0), ", ", lora_A.size(0), "], got ", xa.sizes());
  check_same(grad_y, "grad_y", x);
  check_same(xa, "xa", x);
  const int64_t M = x.size(0);

  if (x.is_cpu() && dropout_p > 0.0) {  // the mask applied where x and dx's LoRA term are read/written
    at::Tensor dB = at::mm(grad_y.t(), xa).mul_(scaling);  // [out, r]
    at::Tensor gb = at::mm(grad_y, lora_B);                // dy B   [M, r]
    at::Tensor dA = weight_grad_cpu(gb, x, scaling, dropout_p, seed);
    at::Tensor dx = need_dx ? at::mm(grad_y, weight) : at::empty({0}, x.options());
    if (need_dx) expand_cpu_(dx, gb, lora_A, scaling, dropout_p, seed);
    return {dx, dA, dB};
  }

  at::Tensor dB = at::mm(grad_y.t(), xa).mul_(scaling);          // [out, r]
  at::Tensor gb_scaled = at::mm(grad_y, lora_B).mul_(scaling);  // s · dy B   [M, r]
  at::Tensor dx = need_dx ? at::mm(grad_y, weight) : at::empty({0}, x.options());

  if (dropout_p == 0.0) {
    at::Tensor dA = at::mm(gb_scaled.t(), x);
    if (need_dx && M > 0) dx.addmm_(gb_scaled, lora_A);
    return {dx, dA, dB};
  }

  // Dropout: regenerate each block's mask; dA accumulates over blocks in fp32
  // (fp64 for fp64 inputs) so that half-precision inputs are rounded once, at the end.
  const bool half_precision = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  at::Tensor dA = at::zeros(lora_A.sizes(), x.options().dtype(half_precision ? at::kFloat : x.scalar_type()));
  const int64_t block = dropout_block_rows(x);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    at::Tensor gb_rows = gb_scaled.narrow(0, m0, rows);
    at::Tensor x_dropped = dropped_rows(x.narrow(0, m0, rows), m0, dropout_p, seed);
    if (half_precision) {
      dA.addmm_(gb_rows.t().to(at::kFloat), x_dropped.to(at::kFloat));
    } else {
      dA.addmm_(gb_rows.t(), x_dropped);
    }
    if (need_dx) {
      dx.narrow(0, m0, rows).add_(dropped_rows(at::mm(gb_rows, lora_A), m0, dropout_p, seed));
    }
  }
  return {dx, dA.to(x.scalar_type()), dB};
}

}  // namespace lora_kernels
