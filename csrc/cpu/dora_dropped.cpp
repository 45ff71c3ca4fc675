// DoRA with dropout on the CPU: the products with W0 in which only x's dropped elements take part.
//
// DoRA's function needs x̃ W0ᵀ beside x W0ᵀ (x̃ = x ⊙ keep, keep = mask / (1-p)). With d = 1 - mask,
// x̃ = (x - x⊙d) / (1-p), so x̃ W0ᵀ = (x W0ᵀ - (x⊙d) W0ᵀ) / (1-p), and the backward needs d ⊙ (h W0) at the
// dropped elements only (ops/dora_linear.py derives both):
//
//   dora_dropped_product(x, weight, bias, keep)         -> bias + (x ⊙ d) W0ᵀ      [M, out]
//   dora_dropped_gradient_(dx, h, weight, keep, scale):  dx += scale · d ⊙ (h W0)  [M, in], in place
//
// keep is the [M, in] mask the op draws (dropout_mask: 0 where dropped). Both take ~p of a GEMM's
// multiply-adds; they pay only if those run near the FMA units' rate although the dropped elements are
// scattered. W0 is read in tiles of kTileColumns columns × 128 outputs (64 with AVX2), transposed into L1
// (32 KB), and x's dropped elements are listed per tile, row after row (DroppedTile), so a kernel streams them:
//
//   product:  a task per block of outputs. Every row m adds x[m, k] · W0ᵀ[k, block] for its dropped k in the
//             tile: 8 vector registers hold the row's block of outputs (a contiguous [M, 128] buffer, in L2),
//             one FMA per vector of the tile loaded from L1.
//   gradient: a task per range of kTilesPerTask tiles. For each block of outputs, a row's h[m, block] sits in
//             8 vector registers while its dropped elements in the range take their dot products with the
//             tile's rows (8 FMAs and one horizontal sum each), summed over the blocks per element.
//
// float32; the weight may have any strides (a fan_in_fan_out view). A result is the same whatever the thread
// count (each output is summed by one task in a fixed order); sums run in another order than a GEMM's: the
// op's tests hold them to a float64 oracle (benchmarks/NOTES.md: DoRA with dropout).
#include "../lora_kernels.h"
#include "isa.h"
#include "parallel.h"

#include <algorithm>
#include <vector>

namespace lora_kernels {
namespace {

constexpr int64_t kTileColumns = 64;  // columns of W0 (elements of a row of x) per tile
constexpr int64_t kTilesPerTask = 8;  // gradient: tiles per task (h is read once per task)

// Outputs per tile: 8 vectors.
int64_t tile_outputs(Isa isa) { return isa == Isa::kAvx512 ? 128 : 64; }

// The dropped elements of x in the columns [k0, k0 + kTileColumns): row m's are offset[start[m]:start[m + 1]]
// (column - k0, increasing) and, when x is given, value[...] = x[m, column].
struct DroppedTile {
  std::vector<int32_t> start;
  std::vector<int32_t> offset;
  std::vector<float> value;
};

void fill_tile(const float* keep, const float* x, int64_t M, int64_t in, int64_t k0, DroppedTile& tile) {
  const int64_t width = std::min(kTileColumns, in - k0);
  tile.start.assign(M + 1, 0);
  for (int64_t m = 0; m < M; ++m) {  // counts first (the tile's part of keep then stays in L2 for the fill)
    const float* row = keep + m * in + k0;
    int32_t count = 0;
    for (int64_t j = 0; j < width; ++j) count += row[j] == 0.0f;
    tile.start[m + 1] = tile.start[m] + count;
  }
  tile.offset.resize(tile.start[M] + 1);  // the branch-free fill writes one past the tile's last element
  if (x != nullptr) tile.value.resize(tile.start[M] + 1);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = keep + m * in + k0;
    const float* x_row = x != nullptr ? x + m * in + k0 : nullptr;
    int64_t n = tile.start[m];
    for (int64_t j = 0; j < width; ++j) {
      tile.offset[n] = static_cast<int32_t>(j);
      if (x_row != nullptr) tile.value[n] = x_row[j];
      n += row[j] == 0.0f;
    }
  }
}

std::vector<DroppedTile> dropped_tiles(const float* keep, const float* x, int64_t M, int64_t in) {
  std::vector<DroppedTile> tiles((in + kTileColumns - 1) / kTileColumns);
  parallel_pieces(static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fill_tile(keep, x, M, in, t * kTileColumns, tiles[t]);
  });
  return tiles;
}

// wt[j * width + o] = W0[o0 + o][k0 + j] for o < rows, j < cols (zeros for rows <= o < width); 16 × 16 blocks, so
// that both the reads and the writes touch whole cache lines whatever the strides.
void transpose_tile(const float* w, int64_t stride_out, int64_t stride_in, int64_t o0, int64_t rows, int64_t k0,
                    int64_t cols, int64_t width, float* wt) {
  constexpr int64_t kBlock = 16;
  for (int64_t ob = 0; ob < width; ob += kBlock) {
    for (int64_t jb = 0; jb < cols; jb += kBlock) {
      const int64_t j_end = std::min(cols, jb + kBlock);
      for (int64_t o = ob; o < ob + kBlock; ++o) {
        if (o >= rows) {
          for (int64_t j = jb; j < j_end; ++j) wt[j * width + o] = 0.0f;
          continue;
        }
        const float* row = w + (o0 + o) * stride_out + k0 * stride_in;
        for (int64_t j = jb; j < j_end; ++j) wt[j * width + o] = row[j * stride_in];
      }
    }
  }
}

// ---- the product: acc[m][0:width] += Σ value · wt[offset][0:width] over row m's dropped elements in the tile,
// for every row m (acc rows width floats apart).

#ifdef LK_X86
__attribute__((target("avx512f"))) void add_tile_avx512(const DroppedTile& d, int64_t M, const float* wt, float* acc) {
  const int32_t* offset = d.offset.data();
  const float* value = d.value.data();
  for (int64_t m = 0; m < M; ++m, acc += 128) {
    const int32_t first = d.start[m], last = d.start[m + 1];
    if (first == last) continue;
    __m512 a0 = _mm512_loadu_ps(acc), a1 = _mm512_loadu_ps(acc + 16), a2 = _mm512_loadu_ps(acc + 32),
           a3 = _mm512_loadu_ps(acc + 48), a4 = _mm512_loadu_ps(acc + 64), a5 = _mm512_loadu_ps(acc + 80),
           a6 = _mm512_loadu_ps(acc + 96), a7 = _mm512_loadu_ps(acc + 112);
    for (int32_t c = first; c < last; ++c) {
      const __m512 xv = _mm512_set1_ps(value[c]);
      const float* t = wt + offset[c] * 128;
      a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t), a0);
      a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 16), a1);
      a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 32), a2);
      a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 48), a3);
      a4 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 64), a4);
      a5 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 80), a5);
      a6 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 96), a6);
      a7 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t + 112), a7);
    }
    _mm512_storeu_ps(acc, a0);
    _mm512_storeu_ps(acc + 16, a1);
    _mm512_storeu_ps(acc + 32, a2);
    _mm512_storeu_ps(acc + 48, a3);
    _mm512_storeu_ps(acc + 64, a4);
    _mm512_storeu_ps(acc + 80, a5);
    _mm512_storeu_ps(acc + 96, a6);
    _mm512_storeu_ps(acc + 112, a7);
  }
}

__attribute__((target("avx2,fma"))) void add_tile_avx2(const DroppedTile& d, int64_t M, const float* wt, float* acc) {
  const int32_t* offset = d.offset.data();
  const float* value = d.value.data();
  for (int64_t m = 0; m < M; ++m, acc += 64) {
    const int32_t first = d.start[m], last = d.start[m + 1];
    if (first == last) continue;
    __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8), a2 = _mm256_loadu_ps(acc + 16),
           a3 = _mm256_loadu_ps(acc + 24), a4 = _mm256_loadu_ps(acc + 32), a5 = _mm256_loadu_ps(acc + 40),
           a6 = _mm256_loadu_ps(acc + 48), a7 = _mm256_loadu_ps(acc + 56);
    for (int32_t c = first; c < last; ++c) {
      const __m256 xv = _mm256_set1_ps(value[c]);
      const float* t = wt + offset[c] * 64;
      a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t), a0);
      a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 8), a1);
      a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 16), a2);
      a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 24), a3);
      a4 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 32), a4);
      a5 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 40), a5);
      a6 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 48), a6);
      a7 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(t + 56), a7);
    }
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
    _mm256_storeu_ps(acc + 16, a2);
    _mm256_storeu_ps(acc + 24, a3);
    _mm256_storeu_ps(acc + 32, a4);
    _mm256_storeu_ps(acc + 40, a5);
    _mm256_storeu_ps(acc + 48, a6);
    _mm256_storeu_ps(acc + 56, a7);
  }
}
#endif

void add_tile_scalar(const DroppedTile& d, int64_t M, const float* wt, int64_t width, float* acc) {
  for (int64_t m = 0; m < M; ++m, acc += width)
    for (int32_t c = d.start[m]; c < d.start[m + 1]; ++c)
      for (int64_t o = 0; o < width; ++o) acc[o] += d.value[c] * wt[d.offset[c] * width + o];
}

void dropped_product(const float* w, int64_t stride_out, int64_t stride_in, const std::vector<DroppedTile>& tiles,
                     int64_t M, int64_t in, int64_t out, const float* bias, float* q, Isa isa) {
  const int64_t width = tile_outputs(isa);
  const int64_t blocks = (out + width - 1) / width;
  parallel_pieces(blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wt(kTileColumns * width);
    // The block's outputs, contiguous: q's rows are out floats apart, and a block of columns of them falls in a
    // few cache sets (conflict misses at out = 4096); this buffer stays in L2 (1 MB at M = 2048 with AVX-512).
    std::vector<float> acc(M * width);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o0 = b * width, rows = std::min(width, out - o0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < width; ++o) acc[m * width + o] = bias != nullptr && o < rows ? bias[o0 + o] : 0.0f;
      for (int64_t t = 0; t < static_cast<int64_t>(tiles.size()); ++t) {
        const int64_t k0 = t * kTileColumns;
        transpose_tile(w, stride_out, stride_in, o0, rows, k0, std::min(kTileColumns, in - k0), width, wt.data());
        switch (isa) {
#ifdef LK_X86
          case Isa::kAvx512: add_tile_avx512(tiles[t], M, wt.data(), acc.data()); break;
          case Isa::kAvx2: add_tile_avx2(tiles[t], M, wt.data(), acc.data()); break;
#endif
          default: add_tile_scalar(tiles[t], M, wt.data(), width, acc.data());
        }
      }
      for (int64_t m = 0; m < M; ++m) std::copy(acc.data() + m * width, acc.data() + m * width + rows, q + m * out + o0);
    }
  });
}

// ---- the gradient: partial[c] += h_block · wt[offset[c]] for the dropped elements c of a task's tiles, row by
// row, h_block = h[m, o0:o0 + width] (zero past out) in registers.

#ifdef LK_X86
__attribute__((target("avx512f"))) inline float dot128_avx512(const __m512* hv, const float* t) {
  __m512 s0 = _mm512_mul_ps(hv[0], _mm512_loadu_ps(t)), s1 = _mm512_mul_ps(hv[1], _mm512_loadu_ps(t + 16));
  s0 = _mm512_fmadd_ps(hv[2], _mm512_loadu_ps(t + 32), s0);
  s1 = _mm512_fmadd_ps(hv[3], _mm512_loadu_ps(t + 48), s1);
  s0 = _mm512_fmadd_ps(hv[4], _mm512_loadu_ps(t + 64), s0);
  s1 = _mm512_fmadd_ps(hv[5], _mm512_loadu_ps(t + 80), s1);
  s0 = _mm512_fmadd_ps(hv[6], _mm512_loadu_ps(t + 96), s0);
  s1 = _mm512_fmadd_ps(hv[7], _mm512_loadu_ps(t + 112), s1);
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target("avx512f"))) void dot_tiles_avx512(const std::vector<DroppedTile>& tiles, int64_t t0,
                                                         int64_t t1, const float* h_block, int64_t h_stride,
                                                         int64_t M, int64_t rows, const float* wt,
                                                         std::vector<std::vector<float>>& partial) {
  alignas(64) float padded[128] = {};
  for (int64_t m = 0; m < M; ++m) {
    const float* h = h_block + m * h_stride;
    if (rows < 128) {
      std::copy(h, h + rows, padded);
      h = padded;
    }
    __m512 hv[8];
    for (int v = 0; v < 8; ++v) hv[v] = _mm512_loadu_ps(h + 16 * v);
    for (int64_t t = t0; t < t1; ++t) {
      const DroppedTile& d = tiles[t];
      const float* tile = wt + (t - t0) * kTileColumns * 128;
      float* p = partial[t - t0].data();
      for (int32_t c = d.start[m]; c < d.start[m + 1]; ++c) p[c] += dot128_avx512(hv, tile + d.offset[c] * 128);
    }
  }
}

__attribute__((target("avx2,fma"))) inline float dot64_avx2(const __m256* hv, const float* t) {
  __m256 s0 = _mm256_mul_ps(hv[0], _mm256_loadu_ps(t)), s1 = _mm256_mul_ps(hv[1], _mm256_loadu_ps(t + 8));
  s0 = _mm256_fmadd_ps(hv[2], _mm256_loadu_ps(t + 16), s0);
  s1 = _mm256_fmadd_ps(hv[3], _mm256_loadu_ps(t + 24), s1);
  s0 = _mm256_fmadd_ps(hv[4], _mm256_loadu_ps(t + 32), s0);
  s1 = _mm256_fmadd_ps(hv[5], _mm256_loadu_ps(t + 40), s1);
  s0 = _mm256_fmadd_ps(hv[6], _mm256_loadu_ps(t + 48), s0);
  s1 = _mm256_fmadd_ps(hv[7], _mm256_loadu_ps(t + 56), s1);
  const __m256 s = _mm256_add_ps(s0, s1);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

__attribute__((target("avx2,fma"))) void dot_tiles_avx2(const std::vector<DroppedTile>& tiles, int64_t t0,
                                                        int64_t t1, const float* h_block, int64_t h_stride,
                                                        int64_t M, int64_t rows, const float* wt,
                                                        std::vector<std::vector<float>>& partial) {
  alignas(32) float padded[64] = {};
  for (int64_t m = 0; m < M; ++m) {
    const float* h = h_block + m * h_stride;
    if (rows < 64) {
      std::copy(h, h + rows, padded);
      h = padded;
    }
    __m256 hv[8];
    for (int v = 0; v < 8; ++v) hv[v] = _mm256_loadu_ps(h + 8 * v);
    for (int64_t t = t0; t < t1; ++t) {
      const DroppedTile& d = tiles[t];
      const float* tile = wt + (t - t0) * kTileColumns * 64;
      float* p = partial[t - t0].data();
      for (int32_t c = d.start[m]; c < d.start[m + 1]; ++c) p[c] += dot64_avx2(hv, tile + d.offset[c] * 64);
    }
  }
}
#endif

void dot_tiles_scalar(const std::vector<DroppedTile>& tiles, int64_t t0, int64_t t1, const float* h_block,
                      int64_t h_stride, int64_t M, int64_t rows, int64_t width, const float* wt,
                      std::vector<std::vector<float>>& partial) {
  for (int64_t m = 0; m < M; ++m) {
    const float* h = h_block + m * h_stride;
    for (int64_t t = t0; t < t1; ++t) {
      const DroppedTile& d = tiles[t];
      const float* tile = wt + (t - t0) * kTileColumns * width;
      for (int32_t c = d.start[m]; c < d.start[m + 1]; ++c) {
        float sum = 0.0f;
        for (int64_t o = 0; o < rows; ++o) sum += h[o] * tile[d.offset[c] * width + o];
        partial[t - t0][c] += sum;
      }
    }
  }
}

void dropped_gradient(const float* w, int64_t stride_out, int64_t stride_in, const std::vector<DroppedTile>& tiles,
                      const float* h, int64_t M, int64_t in, int64_t out, float scale, float* dx, Isa isa) {
  const int64_t width = tile_outputs(isa);
  const int64_t count = static_cast<int64_t>(tiles.size());
  parallel_pieces((count + kTilesPerTask - 1) / kTilesPerTask, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wt(kTilesPerTask * kTileColumns * width);  // the task's tiles of one block of outputs
    std::vector<std::vector<float>> partial(kTilesPerTask);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t0 = task * kTilesPerTask, t1 = std::min(count, t0 + kTilesPerTask);
      for (int64_t t = t0; t < t1; ++t) partial[t - t0].assign(tiles[t].offset.size(), 0.0f);
      for (int64_t o0 = 0; o0 < out; o0 += width) {
        const int64_t rows = std::min(width, out - o0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k0 = t * kTileColumns;
          transpose_tile(w, stride_out, stride_in, o0, rows, k0, std::min(kTileColumns, in - k0), width,
                         wt.data() + (t - t0) * kTileColumns * width);
        }
        switch (isa) {
#ifdef LK_X86
          case Isa::kAvx512: dot_tiles_avx512(tiles, t0, t1, h + o0, out, M, rows, wt.data(), partial); break;
          case Isa::kAvx2: dot_tiles_avx2(tiles, t0, t1, h + o0, out, M, rows, wt.data(), partial); break;
#endif
          default: dot_tiles_scalar(tiles, t0, t1, h + o0, out, M, rows, width, wt.data(), partial);
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        const DroppedTile& d = tiles[t];
        const int64_t k0 = t * kTileColumns;
        for (int64_t m = 0; m < M; ++m)
          for (int32_t c = d.start[m]; c < d.start[m + 1]; ++c) dx[m * in + k0 + d.offset[c]] += scale * partial[t - t0][c];
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
  const std::vector<DroppedTile> tiles = dropped_tiles(keep.data_ptr<float>(), x.data_ptr<float>(), M, in);
  dropped_product(weight.data_ptr<float>(), weight.stride(0), weight.stride(1), tiles, M, in, out,
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
  const std::vector<DroppedTile> tiles = dropped_tiles(keep.data_ptr<float>(), nullptr, M, in);
  dropped_gradient(weight.data_ptr<float>(), weight.stride(0), weight.stride(1), tiles, h.data_ptr<float>(), M, in,
                   out, static_cast<float>(scale), dx.data_ptr<float>(), chosen_isa());
}

}  // namespace lora_kernels
