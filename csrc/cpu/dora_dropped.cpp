// DoRA with dropout on the CPU: the products with W0 in which only the dropped elements of x take part.
//
// DoRA's function needs x̃ W0ᵀ beside x W0ᵀ (x̃ = x ⊙ keep / (1-p)). With d = 1 - keep, x̃ = (x - x⊙d) / (1-p),
// so x̃ W0ᵀ = (x W0ᵀ - Q) / (1-p) where Q = (x⊙d) W0ᵀ involves only the ~p·M·in dropped elements; the backward
// likewise needs d ⊙ (H W0) at the dropped elements only (ops/dora_linear.py derives both). Here:
//
//   dora_dropped_product(x, weight, bias, keep)         -> bias + (x ⊙ d) W0ᵀ          [M, out]
//   dora_dropped_gradient_(dx, h, weight, keep, scale):  dx += scale · d ⊙ (h W0)     [M, in], in place
//
// keep is the [M, in] dropout mask as the op draws it (dropout_mask: 0 where dropped), computed once per call by
// the caller. p of a dense GEMM's flops, as axpys (forward) and dots (backward) over rows of W0ᵀ. W0ᵀ is built
// a tile at a time (kChunk columns of W0 by kTile of its rows, 256 KB: it stays in a 512 KB L2 while every row
// of the batch reads it); each row of x walks its own dropped columns in the tile's range. float32; the weight
// may have any strides (a fan_in_fan_out view).
#include "../lora_kernels.h"
#include "multiversion.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace lora_kernels {
namespace {

constexpr int64_t kChunk = 512;  // columns of W0 (elements of a row of x) per tile
constexpr int64_t kTile = 128;   // rows of W0 (outputs) per tile

// The dropped elements of the [M, in] mask, row by row: column indices in increasing order.
struct DroppedElements {
  std::vector<int64_t> row_start;  // M + 1 offsets into column
  std::vector<int32_t> column;
};

DroppedElements dropped_elements(const at::Tensor& mask) {
  const int64_t M = mask.size(0), in = mask.size(1);
  const float* keep = mask.data_ptr<float>();
  DroppedElements dropped;
  dropped.row_start.assign(M + 1, 0);
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {  // counts (branch-free: ~p of them are dropped)
    for (int64_t m = begin; m < end; ++m) {
      int64_t count = 0;
      for (int64_t j = 0; j < in; ++j) count += keep[m * in + j] == 0.0f;
      dropped.row_start[m + 1] = count;
    }
  });
  for (int64_t m = 0; m < M; ++m) dropped.row_start[m + 1] += dropped.row_start[m];
  dropped.column.resize(dropped.row_start[M]);
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> row(in + 1);  // the branch-free fill writes one past the row's last dropped element
    for (int64_t m = begin; m < end; ++m) {
      int64_t n = 0;
      for (int64_t j = 0; j < in; ++j) {
        row[n] = static_cast<int32_t>(j);
        n += keep[m * in + j] == 0.0f;
      }
      std::copy(row.begin(), row.begin() + n, dropped.column.begin() + dropped.row_start[m]);
    }
  });
  return dropped;
}

// wt[jj][oo] = W0[o0 + oo][c0 + jj]: one tile of W0ᵀ, rows kTile apart, in 16 × 16 blocks (both the reads and
// the writes then touch whole cache lines).
void transpose_tile(const float* weight, int64_t stride_out, int64_t stride_in, int64_t o0, int64_t rows,
                    int64_t c0, int64_t cols, float* wt) {
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, (rows + kBlock - 1) / kBlock, 4, [&](int64_t begin, int64_t end) {
    for (int64_t ob = begin * kBlock; ob < std::min(rows, end * kBlock); ob += kBlock) {
      const int64_t o_end = std::min(rows, ob + kBlock);
      for (int64_t jb = 0; jb < cols; jb += kBlock) {
        const int64_t j_end = std::min(cols, jb + kBlock);
        for (int64_t oo = ob; oo < o_end; ++oo) {
          const float* w = weight + (o0 + oo) * stride_out + (c0 + jb) * stride_in;
          for (int64_t jj = jb; jj < j_end; ++jj) wt[jj * kTile + oo] = w[(jj - jb) * stride_in];
        }
      }
    }
  });
}

// q[0:width] += Σ_k x_row[col_k] · wt[col_k - c0][0:width], eight (then four) dropped elements per pass over q.
LK_MULTIVERSIONED
void add_dropped_columns(const float* x_row, const int32_t* cols, int64_t count, int64_t c0, const float* wt,
                         int64_t width, float* q) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    float a[8];
    const float* w[8];
    for (int i = 0; i < 8; ++i) {
      a[i] = x_row[cols[k + i]];
      w[i] = wt + (cols[k + i] - c0) * kTile;
    }
    for (int64_t o = 0; o < width; ++o) {
      q[o] += (a[0] * w[0][o] + a[1] * w[1][o] + a[2] * w[2][o] + a[3] * w[3][o]) +
              (a[4] * w[4][o] + a[5] * w[5][o] + a[6] * w[6][o] + a[7] * w[7][o]);
    }
  }
  for (; k + 4 <= count; k += 4) {
    const float a0 = x_row[cols[k]], a1 = x_row[cols[k + 1]], a2 = x_row[cols[k + 2]], a3 = x_row[cols[k + 3]];
    const float* w0 = wt + (cols[k] - c0) * kTile;
    const float* w1 = wt + (cols[k + 1] - c0) * kTile;
    const float* w2 = wt + (cols[k + 2] - c0) * kTile;
    const float* w3 = wt + (cols[k + 3] - c0) * kTile;
    for (int64_t o = 0; o < width; ++o) q[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o];
  }
  for (; k < count; ++k) {
    const float a = x_row[cols[k]];
    const float* w = wt + (cols[k] - c0) * kTile;
    for (int64_t o = 0; o < width; ++o) q[o] += a * w[o];
  }
}

// acc[k] += h_row[0:width] · wt[col_k - c0][0:width] for each dropped element k of the row: four dots at a time,
// each in 16 lanes (independent accumulators the compiler keeps in vector registers).
LK_MULTIVERSIONED
void dot_dropped_columns(const float* h_row, const int32_t* cols, int64_t count, int64_t c0, const float* wt,
                         int64_t width, float* acc) {
  constexpr int kLanes = 16;
  const int64_t body = width - width % kLanes;
  int64_t k = 0;
  for (; k < count; k += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, count - k));
    const float* w[4];
    for (int i = 0; i < 4; ++i) w[i] = wt + (cols[k + std::min(i, n - 1)] - c0) * kTile;
    float part[4][kLanes] = {};
    for (int64_t o = 0; o < body; o += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float hv = h_row[o + l];
        part[0][l] += hv * w[0][o + l];
        part[1][l] += hv * w[1][o + l];
        part[2][l] += hv * w[2][o + l];
        part[3][l] += hv * w[3][o + l];
      }
    }
    for (int i = 0; i < n; ++i) {
      float sum = 0.0f;
      for (int l = 0; l < kLanes; ++l) sum += part[i][l];
      for (int64_t o = body; o < width; ++o) sum += h_row[o] * w[i][o];
      acc[k + i] += sum;
    }
  }
}

// Walks the tiles of W0ᵀ in order (chunks of columns, then tiles of rows) and calls
// visit(first_dropped[m], end_dropped[m] for chunk, c0, o0, width, wt) for every row m, in parallel over rows.
template <typename Visit>
void for_each_tile(const at::Tensor& weight, const DroppedElements& dropped, int64_t M, Visit visit) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const float* w = weight.data_ptr<float>();
  std::vector<float> wt(kChunk * kTile);
  std::vector<int64_t> first(dropped.row_start.begin(), dropped.row_start.end() - 1), last(M);
  for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
    const int64_t cols = std::min(kChunk, in - c0);
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        int64_t k = first[m];
        const int64_t row_end = dropped.row_start[m + 1];
        while (k < row_end && dropped.column[k] < c0 + cols) ++k;
        last[m] = k;
      }
    });
    for (int64_t o0 = 0; o0 < out; o0 += kTile) {
      const int64_t rows = std::min(kTile, out - o0);
      transpose_tile(w, weight.stride(0), weight.stride(1), o0, rows, c0, cols, wt.data());
      at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          if (last[m] > first[m]) visit(m, first[m], last[m], c0, o0, rows, wt.data());
        }
      });
    }
    std::swap(first, last);
  }
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& keep) {
  LK_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
           "x must be a contiguous float32 [M, in] tensor, got ", x.sizes(), " ", x.scalar_type());
  LK_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == at::kFloat,
           "weight must be float32 [out, ", x.size(1), "], got ", weight.sizes(), " ", weight.scalar_type());
  LK_CHECK(keep.sizes() == x.sizes() && keep.is_contiguous() && keep.scalar_type() == at::kFloat,
           "keep must be a contiguous float32 mask of x's shape ", x.sizes(), ", got ", keep.sizes());
  LK_CHECK(x.device().is_cpu() && weight.device().is_cpu() && keep.device().is_cpu(), "dora_dropped: CPU tensors only");
}

}  // namespace

at::Tensor dora_dropped_product_cpu(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                                    const at::Tensor& keep) {
  check_args(x, weight, keep);
  const int64_t M = x.size(0), out = weight.size(0), in = x.size(1);
  at::Tensor q = at::empty({M, out}, x.options());  // a new tensor, never a view of bias (M = 0 included)
  if (bias.has_value()) {
    q.copy_(bias->expand({M, out}));
  } else {
    q.zero_();
  }
  if (M == 0 || in == 0 || out == 0) return q;
  const DroppedElements dropped = dropped_elements(keep);
  const float* xs = x.data_ptr<float>();
  float* qs = q.data_ptr<float>();
  for_each_tile(weight, dropped, M, [&](int64_t m, int64_t k0, int64_t k1, int64_t c0, int64_t o0, int64_t width,
                                        const float* wt) {
    add_dropped_columns(xs + m * in, &dropped.column[k0], k1 - k0, c0, wt, width, qs + m * out + o0);
  });
  return q;
}

void dora_dropped_gradient_cpu_(at::Tensor& dx, const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& keep, double scale) {
  LK_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat && h.size(1) == weight.size(0),
           "h must be a contiguous float32 [M, ", weight.size(0), "] tensor, got ", h.sizes(), " ", h.scalar_type());
  LK_CHECK(dx.dim() == 2 && dx.is_contiguous() && dx.size(0) == h.size(0) && dx.size(1) == weight.size(1),
           "dx must be a contiguous [", h.size(0), ", ", weight.size(1), "] tensor, got ", dx.sizes());
  check_args(dx, weight, keep);
  const int64_t M = dx.size(0), out = weight.size(0), in = dx.size(1);
  if (M == 0 || in == 0 || out == 0) return;
  const DroppedElements dropped = dropped_elements(keep);
  std::vector<float> acc(dropped.column.size(), 0.0f);
  const float* hs = h.data_ptr<float>();
  for_each_tile(weight, dropped, M, [&](int64_t m, int64_t k0, int64_t k1, int64_t c0, int64_t o0, int64_t width,
                                        const float* wt) {
    dot_dropped_columns(hs + m * out + o0, &dropped.column[k0], k1 - k0, c0, wt, width, &acc[k0]);
  });
  float* d = dx.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k = dropped.row_start[m]; k < dropped.row_start[m + 1]; ++k) d[m * in + dropped.column[k]] += s * acc[k];
    }
  });
}

}  // namespace lora_kernels
