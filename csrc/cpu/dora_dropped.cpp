// DoRA with dropout on the CPU: the products with W0 in which only x's dropped elements take part.
//
// DoRA's function needs x̃ W0ᵀ beside x W0ᵀ (x̃ = x ⊙ keep, keep = mask / (1-p)). With d = 1 - mask,
// x̃ = (x - x⊙d) / (1-p), so x̃ W0ᵀ = (x W0ᵀ - (x⊙d) W0ᵀ) / (1-p), and the backward needs d ⊙ (h W0) at the
// dropped elements only (ops/dora_linear.py derives both):
//
//   dora_dropped_product(x, weight, bias, keep)         -> bias + (x ⊙ d) W0ᵀ      [M, out]
//   dora_dropped_gradient_(dx, h, weight, keep, scale):  dx += scale · d ⊙ (h W0)  [M, in], in place
//
// keep is the [M, in] mask the op draws (dropout_mask: 0 where dropped). Both cost ~p of a GEMM's
// multiply-adds, which pays only if they run near the FMA units' rate although the dropped elements are
// scattered. So W0 is read through small transposed tiles that stay in cache, and each vector of W0ᵀ loaded
// feeds a full vector FMA:
//
//   product:  a task per block of kOutBlock outputs (a row of accumulators in registers: 8 vectors); for each
//             tile of kInBlock columns of W0 (transposed into L1, 32 KB with AVX-512), every row of x adds
//             x[m, k] · W0ᵀ[k, block] for its dropped k in the tile (the row's block of the result stays in L2).
//   gradient: a task per slab of columns of W0 (transposed, ~1 MB: L2); every row of h takes up to 8 of its
//             dropped columns in the slab at once, one vector of h feeding 8 dot products over all outputs.
//
// Measured (benchmarks/NOTES.md, DoRA with dropout): the dense GEMM it replaces runs at the FMA units' peak.
// float32; the weight may have any strides (a fan_in_fan_out view). Results are exact sums in another order than
// a GEMM's: the op's tests hold them to the float64 oracle.
#include "../lora_kernels.h"
#include "isa.h"
#include "parallel.h"

#include <algorithm>
#include <vector>

namespace lora_kernels {
namespace {

// The dropped elements of the [M, in] mask, row by row, in increasing column order (and x's values there).
struct DroppedElements {
  std::vector<int64_t> row_start;  // M + 1 offsets into column / value
  std::vector<int32_t> column;
  std::vector<float> value;        // x[m, column]; empty when not asked for
};

DroppedElements dropped_elements(const float* keep, const float* x, int64_t M, int64_t in) {
  DroppedElements d;
  d.row_start.assign(M + 1, 0);
  constexpr int64_t kRowsPerPiece = 32;
  parallel_pieces(M, kRowsPerPiece, [&](int64_t begin, int64_t end) {  // branch-free counts
    for (int64_t m = begin; m < end; ++m) {
      int64_t count = 0;
      for (int64_t j = 0; j < in; ++j) count += keep[m * in + j] == 0.0f;
      d.row_start[m + 1] = count;
    }
  });
  for (int64_t m = 0; m < M; ++m) d.row_start[m + 1] += d.row_start[m];
  d.column.resize(d.row_start[M]);
  if (x != nullptr) d.value.resize(d.row_start[M]);
  parallel_pieces(M, kRowsPerPiece, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> row(in + 1);  // the branch-free fill writes one past the row's last dropped element
    for (int64_t m = begin; m < end; ++m) {
      int64_t n = 0;
      for (int64_t j = 0; j < in; ++j) {
        row[n] = static_cast<int32_t>(j);
        n += keep[m * in + j] == 0.0f;
      }
      std::copy(row.begin(), row.begin() + n, d.column.begin() + d.row_start[m]);
      if (x != nullptr)
        for (int64_t k = 0; k < n; ++k) d.value[d.row_start[m] + k] = x[m * in + row[k]];
    }
  });
  return d;
}

// tile[j * tile_stride + o] = W0[o0 + o][k0 + j] for o < rows, j < cols; in 16 × 16 blocks, so that both the
// reads and the writes touch whole cache lines whatever the strides.
void transpose_into(const float* w, int64_t stride_out, int64_t stride_in, int64_t o0, int64_t rows, int64_t k0,
                    int64_t cols, float* tile, int64_t tile_stride) {
  constexpr int64_t kBlock = 16;
  for (int64_t ob = 0; ob < rows; ob += kBlock) {
    const int64_t o_end = std::min(rows, ob + kBlock);
    for (int64_t jb = 0; jb < cols; jb += kBlock) {
      const int64_t j_end = std::min(cols, jb + kBlock);
      for (int64_t o = ob; o < o_end; ++o) {
        const float* row = w + (o0 + o) * stride_out + k0 * stride_in;
        for (int64_t j = jb; j < j_end; ++j) tile[j * tile_stride + o] = row[j * stride_in];
      }
    }
  }
}

// ---- the product: a row's block of outputs acc[0:width] = Σ_c value[c] · slab[column[c]][0:width] over the row's
// dropped elements, in V vector registers; the slab (W0ᵀ's block of outputs) rows are width floats apart.

#ifdef LK_X86
template <int V>
__attribute__((target("avx512f"))) void add_dropped_avx512(const float* value, const int32_t* column, int64_t count,
                                                           const float* slab, float* acc) {
  constexpr int64_t kWidth = 16 * V;
  __m512 a[V];
  for (int v = 0; v < V; ++v) a[v] = _mm512_loadu_ps(acc + 16 * v);
  for (int64_t c = 0; c < count; ++c) {
    const __m512 xv = _mm512_set1_ps(value[c]);
    const float* t = slab + column[c] * kWidth;
    for (int v = 0; v < V; ++v) a[v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 16 * v), a[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + 16 * v, a[v]);
}

template <int V>
__attribute__((target("avx2,fma"))) void add_dropped_avx2(const float* value, const int32_t* column, int64_t count,
                                                          const float* slab, float* acc) {
  constexpr int64_t kWidth = 8 * V;
  __m256 a[V];
  for (int v = 0; v < V; ++v) a[v] = _mm256_loadu_ps(acc + 8 * v);
  for (int64_t c = 0; c < count; ++c) {
    const __m256 xv = _mm256_set1_ps(value[c]);
    const float* t = slab + column[c] * kWidth;
    for (int v = 0; v < V; ++v) a[v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 8 * v), a[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
}
#endif

void add_dropped_scalar(const float* value, const int32_t* column, int64_t count, const float* slab, int64_t width,
                        float* acc) {
  for (int64_t c = 0; c < count; ++c)
    for (int64_t o = 0; o < width; ++o) acc[o] += value[c] * slab[column[c] * width + o];
}

// Vectors of outputs per product task: 8, or 4 where the slab (in × width floats) would pass 1 MB.
int64_t product_vectors(int64_t in) { return in * 128 * 4 <= (int64_t{1} << 20) ? 8 : 4; }

void dropped_product(const float* w, int64_t stride_out, int64_t stride_in, const DroppedElements& d, int64_t M,
                     int64_t in, int64_t out, const float* bias, float* q, Isa isa) {
  const int64_t vectors = product_vectors(in);
  const int64_t width = vectors * (isa == Isa::kAvx512 ? 16 : 8);
  const int64_t blocks = (out + width - 1) / width;
  parallel_pieces(blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slab(in * width, 0.0f);  // zeros past a narrow last block's outputs
    std::vector<float> acc(width);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o0 = b * width, rows = std::min(width, out - o0);
      transpose_into(w, stride_out, stride_in, o0, rows, 0, in, slab.data(), width);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t o = 0; o < rows; ++o) acc[o] = bias != nullptr ? bias[o0 + o] : 0.0f;
        const int64_t first = d.row_start[m], count = d.row_start[m + 1] - first;
        const float* value = d.value.data() + first;
        const int32_t* column = d.column.data() + first;
        switch (isa) {
#ifdef LK_X86
          case Isa::kAvx512:
            vectors == 8 ? add_dropped_avx512<8>(value, column, count, slab.data(), acc.data())
                         : add_dropped_avx512<4>(value, column, count, slab.data(), acc.data());
            break;
          case Isa::kAvx2:
            vectors == 8 ? add_dropped_avx2<8>(value, column, count, slab.data(), acc.data())
                         : add_dropped_avx2<4>(value, column, count, slab.data(), acc.data());
            break;
#endif
          default: add_dropped_scalar(value, column, count, slab.data(), width, acc.data());
        }
        std::copy(acc.begin(), acc.begin() + rows, q + m * out + o0);
      }
    }
  });
}

// ---- the gradient: out_k += h · slab_row(column_k) over all outputs, for N dropped elements at once.

#ifdef LK_X86
// dots[i] = h · rows[i] over out outputs for N rows, in K independent chains per row (N·K >= 8 vectors in
// flight: the FMAs' latency is hidden when few of a row's dropped elements fall in a slab).
template <int N, int K>
__attribute__((target("avx512f"))) void dots_avx512(const float* h, const float* const* rows, int64_t out,
                                                    float* dots) {
  __m512 a[N][K];
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < K; ++k) a[i][k] = _mm512_setzero_ps();
  const int64_t body = out - out % (16 * K);
  for (int64_t o = 0; o < body; o += 16 * K) {
    for (int k = 0; k < K; ++k) {
      const __m512 hv = _mm512_loadu_ps(h + o + 16 * k);
      for (int i = 0; i < N; ++i) a[i][k] = _mm512_fmadd_ps(hv, _mm512_loadu_ps(rows[i] + o + 16 * k), a[i][k]);
    }
  }
  for (int i = 0; i < N; ++i) {
    for (int k = 1; k < K; ++k) a[i][0] = _mm512_add_ps(a[i][0], a[i][k]);
    float sum = _mm512_reduce_add_ps(a[i][0]);
    for (int64_t o = body; o < out; ++o) sum += h[o] * rows[i][o];
    dots[i] = sum;
  }
}

__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <int N, int K>
__attribute__((target("avx2,fma"))) void dots_avx2(const float* h, const float* const* rows, int64_t out,
                                                  float* dots) {
  __m256 a[N][K];
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < K; ++k) a[i][k] = _mm256_setzero_ps();
  const int64_t body = out - out % (8 * K);
  for (int64_t o = 0; o < body; o += 8 * K) {
    for (int k = 0; k < K; ++k) {
      const __m256 hv = _mm256_loadu_ps(h + o + 8 * k);
      for (int i = 0; i < N; ++i) a[i][k] = _mm256_fmadd_ps(hv, _mm256_loadu_ps(rows[i] + o + 8 * k), a[i][k]);
    }
  }
  for (int i = 0; i < N; ++i) {
    for (int k = 1; k < K; ++k) a[i][0] = _mm256_add_ps(a[i][0], a[i][k]);
    float sum = sum8(a[i][0]);
    for (int64_t o = body; o < out; ++o) sum += h[o] * rows[i][o];
    dots[i] = sum;
  }
}

#endif

// dots[i] = h · rows[i] over out outputs, i < n <= 8.
void dots(Isa isa, const float* h, const float* const* rows, int n, int64_t out, float* result) {
#ifdef LK_X86
#define LK_DOTS(KERNEL)                                                      \
  switch (n) {                                                               \
    case 1: return KERNEL<1, 8>(h, rows, out, result);                       \
    case 2: return KERNEL<2, 4>(h, rows, out, result);                       \
    case 3: return KERNEL<3, 2>(h, rows, out, result);                       \
    case 4: return KERNEL<4, 2>(h, rows, out, result);                       \
    case 5: return KERNEL<5, 1>(h, rows, out, result);                       \
    case 6: return KERNEL<6, 1>(h, rows, out, result);                       \
    case 7: return KERNEL<7, 1>(h, rows, out, result);                       \
    default: return KERNEL<8, 1>(h, rows, out, result);                      \
  }
  if (isa == Isa::kAvx512) LK_DOTS(dots_avx512)
  if (isa == Isa::kAvx2) LK_DOTS(dots_avx2)
#undef LK_DOTS
#endif
  for (int i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int64_t o = 0; o < out; ++o) sum += h[o] * rows[i][o];
    result[i] = sum;
  }
}

// Columns of W0 per gradient slab: the transposed slab (columns × out floats) about 1 MB, 16 to 256 columns.
int64_t slab_columns(int64_t out) { return std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(out, 1) / 16 * 16, 16, 256); }

void dropped_gradient(const float* w, int64_t stride_out, int64_t stride_in, const DroppedElements& d,
                      const float* h, int64_t M, int64_t in, int64_t out, float scale, float* dx, Isa isa) {
  const int64_t columns = slab_columns(out);
  const int64_t slabs = (in + columns - 1) / columns;
  parallel_pieces(slabs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slab(columns * out);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t k0 = s * columns, k_end = std::min(in, k0 + columns);
      transpose_into(w, stride_out, stride_in, 0, out, k0, k_end - k0, slab.data(), out);
      for (int64_t m = 0; m < M; ++m) {
        const int32_t* row_begin = d.column.data() + d.row_start[m];
        const int32_t* row_end = d.column.data() + d.row_start[m + 1];
        const int32_t* c = std::lower_bound(row_begin, row_end, static_cast<int32_t>(k0));
        while (c < row_end && *c < k_end) {
          const float* rows[8];
          int n = 0;
          for (; n < 8 && c + n < row_end && c[n] < k_end; ++n) rows[n] = slab.data() + (c[n] - k0) * out;
          float result[8];
          dots(isa, h + m * out, rows, n, out, result);
          for (int i = 0; i < n; ++i) dx[m * in + c[i]] += scale * result[i];
          c += n;
        }
      }
    }
  });
}

void check_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight, const at::Tensor& keep) {
  LK_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, x_name,
           " must be a contiguous float32 [M, in] tensor, got ", x.sizes(), " ", x.scalar_type());
  LK_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == at::kFloat,
           "weight must be float32 [out, ", x.size(1), "], got ", weight.sizes(), " ", weight.scalar_type());
  LK_CHECK(keep.sizes() == x.sizes() && keep.is_contiguous() && keep.scalar_type() == at::kFloat,
           "keep must be a contiguous float32 mask of ", x_name, "'s shape ", x.sizes(), ", got ", keep.sizes(),
           " ", keep.scalar_type());
  LK_CHECK(x.device().is_cpu() && weight.device().is_cpu() && keep.device().is_cpu(),
           "dora_dropped: CPU tensors only");
}

}  // namespace

at::Tensor dora_dropped_product_cpu(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                                    const at::Tensor& keep) {
  check_args(x, "x", weight, keep);
  const int64_t M = x.size(0), out = weight.size(0), in = x.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    LK_CHECK(bias->dim() == 1 && bias->size(0) == out && bias->scalar_type() == at::kFloat,
             "bias must be float32 [", out, "], got ", bias->sizes(), " ", bias->scalar_type());
    b = bias->contiguous();
  }
  at::Tensor q = at::empty({M, out}, x.options());  // a new tensor, never a view of bias (M = 0 included)
  if (M == 0 || out == 0) return q;
  if (in == 0) return b.defined() ? q.copy_(b.expand({M, out})) : q.zero_();
  const DroppedElements d = dropped_elements(keep.data_ptr<float>(), x.data_ptr<float>(), M, in);
  dropped_product(weight.data_ptr<float>(), weight.stride(0), weight.stride(1), d, M, in, out,
                  b.defined() ? b.data_ptr<float>() : nullptr, q.data_ptr<float>(), chosen_isa());
  return q;
}

void dora_dropped_gradient_cpu_(at::Tensor& dx, const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& keep, double scale) {
  check_args(dx, "dx", weight, keep);
  LK_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat && h.size(0) == dx.size(0) &&
               h.size(1) == weight.size(0),
           "h must be a contiguous float32 [", dx.size(0), ", ", weight.size(0), "] tensor, got ", h.sizes(), " ",
           h.scalar_type());
  const int64_t M = dx.size(0), out = weight.size(0), in = dx.size(1);
  if (M == 0 || in == 0 || out == 0) return;
  const DroppedElements d = dropped_elements(keep.data_ptr<float>(), nullptr, M, in);
  dropped_gradient(weight.data_ptr<float>(), weight.stride(0), weight.stride(1), d, h.data_ptr<float>(), M, in,
                   out, static_cast<float>(scale), dx.data_ptr<float>(), chosen_isa());
}

}  // namespace lora_kernels
