// Fused LoRA linear, forward and backward, written once against ATen so that it
// serves CPU tensors (BLAS GEMMs) and CUDA tensors (cuBLAS GEMMs) alike:
//
//   forward   y  = bias + x W0ᵀ             one GEMM writes y once
//             xa = drop(x) Aᵀ                [M, r]; dropout applied block by block
//             y += s · xa Bᵀ                 accumulated into y (beta = 1): no [M, out] temporary
//   backward  gb = dy B                      [M, r]
//             dx = dy W0 + s (gb A) ⊙ mask/(1-p)
//             dA = s gbᵀ drop(x)             accumulated block by block in fp32
//             dB = s dyᵀ xa
//
// The only [M, in] tensors are x and dx themselves; the dropout mask is
// regenerated from the seed for each row block (philox.h), so it is never saved.
#include "lora_kernels.h"
#include "philox.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <vector>

namespace lora_kernels {
namespace {

// Rows per dropout block: a block of x (or of dx) stays around this many bytes,
// small enough to live in L2 on CPU, large enough to keep cuBLAS busy on GPU.
int64_t dropout_block_rows(const at::Tensor& x) {
  const int64_t budget_bytes = x.is_cuda() ? (int64_t{64} << 20) : (int64_t{512} << 10);
  const int64_t row_bytes = std::max<int64_t>(1, x.size(1) * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(8, budget_bytes / row_bytes);
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

// keep[k] = 1 for the kept elements e = base .. base+cols-1. One Philox call per
// group of 8 elements; compiled for AVX-512 and AVX2 as well, picked at run time,
// because this loop is the whole cost of CPU dropout.
__attribute__((target_clones("avx512f", "avx2", "default")))
void keep_row(uint64_t seed, uint64_t base, int64_t cols, uint32_t threshold, uint8_t* keep) {
  const uint64_t first_group = base >> 3, last_group = (base + cols - 1) >> 3;
  for (uint64_t g = first_group; g <= last_group; ++g) {
    const PhiloxWords words = philox4x32_10(seed, g);
    for (uint64_t j = 0; j < 8; ++j) {
      const uint64_t e = (g << 3) + j;
      if (e >= base && e < base + static_cast<uint64_t>(cols)) {
        keep[e - base] = dropout_draw(words, e) >= threshold;
      }
    }
  }
}

template <typename scalar_t>
void dropped_rows_kernel(const at::Tensor& src, at::Tensor& out, int64_t row0, double p,
                         int64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;  // float, or double for double inputs
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t src_rs = src.stride(0), src_cs = src.stride(1);
  const uint32_t threshold = dropout_threshold(p);
  const acc_t inv_keep = static_cast<acc_t>(1.0 / (1.0 - p));
  const scalar_t* src_ptr = src.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> keep(cols);
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(cols);
      keep_row(static_cast<uint64_t>(seed), base, cols, threshold, keep.data());
      const scalar_t* s = src_ptr + i * src_rs;
      scalar_t* o = out_ptr + i * cols;
      for (int64_t k = 0; k < cols; ++k) {
        o[k] = static_cast<scalar_t>(keep[k] ? static_cast<acc_t>(s[k * src_cs]) * inv_keep : acc_t(0));
      }
    }
  });
}

}  // namespace

at::Tensor dropped_rows_cpu(const at::Tensor& src, int64_t row0, double p, int64_t seed) {
  at::Tensor out = at::empty({src.size(0), src.size(1)}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dropped_rows",
                                  [&] { dropped_rows_kernel<scalar_t>(src, out, row0, p, seed); });
  return out;
}

at::Tensor dropped_rows(const at::Tensor& src, int64_t row0, double p, int64_t seed) {
  if (src.is_cuda()) {
#ifdef LORA_KERNELS_WITH_CUDA
    return dropped_rows_cuda(src, row0, p, seed);
#else
    LK_CHECK(false, "this build of lora_kernels._C has no CUDA kernels");
#endif
  }
  return dropped_rows_cpu(src, row0, p, seed);
}

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
