// In-place merge on CPU: W[o, :] = round(W[o, :] + s · Σ_k B[o, k] A[k, :]).
//
// Blocks of kBlockRows rows of W are the tasks; within a block, kChunk columns at a
// time, each row's LoRA delta is accumulated in a buffer of the accumulation dtype
// (float32; float64 for float64 weights), k running 0..r-1 in order, then added to
// W and rounded once into W's dtype, in one vectorised pass (bf16 converted
// bitwise, fp16 with F16C). The extra memory is A in the accumulation dtype plus a
// block's buffers per thread, whatever the size of W. The order of each element's
// sum never depends on threading or blocking, so unmerge (s -> -s) subtracts
// exactly what merge added.
#include "../lora_kernels.h"
#include "multiversion.h"
#include "parallel.h"

#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lora_kernels {
namespace {

// Rows of W are taken kBlockRows at a time and their columns kChunk at a time, so that a chunk of A
// (r x kChunk) is read from L2 once per block of rows instead of once per row (benchmarks/NOTES.md:
// 12-25% faster at 4096², bit for bit the same results).
constexpr int64_t kBlockRows = 8;
constexpr int64_t kChunk = 256;

// delta[j * kChunk + i] = Σ_k b[j * r + k] A[k, c0 + i] for the block's rows j < rows and columns
// i < cn, k in order 0, 1, ... r-1 for every element (so each element's sum, and its bits, do not depend
// on the blocking). Multi-versioned (multiversion.h); the lane order does not change any element's sum,
// so every version gives the same bits.
template <typename acc_t>
inline __attribute__((always_inline)) void block_delta_impl(const acc_t* a, int64_t in, int64_t r, const acc_t* b,
                                                            int64_t rows, int64_t c0, int64_t cn, acc_t* delta) {
  for (int64_t j = 0; j < rows; ++j) std::fill(delta + j * kChunk, delta + j * kChunk + cn, acc_t(0));
  int64_t k = 0;
  // Four k at a time: one load and store of delta per four products instead of per product; each
  // element still sums its products in order k = 0, 1, 2, ...
  for (; k + 4 <= r; k += 4) {
    const acc_t *a0 = a + k * in + c0, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
    for (int64_t j = 0; j < rows; ++j) {
      const acc_t b0 = b[j * r + k], b1 = b[j * r + k + 1], b2 = b[j * r + k + 2], b3 = b[j * r + k + 3];
      acc_t* d_row = delta + j * kChunk;
      for (int64_t i = 0; i < cn; ++i) {
        acc_t d = d_row[i];
        d += b0 * a0[i];
        d += b1 * a1[i];
        d += b2 * a2[i];
        d += b3 * a3[i];
        d_row[i] = d;
      }
    }
  }
  for (; k < r; ++k) {
    const acc_t* a_k = a + k * in + c0;
    for (int64_t j = 0; j < rows; ++j) {
      const acc_t b_k = b[j * r + k];
      acc_t* d_row = delta + j * kChunk;
      for (int64_t i = 0; i < cn; ++i) d_row[i] += b_k * a_k[i];
    }
  }
}

// No FMA contraction, so that the AVX-512, AVX2 and baseline versions give the
// same bits (merge/unmerge consistency only needs one version per machine).
#define LK_BLOCK_DELTA(acc_t)                                                                                  \
  LK_MULTIVERSIONED LK_NO_FMA_CONTRACTION                                                                      \
  void block_delta(const acc_t* a, int64_t in, int64_t r, const acc_t* b, int64_t rows, int64_t c0, int64_t cn, \
                   acc_t* delta) {                                                                             \
    block_delta_impl(a, in, r, b, rows, c0, cn, delta);                                                        \
  }
LK_BLOCK_DELTA(float)
LK_BLOCK_DELTA(double)
#undef LK_BLOCK_DELTA

// W's element type seen as its storage bits, with conversions to and from the
// accumulation type that the compiler can vectorise (c10's are out-of-line and
// branchy). Both round to nearest even, as c10 does; a NaN stays a NaN.
template <typename scalar_t>
struct Element {  // float, double, and fp16 without compiler support: c10's own conversions
  using storage = scalar_t;
  static at::opmath_type<scalar_t> load(storage v) { return v; }
  static storage store(at::opmath_type<scalar_t> v) { return static_cast<storage>(v); }
};
template <>
struct Element<at::BFloat16> {
  using storage = uint16_t;
  static float load(storage bits) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
  static storage store(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<storage>(v != v ? 0x7FC0u : rounded);
  }
};
#if defined(__FLT16_MAX__)  // the compiler has _Float16 (GCC 12+ / clang 15+ on x86-64)
template <>
struct Element<at::Half> {
  using storage = _Float16;  // F16C's conversions where the CPU has them (x86-64-v3 and up)
  static float load(storage v) { return static_cast<float>(v); }
  static storage store(float v) { return static_cast<storage>(v); }
};
#endif

// w[i] = round(w[i] + s·delta[i] - s'·sub_delta[i]) for one row, or (check_only)
// the count of elements whose result would not be finite. s·d - s'·d' is exactly
// -(s'·d' - s·d), so switching back cancels bit for bit.
template <typename scalar_t>
inline __attribute__((always_inline)) int64_t apply_row_impl(typename Element<scalar_t>::storage* w, int64_t stride,
                                                             int64_t in, const at::opmath_type<scalar_t>* delta,
                                                             const at::opmath_type<scalar_t>* sub_delta,
                                                             at::opmath_type<scalar_t> s,
                                                             at::opmath_type<scalar_t> sub_s, bool check_only) {
  using E = Element<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  auto merged = [&](int64_t i, acc_t w_i) {
    const acc_t change = sub_delta != nullptr ? s * delta[i] - sub_s * sub_delta[i] : s * delta[i];
    return E::store(w_i + change);  // rounded once; an overflow shows up here
  };
  int64_t nonfinite = 0;
  if (check_only) {
    for (int64_t i = 0; i < in; ++i) nonfinite += !std::isfinite(E::load(merged(i, E::load(w[i * stride]))));
  } else if (stride == 1) {  // the common case, vectorised
    for (int64_t i = 0; i < in; ++i) w[i] = merged(i, E::load(w[i]));
  } else {
    for (int64_t i = 0; i < in; ++i) w[i * stride] = merged(i, E::load(w[i * stride]));
  }
  return nonfinite;
}

// One multi-versioned function per dtype (target_clones does not apply to
// templates); no FMA contraction, so that every version gives the same bits.
#define LK_APPLY_ROW(name, scalar_t)                                                                              \
  LK_MULTIVERSIONED LK_NO_FMA_CONTRACTION                                                                         \
  int64_t name(Element<scalar_t>::storage* w, int64_t stride, int64_t in, const at::opmath_type<scalar_t>* delta, \
               const at::opmath_type<scalar_t>* sub_delta, at::opmath_type<scalar_t> s,                            \
               at::opmath_type<scalar_t> sub_s, bool check_only) {                                                 \
    return apply_row_impl<scalar_t>(w, stride, in, delta, sub_delta, s, sub_s, check_only);                       \
  }
LK_APPLY_ROW(apply_row_f32, float)
LK_APPLY_ROW(apply_row_f64, double)
LK_APPLY_ROW(apply_row_bf16, at::BFloat16)
LK_APPLY_ROW(apply_row_f16, at::Half)
#undef LK_APPLY_ROW

template <typename scalar_t>
constexpr auto apply_row() {
  if constexpr (std::is_same_v<scalar_t, float>) return &apply_row_f32;
  else if constexpr (std::is_same_v<scalar_t, double>) return &apply_row_f64;
  else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return &apply_row_bf16;
  else return &apply_row_f16;
}

// The block's rows of B (rows o0 .. o0+rows-1), converted to the accumulation type: b[j * r + k].
template <typename scalar_t, typename acc_t>
void block_rows_of_B(const at::Tensor& B, int64_t o0, int64_t rows, acc_t* b) {
  const int64_t r = B.size(1);
  const scalar_t* src = B.data_ptr<scalar_t>();
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t k = 0; k < r; ++k) b[j * r + k] = static_cast<acc_t>(src[(o0 + j) * B.stride(0) + k * B.stride(1)]);
  }
}

template <typename scalar_t>
int64_t merge_rows(const at::Tensor& weight, const at::Tensor& A_acc, const at::Tensor& B,
                   double scaling_d, const at::Tensor& sub_A_acc, const at::Tensor& sub_B,
                   double sub_scaling_d, bool check_only) {
  using acc_t = at::opmath_type<scalar_t>;  // float, or double for float64 weights
  using storage_t = typename Element<scalar_t>::storage;
  static_assert(sizeof(storage_t) == sizeof(scalar_t));
  const acc_t scaling = static_cast<acc_t>(scaling_d), sub_scaling = static_cast<acc_t>(sub_scaling_d);
  const bool has_sub = sub_A_acc.defined();
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t r = A_acc.size(0), sub_r = has_sub ? sub_A_acc.size(0) : 0;
  const int64_t w_rs = weight.stride(0), w_cs = weight.stride(1);
  storage_t* w_ptr = reinterpret_cast<storage_t*>(weight.data_ptr<scalar_t>());
  std::atomic<int64_t> nonfinite{0};
  const int64_t blocks = (out + kBlockRows - 1) / kBlockRows;

  parallel_pieces(blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> delta(kBlockRows * kChunk), sub_delta(has_sub ? kBlockRows * kChunk : 0);
    std::vector<acc_t> b(kBlockRows * r), sub_b(kBlockRows * sub_r);
    int64_t local_nonfinite = 0;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o0 = block * kBlockRows, rows = std::min(kBlockRows, out - o0);
      block_rows_of_B<scalar_t>(B, o0, rows, b.data());
      if (has_sub) block_rows_of_B<scalar_t>(sub_B, o0, rows, sub_b.data());
      for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, in - c0);
        block_delta(A_acc.data_ptr<acc_t>(), in, r, b.data(), rows, c0, cn, delta.data());
        if (has_sub) block_delta(sub_A_acc.data_ptr<acc_t>(), in, sub_r, sub_b.data(), rows, c0, cn, sub_delta.data());
        for (int64_t j = 0; j < rows; ++j) {
          local_nonfinite += apply_row<scalar_t>()(w_ptr + (o0 + j) * w_rs + c0 * w_cs, w_cs, cn,
                                                   delta.data() + j * kChunk,
                                                   has_sub ? sub_delta.data() + j * kChunk : nullptr, scaling,
                                                   sub_scaling, check_only);
        }
      }
    }
    nonfinite += local_nonfinite;
  });
  return nonfinite.load();
}

void check_adapter(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                   const char* a_name, const char* b_name) {
  LK_CHECK(A.dim() == 2 && A.size(1) == weight.size(1), a_name, " must be [r, ", weight.size(1),
           "], got ", A.sizes());
  LK_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0), b_name,
           " must be [", weight.size(0), ", ", A.size(0), "], got ", B.sizes());
  LK_CHECK(A.scalar_type() == weight.scalar_type() && B.scalar_type() == weight.scalar_type(),
           a_name, " and ", b_name, " must have weight's dtype ", weight.scalar_type());
  LK_CHECK(A.device() == weight.device() && B.device() == weight.device(), a_name, " and ",
           b_name, " must be on weight's device ", weight.device());
}

}  // namespace

void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      const c10::optional<at::Tensor>& sub_A, const c10::optional<at::Tensor>& sub_B) {
  LK_CHECK(weight.dim() == 2, "weight must be 2-D [out, in], got ", weight.sizes());
  check_adapter(weight, lora_A, lora_B, "lora_A", "lora_B");
  LK_CHECK(sub_A.has_value() == sub_B.has_value(), "sub_A and sub_B must be given together");
  if (sub_A.has_value()) check_adapter(weight, *sub_A, *sub_B, "sub_A", "sub_B");
}

namespace {

int64_t merge_or_count(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       const OptionalTensor& sub_A, const OptionalTensor& sub_B, double sub_scaling,
                       bool check_only) {
  check_merge_args(weight, lora_A, lora_B, sub_A, sub_B);
  int64_t nonfinite = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // A in the accumulation dtype, contiguous: [r, in], small next to W.
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor A_acc = lora_A.to(acc_dtype).contiguous();
    const at::Tensor sub_A_acc = sub_A.has_value() ? sub_A->to(acc_dtype).contiguous() : at::Tensor();
    const at::Tensor sub_B_t = sub_B.has_value() ? *sub_B : at::Tensor();
    nonfinite = merge_rows<scalar_t>(weight, A_acc, lora_B, scaling, sub_A_acc, sub_B_t,
                                     sub_scaling, check_only);
  });
  return nonfinite;
}

}  // namespace

void merge_cpu_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                const OptionalTensor& sub_A, const OptionalTensor& sub_B, double sub_scaling) {
  merge_or_count(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, /*check_only=*/false);
}

at::Tensor merge_nonfinite_count_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     double scaling, const OptionalTensor& sub_A, const OptionalTensor& sub_B,
                                     double sub_scaling) {
  const int64_t count = merge_or_count(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, true);
  return at::scalar_tensor(count, weight.options().dtype(at::kLong));
}

}  // namespace lora_kernels
