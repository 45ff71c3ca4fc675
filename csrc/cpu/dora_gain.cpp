// DoRA's backward epilogue on the CPU, one pass over dy and z (ops/dora_linear.py, AtenGain.dora_gain_gradients
// is the same function in ATen ops):
//
//   g_dy = g ⊙ dy      [M, out] in out_dtype, computed in g's dtype and rounded once (the LoRA backward's input)
//   dz   = Σ_rows dy ⊙ z   [out] in g's dtype (the magnitude's gradient, before dividing by the norm)
//
// ATen needs three passes and a [M, out] temporary for this (dy ⊙ g; dy ⊙ z; its column sum): at M = 2048,
// out = 1024 that is 40 MB of memory traffic, much of it fresh pages, against 24 MB here. The rows are cut in at
// most 16 pieces fixed by M, each summed on its own and the partial sums added in piece order: the same dz
// whatever the number of threads. The sums are float64 (the products of two float32 values are exact there), so
// dz is at least as accurate as ATen's cascade sum. g_dy is bit for bit ATen's (one IEEE product, then the cast).
#include "../lora_kernels.h"
#include "multiversion.h"
#include "parallel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace lora_kernels {
namespace {

constexpr int64_t kMaxPieces = 16;  // row pieces per call: fixed by M alone, so the sums do not depend on threads

// Rows [r0, r1) over all columns: g_dy and (with z) the float64 partial column sums of dy ⊙ z into sums [cols].
template <typename DY, typename Z, typename OUT, typename G>
void gain_gradient_rows(const DY* dy, const Z* z, const G* gain, OUT* g_dy, double* sums, int64_t r0, int64_t r1,
                        int64_t cols) {
  for (int64_t m = r0; m < r1; ++m) {
    const DY* dy_row = dy + m * cols;
    OUT* out_row = g_dy + m * cols;
    for (int64_t c = 0; c < cols; ++c) out_row[c] = static_cast<OUT>(static_cast<G>(dy_row[c]) * gain[c]);
    if (z == nullptr) continue;
    const Z* z_row = z + m * cols;
    for (int64_t c = 0; c < cols; ++c)
      sums[c] += static_cast<double>(static_cast<G>(dy_row[c])) * static_cast<double>(static_cast<G>(z_row[c]));
  }
}

// The float32 case, where the time goes, compiled for every ISA (multiversion.h); the rest as templates.
LK_MULTIVERSIONED
void gain_gradient_rows_f32(const float* dy, const float* z, const float* gain, float* g_dy, double* sums,
                            int64_t r0, int64_t r1, int64_t cols) {
  gain_gradient_rows(dy, z, gain, g_dy, sums, r0, r1, cols);
}

// Row pieces, each with its own partial sums (contiguous rows: one stream per operand; a split by columns would
// walk rows 4 KB apart at out = 1024, every one in its own page and L1 set), added in piece order at the end.
template <typename DY, typename Z, typename OUT, typename G>
void run(const at::Tensor& grad_y, const at::Tensor* z, const at::Tensor& gain, at::Tensor& g_dy, at::Tensor& dz) {
  const int64_t rows = grad_y.size(0), cols = grad_y.size(1);
  const bool with_z = z != nullptr;
  const DY* dy = grad_y.data_ptr<DY>();
  const Z* zp = with_z ? z->data_ptr<Z>() : nullptr;
  const G* gp = gain.data_ptr<G>();
  OUT* out = g_dy.data_ptr<OUT>();
  // one parallel region for the whole call, and none for a small one (a decode step's M = 1)
  const int64_t per_piece = rows * cols >= (1 << 16) ? std::max<int64_t>(1, (rows + kMaxPieces - 1) / kMaxPieces)
                                                     : std::max<int64_t>(1, rows);
  const int64_t pieces = (rows + per_piece - 1) / per_piece;
  std::vector<double> partial(with_z ? pieces * cols : 0, 0.0);
  parallel_pieces(rows, per_piece, [&](int64_t r0, int64_t r1) {
    for (int64_t begin = r0; begin < r1; begin += per_piece) {  // whole pieces (a thread may be handed several)
      double* sums = with_z ? partial.data() + (begin / per_piece) * cols : nullptr;
      const int64_t end = std::min(r1, begin + per_piece);
      if constexpr (std::is_same_v<DY, float> && std::is_same_v<Z, float> && std::is_same_v<OUT, float> &&
                    std::is_same_v<G, float>) {
        gain_gradient_rows_f32(dy, zp, gp, out, sums, begin, end, cols);
      } else {
        gain_gradient_rows(dy, zp, gp, out, sums, begin, end, cols);
      }
    }
  });
  if (!with_z) return;
  G* dzp = dz.data_ptr<G>();
  for (int64_t c = 0; c < cols; ++c) {
    double total = 0.0;
    for (int64_t piece = 0; piece < pieces; ++piece) total += partial[piece * cols + c];
    dzp[c] = static_cast<G>(total);
  }
}

template <typename DY, typename G>
void run_for_dy(const at::Tensor& grad_y, const at::Tensor* z, const at::Tensor& gain, at::Tensor& g_dy,
                at::Tensor& dz) {
  const bool wide_out = g_dy.scalar_type() != grad_y.scalar_type();  // float32 g ⊙ dy for float32 adapters
  const bool wide_z = z != nullptr && z->scalar_type() != grad_y.scalar_type();
  if constexpr (std::is_same_v<DY, float> || std::is_same_v<DY, double>) {
    run<DY, DY, DY, G>(grad_y, z, gain, g_dy, dz);
  } else if (wide_out && wide_z) {
    run<DY, float, float, G>(grad_y, z, gain, g_dy, dz);
  } else if (wide_out) {
    run<DY, DY, float, G>(grad_y, z, gain, g_dy, dz);
  } else if (wide_z) {
    run<DY, float, DY, G>(grad_y, z, gain, g_dy, dz);
  } else {
    run<DY, DY, DY, G>(grad_y, z, gain, g_dy, dz);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dora_gain_gradients_cpu(const at::Tensor& grad_y, const OptionalTensor& z,
                                                           const at::Tensor& gain, at::ScalarType out_dtype) {
  LK_CHECK(grad_y.dim() == 2, "grad_y must be 2-D [M, out], got ", grad_y.sizes());
  const int64_t out_features = grad_y.size(1);
  LK_CHECK(gain.dim() == 1 && gain.size(0) == out_features, "gain must be [", out_features, "], got ", gain.sizes());
  const auto dy_type = grad_y.scalar_type(), gain_type = gain.scalar_type();
  LK_CHECK(gain_type == (dy_type == at::kDouble ? at::kDouble : at::kFloat),
           "gain must be float64 for float64 grad_y, else float32; got ", gain_type, " for ", dy_type);
  LK_CHECK(out_dtype == dy_type || (out_dtype == at::kFloat && dy_type != at::kDouble),
           "out_dtype must be grad_y's dtype or float32, got ", out_dtype, " for ", dy_type);
  if (z.has_value()) {
    LK_CHECK(z->sizes() == grad_y.sizes(), "z must be ", grad_y.sizes(), ", got ", z->sizes());
    LK_CHECK(z->scalar_type() == dy_type || (z->scalar_type() == at::kFloat && dy_type != at::kDouble),
             "z must have grad_y's dtype or float32, got ", z->scalar_type());
  }
  const at::Tensor dy = grad_y.contiguous(), g = gain.contiguous();
  const at::Tensor zc = z.has_value() ? z->contiguous() : at::Tensor();
  at::Tensor g_dy = at::empty(dy.sizes(), dy.options().dtype(out_dtype));
  at::Tensor dz = z.has_value() ? at::empty({out_features}, dy.options().dtype(gain_type)) : at::empty({0}, dy.options());
  const at::Tensor* zp = z.has_value() ? &zc : nullptr;
  switch (dy_type) {
    case at::kFloat: run_for_dy<float, float>(dy, zp, g, g_dy, dz); break;
    case at::kDouble: run_for_dy<double, double>(dy, zp, g, g_dy, dz); break;
    case at::kBFloat16: run_for_dy<c10::BFloat16, float>(dy, zp, g, g_dy, dz); break;
    case at::kHalf: run_for_dy<c10::Half, float>(dy, zp, g, g_dy, dz); break;
    default: LK_CHECK(false, "grad_y must be float16, bfloat16, float32 or float64, got ", dy_type);
  }
  return {g_dy, dz};
}

}  // namespace lora_kernels
