// CPU kernels for the skinny products of LoRA, with dropout fused in:
//
//   shrink       out[M, r]  = drop?(x)[M, K] · D[K, r]           xa = drop(x) Aᵀ,  gb = dy B
//   expand_      y[M, N]   += s · (L[M, r] · U[r, N]) ⊙ mask?     y += s·xa Bᵀ,  dx += s·(gb A) ⊙ mask/(1-p)
//   weight_grad  P[r, N]    = Lᵀ[r, M] · drop?(x)[M, N]           dA = s·gbᵀ drop(x),  dBᵀ = s·xaᵀ dy
//
// BLAS handles the big GEMMs; these shapes (one side r = 1..128) run at a
// fraction of its speed, so each product gets a register-blocked loop over
// 16-float lanes (one AVX-512 register) that the compiler vectorises. Every
// function is compiled for AVX-512, AVX2 and baseline x86-64 and the best is
// picked at load time, so wheels stay portable. Accumulation is float32 (float64
// for float64 inputs); the dropout mask is generated where x is read (philox.h).
#include "lora_cpu_kernels.h"

#include "philox.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

#define LK_ALWAYS_INLINE inline __attribute__((always_inline))
// x86-64-v4 = AVX-512 + FMA, x86-64-v3 = AVX2 + FMA, default = SSE2.
#define LK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace lora_kernels {
namespace {

constexpr int64_t kLanes = 16;  // the r (or column) tile: 16 floats, one AVX-512 register

// kLanes values as one GCC/Clang vector: arithmetic on it compiles to one zmm
// instruction per 16 floats on AVX-512, two ymm on AVX2, four xmm on SSE2,
// with no reliance on the auto-vectoriser. A scalar operand is broadcast.
template <typename T>
struct Lanes {
  typedef T type __attribute__((vector_size(sizeof(T) * kLanes)));
};
template <typename T>
using Vec = typename Lanes<T>::type;

template <typename T>
LK_ALWAYS_INLINE Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint64_t U64x16 __attribute__((vector_size(128)));

// keep for the 128 elements of 16 consecutive Philox groups g0 .. g0+15: the
// rounds of philox.h run on 16 lanes at once (vpmuludq does the 32x32->64 products).
LK_ALWAYS_INLINE void keep_16_groups(uint64_t seed, uint64_t g0, uint32_t threshold, uint8_t* keep) {
  U32x16 c0, c1;
  for (int l = 0; l < 16; ++l) {
    c0[l] = static_cast<uint32_t>(g0 + l);
    c1[l] = static_cast<uint32_t>((g0 + l) >> 32);
  }
  U32x16 c2 = {}, c3 = {};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const U64x16 prod_b = __builtin_convertvector(c2, U64x16) * 0xCD9E8D57ull;
    const U64x16 prod_a = __builtin_convertvector(c0, U64x16) * 0xD2511F53ull;
    c0 = __builtin_convertvector(prod_b >> 32, U32x16) ^ c1 ^ k0;
    c2 = __builtin_convertvector(prod_a >> 32, U32x16) ^ c3 ^ k1;
    c1 = __builtin_convertvector(prod_b, U32x16);
    c3 = __builtin_convertvector(prod_a, U32x16);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const U32x16 words[4] = {c0, c1, c2, c3};
  for (int l = 0; l < 16; ++l) {
    for (int j = 0; j < 8; ++j) {  // element (g0 + l) * 8 + j: word j / 2, half j % 2 (philox.h)
      keep[l * 8 + j] = ((words[j >> 1][l] >> ((j & 1) * 16)) & 0xFFFFu) >= threshold;
    }
  }
}

// keep[j] for elements e = base .. base+count-1 of the dropout stream (philox.h):
// whole runs of 16 groups on the vector path, the ragged ends one group at a time.
LK_ALWAYS_INLINE void keep_bits(uint64_t seed, uint64_t base, int64_t count, uint32_t threshold, uint8_t* keep) {
  const uint64_t end = base + static_cast<uint64_t>(count);
  uint64_t g = base >> 3;
  auto one_group = [&](uint64_t group) {
    const PhiloxWords words = philox4x32_10(seed, group);
    const uint64_t lo = std::max(group << 3, base), hi = std::min((group << 3) + 8, end);
    for (uint64_t e = lo; e < hi; ++e) keep[e - base] = dropout_draw(words, e) >= threshold;
  };
  if ((g << 3) < base) one_group(g++);  // a first group that starts before base
  for (; ((g + 16) << 3) <= end; g += 16) keep_16_groups(seed, g, threshold, keep + ((g << 3) - base));
  for (; (g << 3) < end; ++g) one_group(g);
}

struct Dropout {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  double inv_keep;
};

// Row m of x, converted to acc_t, with dropout applied (without the 1/(1-p)
// factor, which the callers fold into their scale): row_out[k], k < K.
template <typename scalar_t, typename acc_t>
LK_ALWAYS_INLINE void load_row(const scalar_t* x_row, int64_t x_cs, int64_t K, int64_t m, const Dropout& drop,
                               uint8_t* keep, acc_t* row_out) {
  if (drop.on) keep_bits(drop.seed, static_cast<uint64_t>(m) * static_cast<uint64_t>(K), K, drop.threshold, keep);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t v = static_cast<acc_t>(x_row[k * x_cs]);
    row_out[k] = drop.on && !keep[k] ? acc_t(0) : v;
  }
}

// The kernels below each process a range [begin, end) of their parallel
// dimension; the callers split that dimension over threads with at::parallel_for.
// (A lambda inside a multi-versioned function would not inherit its ISA.)

constexpr int64_t kShrinkRows = 8;   // rows of x per register block in shrink
constexpr int64_t kExpandRows = 4;   // rows of y per register block in expand
constexpr int64_t kExpandCols = 64;  // columns of y per register block in expand (4 vectors)
constexpr int64_t kGradRows = 64;    // rows of x per pass over the column panels in weight_grad

// out[M, R] = scale · drop?(x) · D, D given as acc_t [K, R_pad] (R_pad: multiple of kLanes, zero-padded);
// blocks begin..end of kShrinkRows rows. Each D row loaded feeds kShrinkRows FMAs.
template <typename scalar_t, typename acc_t>
LK_ALWAYS_INLINE void shrink_impl(int64_t begin, int64_t end, const scalar_t* x, int64_t x_rs, int64_t x_cs,
                                  int64_t M, int64_t K, const acc_t* d, int64_t R, int64_t R_pad, scalar_t* out,
                                  int64_t out_rs, acc_t scale, const Dropout& drop) {
  constexpr int64_t kRows = kShrinkRows;
  // fp32/fp64 rows without dropout are read in place; otherwise a converted,
  // masked copy of the block's rows is made (kRows * K values).
  constexpr bool same_type = std::is_same<scalar_t, acc_t>::value;
  const bool in_place = same_type && x_cs == 1 && !drop.on;
  std::vector<acc_t> rows_buf(in_place ? K : kRows * K, acc_t(0));  // in place: one zero row for the tail
  std::vector<uint8_t> keep(drop.on ? K : 0);
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t m0 = blk * kRows, rows = std::min(kRows, M - m0);
    const acc_t* row[kRows];
    for (int64_t i = 0; i < kRows; ++i) {
      if (in_place) {
        row[i] = i < rows ? reinterpret_cast<const acc_t*>(x + (m0 + i) * x_rs) : rows_buf.data();
      } else {
        acc_t* dst = rows_buf.data() + i * K;
        if (i < rows) load_row(x + (m0 + i) * x_rs, x_cs, K, m0 + i, drop, keep.data(), dst);
        else std::fill(dst, dst + K, acc_t(0));
        row[i] = dst;
      }
    }
    for (int64_t r0 = 0; r0 < R_pad; r0 += kLanes) {
      Vec<acc_t> acc[kRows] = {};
      for (int64_t k = 0; k < K; ++k) {
        const Vec<acc_t> dk = load_vec(d + k * R_pad + r0);
        for (int64_t i = 0; i < kRows; ++i) acc[i] += row[i][k] * dk;
      }
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < kLanes && r0 + j < R; ++j) {
          out[(m0 + i) * out_rs + r0 + j] = static_cast<scalar_t>(acc[i][j] * scale);
        }
      }
    }
  }
}

// y[M, N] += scale · (L · U) ⊙ keep?, L as acc_t [M, R], U as acc_t [R, N_pad] (N_pad: multiple of
// kExpandCols, zero-padded); blocks begin..end of kExpandRows rows. Each U vector loaded feeds kExpandRows FMAs.
template <typename scalar_t, typename acc_t>
LK_ALWAYS_INLINE void expand_impl(int64_t begin, int64_t end, scalar_t* y, int64_t y_rs, int64_t y_cs, int64_t M,
                                  int64_t N, const acc_t* l, int64_t R, const acc_t* u, int64_t N_pad, acc_t scale,
                                  const Dropout& drop) {
  constexpr int64_t kRows = kExpandRows, kVecs = kExpandCols / kLanes;
  std::vector<uint8_t> keep(drop.on ? kRows * N : 0);
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t m0 = blk * kRows, rows = std::min(kRows, M - m0);
    for (int64_t i = 0; drop.on && i < rows; ++i) {
      keep_bits(drop.seed, static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(N), N, drop.threshold,
                keep.data() + i * N);
    }
    for (int64_t n0 = 0; n0 < N; n0 += kExpandCols) {
      Vec<acc_t> acc[kRows][kVecs] = {};
      for (int64_t r = 0; r < R; ++r) {
        Vec<acc_t> ur[kVecs];
        for (int64_t v = 0; v < kVecs; ++v) ur[v] = load_vec(u + r * N_pad + n0 + v * kLanes);
        for (int64_t i = 0; i < kRows; ++i) {
          const acc_t lv = i < rows ? l[(m0 + i) * R + r] : acc_t(0);
          for (int64_t v = 0; v < kVecs; ++v) acc[i][v] += lv * ur[v];
        }
      }
      const int64_t valid = std::min(kExpandCols, N - n0);
      for (int64_t i = 0; i < rows; ++i) {
        acc_t sums[kExpandCols];
        std::memcpy(sums, acc[i], sizeof(sums));
        scalar_t* y_row = y + (m0 + i) * y_rs + n0 * y_cs;
        const uint8_t* keep_row = drop.on ? keep.data() + i * N + n0 : nullptr;
        if (y_cs == 1) {  // contiguous rows: a loop the compiler vectorises
          for (int64_t j = 0; j < valid; ++j) {
            const acc_t factor = keep_row == nullptr || keep_row[j] ? scale : acc_t(0);
            y_row[j] = static_cast<scalar_t>(static_cast<acc_t>(y_row[j]) + factor * sums[j]);
          }
        } else {
          for (int64_t j = 0; j < valid; ++j) {
            if (keep_row != nullptr && !keep_row[j]) continue;
            scalar_t& out = y_row[j * y_cs];
            out = static_cast<scalar_t>(static_cast<acc_t>(out) + scale * sums[j]);
          }
        }
      }
    }
  }
}

// p[R, N] (acc_t, contiguous) += Lᵀ · drop?(x) over rows begin..end, L as acc_t [M, R_pad] (zero-padded).
// Rows go in blocks of kGradRows; within a block every column panel of kLanes columns
// is swept with its kLanes x kLanes accumulators in registers, so x is read once.
template <typename scalar_t, typename acc_t>
LK_ALWAYS_INLINE void weight_grad_impl(int64_t begin, int64_t end, const acc_t* l, int64_t R, int64_t R_pad,
                                       const scalar_t* x, int64_t x_rs, int64_t x_cs, int64_t N, acc_t* p,
                                       const Dropout& drop) {
  std::vector<uint8_t> keep(drop.on ? kGradRows * N : 0);
  for (int64_t m0 = begin; m0 < end; m0 += kGradRows) {
    const int64_t m1 = std::min(end, m0 + kGradRows);
    for (int64_t m = m0; drop.on && m < m1; ++m) {
      keep_bits(drop.seed, static_cast<uint64_t>(m) * static_cast<uint64_t>(N), N, drop.threshold,
                keep.data() + (m - m0) * N);
    }
    for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
      const int64_t width = std::min(kLanes, N - n0);
      for (int64_t r0 = 0; r0 < R_pad; r0 += kLanes) {
        Vec<acc_t> acc[kLanes] = {};  // acc[rr] holds the partial P[r0 + rr, n0 .. n0+15]
        for (int64_t m = m0; m < m1; ++m) {
          acc_t xv[kLanes] = {};
          const scalar_t* x_row = x + m * x_rs + n0 * x_cs;
          const uint8_t* keep_row = drop.on ? keep.data() + (m - m0) * N + n0 : nullptr;
          for (int64_t j = 0; j < width; ++j) {
            xv[j] = keep_row != nullptr && !keep_row[j] ? acc_t(0) : static_cast<acc_t>(x_row[j * x_cs]);
          }
          const Vec<acc_t> x_vec = load_vec(xv);
          const acc_t* l_row = l + m * R_pad + r0;
          for (int64_t rr = 0; rr < kLanes; ++rr) acc[rr] += l_row[rr] * x_vec;
        }
        for (int64_t rr = 0; rr < kLanes && r0 + rr < R; ++rr) {
          for (int64_t j = 0; j < width; ++j) p[(r0 + rr) * N + n0 + j] += acc[rr][j];
        }
      }
    }
  }
}

// One multi-versioned entry point per (kernel, dtype); the templates inline into it.
template <typename scalar_t>
struct Kernels;

#define LK_INSTANTIATE(scalar_t, suffix)                                                                       \
  using acc_##suffix = at::opmath_type<scalar_t>;                                                              \
  LK_MULTIVERSION void shrink_##suffix(int64_t begin, int64_t end, const scalar_t* x, int64_t x_rs,              \
                                       int64_t x_cs, int64_t M, int64_t K, const acc_##suffix* d, int64_t R,     \
                                       int64_t R_pad, scalar_t* out, int64_t out_rs, acc_##suffix scale,         \
                                       const Dropout& drop) {                                                    \
    shrink_impl(begin, end, x, x_rs, x_cs, M, K, d, R, R_pad, out, out_rs, scale, drop);                         \
  }                                                                                                              \
  LK_MULTIVERSION void expand_##suffix(int64_t begin, int64_t end, scalar_t* y, int64_t y_rs, int64_t y_cs,      \
                                       int64_t M, int64_t N, const acc_##suffix* l, int64_t R,                   \
                                       const acc_##suffix* u, int64_t N_pad, acc_##suffix scale,                 \
                                       const Dropout& drop) {                                                    \
    expand_impl(begin, end, y, y_rs, y_cs, M, N, l, R, u, N_pad, scale, drop);                                   \
  }                                                                                                              \
  LK_MULTIVERSION void weight_grad_##suffix(int64_t begin, int64_t end, const acc_##suffix* l, int64_t R,        \
                                            int64_t R_pad, const scalar_t* x, int64_t x_rs, int64_t x_cs,        \
                                            int64_t N, acc_##suffix* p, const Dropout& drop) {                   \
    weight_grad_impl(begin, end, l, R, R_pad, x, x_rs, x_cs, N, p, drop);                                        \
  }                                                                                                              \
  template <>                                                                                                    \
  struct Kernels<scalar_t> {                                                                                     \
    static constexpr auto shrink = &shrink_##suffix;                                                             \
    static constexpr auto expand = &expand_##suffix;                                                             \
    static constexpr auto weight_grad = &weight_grad_##suffix;                                                   \
  };

LK_INSTANTIATE(float, f32)
LK_INSTANTIATE(double, f64)
LK_INSTANTIATE(c10::Half, f16)
LK_INSTANTIATE(c10::BFloat16, bf16)
#undef LK_INSTANTIATE

Dropout make_dropout(double p, int64_t seed) {
  return {p > 0.0, static_cast<uint64_t>(seed), dropout_threshold(p), p > 0.0 ? 1.0 / (1.0 - p) : 1.0};
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t [rows, cols] as a contiguous accumulation-dtype matrix whose columns are zero-padded to `cols_pad`.
at::Tensor padded(const at::Tensor& t, int64_t cols_pad, at::ScalarType dtype) {
  at::Tensor out = at::zeros({t.size(0), cols_pad}, t.options().dtype(dtype));
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

}  // namespace

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& d, double scale, double p, int64_t seed) {
  const int64_t M = x.size(0), K = x.size(1), R = d.size(1);
  at::Tensor out = at::empty({M, R}, x.options());
  if (M == 0) return out;
  const Dropout drop = make_dropout(p, seed);
  const at::Tensor d_pad = padded(d, round_up(R), acc_dtype(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shrink_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t step_scale = static_cast<acc_t>(scale * drop.inv_keep);
    at::parallel_for(0, (M + kShrinkRows - 1) / kShrinkRows, 4, [&](int64_t begin, int64_t end) {
      Kernels<scalar_t>::shrink(begin, end, x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), M, K,
                                d_pad.data_ptr<acc_t>(), R, d_pad.size(1), out.data_ptr<scalar_t>(), out.stride(0),
                                step_scale, drop);
    });
  });
  return out;
}

void expand_cpu_(at::Tensor& y, const at::Tensor& l, const at::Tensor& u, double scale, double p, int64_t seed) {
  const int64_t M = y.size(0), N = y.size(1), R = l.size(1);
  if (M == 0 || N == 0) return;
  const Dropout drop = make_dropout(p, seed);
  const at::ScalarType acc = acc_dtype(y.scalar_type());
  const at::Tensor l_acc = l.to(acc).contiguous();
  const at::Tensor u_pad = padded(u, (N + kExpandCols - 1) / kExpandCols * kExpandCols, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "expand_cpu_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t step_scale = static_cast<acc_t>(scale * drop.inv_keep);
    at::parallel_for(0, (M + kExpandRows - 1) / kExpandRows, 2, [&](int64_t begin, int64_t end) {
      Kernels<scalar_t>::expand(begin, end, y.data_ptr<scalar_t>(), y.stride(0), y.stride(1), M, N,
                                l_acc.data_ptr<acc_t>(), R, u_pad.data_ptr<acc_t>(), u_pad.size(1), step_scale, drop);
    });
  });
}

at::Tensor weight_grad_cpu(const at::Tensor& l, const at::Tensor& x, double scale, double p, int64_t seed) {
  const int64_t M = x.size(0), N = x.size(1), R = l.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  // One partial [R, N] sum per thread over its own slice of rows, added up at the end.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (M + kGradRows - 1) / kGradRows));
  at::Tensor partial = at::zeros({slices, R, N}, x.options().dtype(acc));
  if (M > 0) {
    const Dropout drop = make_dropout(p, seed);
    const at::Tensor l_pad = padded(l, round_up(R), acc);
    const int64_t rows_per_slice = (M + slices - 1) / slices;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "weight_grad_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t slice = begin; slice < end; ++slice) {
          const int64_t m0 = slice * rows_per_slice, m1 = std::min(M, m0 + rows_per_slice);
          Kernels<scalar_t>::weight_grad(m0, m1, l_pad.data_ptr<acc_t>(), R, l_pad.size(1), x.data_ptr<scalar_t>(),
                                         x.stride(0), x.stride(1), N, partial[slice].data_ptr<acc_t>(), drop);
        }
      });
    });
  }
  at::Tensor out = slices == 1 ? partial[0] : partial.sum(0);
  return out.mul_(scale * (p > 0.0 ? 1.0 / (1.0 - p) : 1.0)).to(x.scalar_type());
}

}  // namespace lora_kernels
