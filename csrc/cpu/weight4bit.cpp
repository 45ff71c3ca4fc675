// The 4-bit base weight on the CPU (bitsandbytes' NF4/FP4 layout, lora_kernels/weight4bit.py): its products
// with x (forward) and dy (dx in backward), without ever building the whole dequantized [out, in] weight.
//
//   M <= 16, float32 one pass over the packed weight: 32 codes at a time are looked up in the 16-entry
//                    table (one AVX-512 permute, two AVX2 permutes and a blend), scaled, and multiplied with every
//                    row of x in registers; for dx each of 8 fixed shares of W0's rows adds dy[m, o] times row
//                    o, dequantized in L1, to its own dx. Decode is memory-bound: it reads 1/8 of the float32
//                    weight's bytes.
//   otherwise        panels of W0 (rows for y = x W0ᵀ, columns for dx = dy W0) are dequantized into one
//                    buffer (4-16 MB: panel_bytes) in the compute dtype and fed to BLAS, which keeps the GEMM at
//                    its own speed; panels are dequantized in parallel, one parallel region each.
//
// An element is table[code] · scale in float32 (one rounding), then rounded to the compute dtype: bitsandbytes'
// dequantize_4bit. With double quantization a block's scale is nested_code[q] · nested_absmax[b / 256] + offset,
// two float32 roundings, as bitsandbytes decodes it. The vector paths are chosen at run time from the CPU's ISA
// (LORA_KERNELS_CPU_ISA=avx512|avx2|scalar forces one, for tests and for measuring each on one machine).
#include "../fused_common.h"
#include "../weight4bit.h"
#include "multiversion.h"
#include "parallel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_X86 1
#endif

namespace lora_kernels {
namespace fused {
namespace {

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detected_isa() {
#ifdef LK_X86
  static const Isa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? Isa::kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")   ? Isa::kAvx2
                                                                                                : Isa::kScalar;
  return best;
#else
  return Isa::kScalar;
#endif
}

// The ISA the kernels use: the CPU's best, or a lower one asked for by LORA_KERNELS_CPU_ISA (read per call).
Isa chosen_isa() {
  const Isa best = detected_isa();
  const char* asked = std::getenv("LORA_KERNELS_CPU_ISA");
  if (asked == nullptr || *asked == '\0') return best;
  Isa want = best;
  if (std::strcmp(asked, "scalar") == 0) want = Isa::kScalar;
  if (std::strcmp(asked, "avx2") == 0) want = Isa::kAvx2;
  if (std::strcmp(asked, "avx512") == 0) want = Isa::kAvx512;
  return std::min(want, best);
}

// Elements per vector chunk: 16 bytes of codes. Blocks are multiples of 32 elements and start at multiples of
// their size, so a chunk that starts at a multiple of 32 lies in one block (one scale).
constexpr int64_t kChunk = 32;

// The scale of element e's block, decoded only when the block changes (a chunk loop meets each block
// blocksize / 32 times in a row; the blocksize is a power of two).
class BlockScale {
 public:
  explicit BlockScale(const Packed4bit& w) : w_(w), shift_(__builtin_ctzll(static_cast<uint64_t>(w.blocksize))) {}
  float operator()(int64_t e) {
    const int64_t b = e >> shift_;
    if (b != block_) {
      block_ = b;
      scale_ = w_.scale(b);
    }
    return scale_;
  }

 private:
  const Packed4bit& w_;
  int shift_;
  int64_t block_ = -1;
  float scale_ = 0.0f;
};

float element(const Packed4bit& w, int64_t e) {
  const uint8_t byte = w.codes[e >> 1];
  return w.table[(e & 1) ? (byte & 15) : (byte >> 4)] * w.scale(e / w.blocksize);
}

#ifdef LK_X86
// The 32 codes of 16 bytes as nibble indices in element order (high nibble first): two [16] byte vectors.
__attribute__((target("avx2"))) inline void nibbles_in_order(const uint8_t* bytes, __m128i& first, __m128i& second) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low = _mm_set1_epi8(15);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
  const __m128i lo = _mm_and_si128(packed, low);
  first = _mm_unpacklo_epi8(high, lo);
  second = _mm_unpackhi_epi8(high, lo);
}

// 16 table values, one 512-bit permute (the whole table fits a register).
__attribute__((target("avx512f,avx512bw"))) inline __m512 lookup16_avx512(__m128i nibbles, __m512 table) {
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles), table);
}

__attribute__((target("avx512f,avx512bw"))) void dequantize_chunks_avx512(const Packed4bit& w, int64_t e,
                                                                         int64_t chunks, float* out) {
  const __m512 table = _mm512_loadu_ps(w.table);
  BlockScale block_scale(w);
  for (int64_t c = 0; c < chunks; ++c, e += kChunk, out += kChunk) {
    const __m512 scale = _mm512_set1_ps(block_scale(e));
    __m128i first, second;
    nibbles_in_order(w.codes + (e >> 1), first, second);
    _mm512_storeu_ps(out, _mm512_mul_ps(lookup16_avx512(first, table), scale));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(lookup16_avx512(second, table), scale));
  }
}

// sums[r] += Σ W0 element · x[r, k] over the chunks, for R rows of x at once: each chunk is decoded once and
// multiplied with every row (R accumulators in registers).
//
// x is packed chunk-major (xpack below): chunk c of row r at x + c·(R_total·32) + r·32, so that the rows' loads
// are at fixed offsets from one pointer (row-major rows a power of two apart also share L1 sets).
template <int R>
__attribute__((target("avx512f,avx512bw"))) void dot_chunks_avx512(const Packed4bit& w, int64_t e, int64_t chunks,
                                                                  const float* x, int64_t cstride, float* sums) {
  // Few rows: two accumulators per row, so that a chunk's two FMAs do not wait on each other (decode would
  // otherwise run at the FMA latency, not at its throughput).
  constexpr int kSplit = R <= 4 ? 2 : 1;
  const __m512 table = _mm512_loadu_ps(w.table);
  __m512 acc[R][kSplit];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kSplit; ++i) acc[r][i] = _mm512_setzero_ps();
  BlockScale block_scale(w);
  for (int64_t c = 0; c < chunks; ++c, e += kChunk, x += cstride) {
    const __m512 scale = _mm512_set1_ps(block_scale(e));
    __m128i first, second;
    nibbles_in_order(w.codes + (e >> 1), first, second);
    const __m512 v0 = _mm512_mul_ps(lookup16_avx512(first, table), scale);
    const __m512 v1 = _mm512_mul_ps(lookup16_avx512(second, table), scale);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + r * kChunk), acc[r][0]);
      acc[r][kSplit - 1] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + r * kChunk + 16), acc[r][kSplit - 1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 total = acc[r][0];
    if (kSplit == 2) total = _mm512_add_ps(total, acc[r][kSplit - 1]);
    sums[r] += _mm512_reduce_add_ps(total);
  }
}

// 8 table values: two 8-entry permutes and a blend on the index's bit 3.
__attribute__((target("avx2,fma"))) inline __m256 lookup8_avx2(__m128i nibbles, __m256 table_lo, __m256 table_hi) {
  const __m256i index = _mm256_cvtepu8_epi32(nibbles);
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_lo, index), _mm256_permutevar8x32_ps(table_hi, index),
                          upper);
}

// The 32 values of one chunk, unscaled, as four [8] vectors in element order.
__attribute__((target("avx2,fma"))) inline void lookup32_avx2(const uint8_t* bytes, __m256 table_lo,
                                                              __m256 table_hi, __m256 v[4]) {
  __m128i first, second;
  nibbles_in_order(bytes, first, second);
  v[0] = lookup8_avx2(first, table_lo, table_hi);
  v[1] = lookup8_avx2(_mm_srli_si128(first, 8), table_lo, table_hi);
  v[2] = lookup8_avx2(second, table_lo, table_hi);
  v[3] = lookup8_avx2(_mm_srli_si128(second, 8), table_lo, table_hi);
}

__attribute__((target("avx2,fma"))) void dequantize_chunks_avx2(const Packed4bit& w, int64_t e, int64_t chunks,
                                                               float* out) {
  const __m256 table_lo = _mm256_loadu_ps(w.table), table_hi = _mm256_loadu_ps(w.table + 8);
  BlockScale block_scale(w);
  for (int64_t c = 0; c < chunks; ++c, e += kChunk, out += kChunk) {
    const __m256 scale = _mm256_set1_ps(block_scale(e));
    __m256 v[4];
    lookup32_avx2(w.codes + (e >> 1), table_lo, table_hi, v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(v[i], scale));
  }
}

__attribute__((target("avx2,fma"))) inline float sum8_avx2(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

template <int R>
__attribute__((target("avx2,fma"))) void dot_chunks_avx2(const Packed4bit& w, int64_t e, int64_t chunks,
                                                        const float* x, int64_t cstride, float* sums) {
  // Few rows: 4 (2) accumulators per row, so that a chunk's four FMAs per row do not wait on each other.
  constexpr int kSplit = R == 1 ? 4 : R == 2 ? 2 : 1;
  const __m256 table_lo = _mm256_loadu_ps(w.table), table_hi = _mm256_loadu_ps(w.table + 8);
  __m256 acc[R][kSplit];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kSplit; ++i) acc[r][i] = _mm256_setzero_ps();
  BlockScale block_scale(w);
  for (int64_t c = 0; c < chunks; ++c, e += kChunk, x += cstride) {
    const __m256 scale = _mm256_set1_ps(block_scale(e));
    __m256 v[4];
    lookup32_avx2(w.codes + (e >> 1), table_lo, table_hi, v);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(v[i], scale);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i)
        acc[r][i % kSplit] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + r * kChunk + 8 * i), acc[r][i % kSplit]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int i = 1; i < kSplit; ++i) total = _mm256_add_ps(total, acc[r][i]);
    sums[r] += sum8_avx2(total);
  }
}
#endif

void dequantize_chunks_scalar(const Packed4bit& w, int64_t e, int64_t chunks, float* out) {
  for (int64_t i = 0; i < chunks * kChunk; ++i) out[i] = element(w, e + i);
}

void dot_chunks_scalar(const Packed4bit& w, int64_t e, int64_t chunks, const float* x, int64_t cstride,
                       int64_t rows, float* sums) {
  for (int64_t c = 0; c < chunks; ++c, x += cstride)
    for (int64_t i = 0; i < kChunk; ++i) {
      const float value = element(w, e + c * kChunk + i);
      for (int64_t r = 0; r < rows; ++r) sums[r] += value * x[r * kChunk + i];
    }
}

// Elements e0 .. e0+count-1 of the flattened weight: [head][whole chunks][tail], the chunks vectorised.
struct Span {
  int64_t head, chunks, tail;
  Span(int64_t e0, int64_t count) {
    head = std::min(count, (kChunk - e0 % kChunk) % kChunk);
    chunks = (count - head) / kChunk;
    tail = count - head - chunks * kChunk;
  }
};

void dequantize_span(const Packed4bit& w, Isa isa, int64_t e0, int64_t count, float* out) {
  const Span s(e0, count);
  for (int64_t i = 0; i < s.head; ++i) out[i] = element(w, e0 + i);
  const int64_t e = e0 + s.head;
  switch (isa) {
#ifdef LK_X86
    case Isa::kAvx512: dequantize_chunks_avx512(w, e, s.chunks, out + s.head); break;
    case Isa::kAvx2: dequantize_chunks_avx2(w, e, s.chunks, out + s.head); break;
#endif
    default: dequantize_chunks_scalar(w, e, s.chunks, out + s.head);
  }
  const int64_t tail0 = s.head + s.chunks * kChunk;
  for (int64_t i = 0; i < s.tail; ++i) out[tail0 + i] = element(w, e0 + tail0 + i);
}

// R rows of x at a time, in groups of the vector kernels' sizes (AVX2 has 16 registers: at most 8 rows).
template <int R>
void dot_chunks(const Packed4bit& w, Isa isa, int64_t e, int64_t chunks, const float* x, int64_t cstride,
                float* sums) {
#ifdef LK_X86
  if (isa == Isa::kAvx512) return dot_chunks_avx512<R>(w, e, chunks, x, cstride, sums);
  if (isa == Isa::kAvx2 && R <= 8) return dot_chunks_avx2<R <= 8 ? R : 8>(w, e, chunks, x, cstride, sums);
#endif
  dot_chunks_scalar(w, e, chunks, x, cstride, R, sums);
}

// x [rows, in] packed chunk-major for the fused forward: element (r, k) at ((k / 32)·rows + r)·32 + k % 32, the
// last chunk zero-padded.
struct PackedX {
  std::vector<float> data;
  int64_t rows, chunks;
  PackedX(const float* x, int64_t rows_, int64_t in) : rows(rows_), chunks((in + kChunk - 1) / kChunk) {
    data.assign(chunks * rows * kChunk, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < in; ++k) data[((k / kChunk) * rows + r) * kChunk + k % kChunk] = x[r * in + k];
  }
  float at(int64_t r, int64_t k) const { return data[((k / kChunk) * rows + r) * kChunk + k % kChunk]; }
};

// sums[r] = Σ_k W0[o, k] · x[r, k] for the `rows` (≤ kFusedRows) rows of x. The vector chunks need the row to
// start on a chunk (in a multiple of 32); other rows take the head/tail elements one at a time.
void dot_row(const Packed4bit& w, Isa isa, int64_t o, const PackedX& x, float* sums) {
  const int64_t e0 = o * w.in, rows = x.rows;
  const Span s(e0, w.in);
  for (int64_t r = 0; r < rows; ++r) sums[r] = 0.0f;
  if (s.head != 0 || w.in % kChunk != 0) {  // the chunks of W0's row and of x do not line up: one at a time
    for (int64_t k = 0; k < w.in; ++k) {
      const float value = element(w, e0 + k);
      for (int64_t r = 0; r < rows; ++r) sums[r] += value * x.at(r, k);
    }
    return;
  }
  const int64_t cstride = rows * kChunk;
  int64_t r = 0;
  const float* xp = x.data.data();
  for (; rows - r >= 16 && isa == Isa::kAvx512; r += 16) dot_chunks<16>(w, isa, e0, s.chunks, xp + r * kChunk, cstride, sums + r);
  for (; rows - r >= 8; r += 8) dot_chunks<8>(w, isa, e0, s.chunks, xp + r * kChunk, cstride, sums + r);
  for (; rows - r >= 4; r += 4) dot_chunks<4>(w, isa, e0, s.chunks, xp + r * kChunk, cstride, sums + r);
  for (; rows - r >= 2; r += 2) dot_chunks<2>(w, isa, e0, s.chunks, xp + r * kChunk, cstride, sums + r);
  for (; r < rows; ++r) dot_chunks<1>(w, isa, e0, s.chunks, xp + r * kChunk, cstride, sums + r);
}

// Row i of a panel: W0's elements e0 .. e0+cols-1 in the compute dtype (16-bit: through a float32 row, each
// value rounded to nearest even).
void dequantize_row(const Packed4bit& w, Isa isa, int64_t e0, int64_t cols, float* out, std::vector<float>&) {
  dequantize_span(w, isa, e0, cols, out);
}

template <typename T>
void dequantize_row(const Packed4bit& w, Isa isa, int64_t e0, int64_t cols, T* out, std::vector<float>& wide) {
  wide.resize(cols);
  dequantize_span(w, isa, e0, cols, wide.data());
  for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<T>(wide[j]);
}

// out[i, j] = W0[row0 + i, col0 + j] in the compute dtype (out: [rows, cols], contiguous), rows in parallel.
void dequantize_panel(const Packed4bit& w, Isa isa, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                      at::Tensor out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_panel", [&] {
    scalar_t* base = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
    parallel_pieces(rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> wide;
      for (int64_t i = begin; i < end; ++i) dequantize_row(w, isa, (row0 + i) * w.in + col0, cols, base + i * cols, wide);
    });
  });
}

// a[j] += g · v[j] (the fused backward's inner loop, built for AVX-512, AVX2 and baseline x86-64)
LK_MULTIVERSIONED void axpy(float g, const float* v, float* a, int64_t count) {
  for (int64_t j = 0; j < count; ++j) a[j] += g * v[j];
}

// Rows of x (dy) up to which the forward (dx) reads the packed weight directly (decode); above, panels feed BLAS.
// (Measured on a 2-vCPU AMD EPYC, AVX2, 4096², float32, both paths on both threads: the fused forward 8.6 ms
// against the panels' 12.7 at M = 16, 12.7 against 14.4 at 24, a tie at 32; the fused dx wins up to 16 and loses
// from 24. benchmarks/NOTES.md. The seventh session's threshold, 8, was measured with the fused path on one thread.)
constexpr int64_t kFusedRows = 16;

// y_part (a column range o0.. of y) = bias[o0..] + x · panelᵀ
void add_base_product(at::Tensor y_part, const OptionalTensor& bias, int64_t o0, const at::Tensor& x,
                      const at::Tensor& panel_t) {
  if (bias.has_value()) {
    at::addmm_out(y_part, bias->narrow(0, o0, y_part.size(1)), x, panel_t);
  } else {
    at::mm_out(y_part, x, panel_t);
  }
}

// The panel buffer's bytes: half the bytes of x (dy) itself, within [4 MB, 16 MB]. Each panel's GEMM re-reads
// (BLAS re-packs) all of x, so the panel count is what costs at large M: 4096², M = 2048, float32 measured 1.32x
// our dense layer's forward with 4 MB panels, 1.20x with 8 MB, 1.03x with 16 MB (benchmarks/NOTES.md). At half
// of x the panel is never the call's largest temporary; the 4 MB floor keeps small batches' panels few.
int64_t panel_bytes(int64_t x_bytes) {
  return std::min<int64_t>(int64_t{16} << 20, std::max<int64_t>(int64_t{4} << 20, x_bytes / 2));
}

// Rows (or columns) of W0 per panel when each holds `other` elements of `element_size` bytes.
int64_t panel_extent(int64_t bytes, int64_t other, int64_t element_size, int64_t total) {
  const int64_t fit = bytes / std::max<int64_t>(1, other * element_size);
  return std::min(total, std::max<int64_t>(kChunk, fit / kChunk * kChunk));
}

}  // namespace

at::Tensor Packed4bit::forward(const at::Tensor& x, const OptionalTensor& bias) const {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, out}, x.options());
  if (M == 0 || out == 0) return y;
  if (in == 0) return bias.has_value() ? y.copy_(bias->expand({M, out})) : y.zero_();
  const Isa isa = chosen_isa();
  if (M <= kFusedRows && x.scalar_type() == at::kFloat) {
    // decode: one pass over the packed weight, each 32-code chunk decoded once for all M rows of x; output
    // rows in parallel
    const at::Tensor xc = x.contiguous();
    const PackedX xpack(xc.data_ptr<float>(), M, in);
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    float* yp = y.data_ptr<float>();
    const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
    parallel_pieces(out, std::max<int64_t>(1, 65536 / in), [&](int64_t begin, int64_t end) {
      float sums[kFusedRows];
      for (int64_t o = begin; o < end; ++o) {
        dot_row(*this, isa, o, xpack, sums);
        for (int64_t m = 0; m < M; ++m) yp[m * out + o] = sums[m] + (bp ? bp[o] : 0.0f);
      }
    });
    return y;
  }
  const int64_t rows = panel_extent(panel_bytes(x.numel() * x.element_size()), in, x.element_size(), out);
  at::Tensor panel = at::empty({rows, in}, x.options());
  for (int64_t o0 = 0; o0 < out; o0 += rows) {
    const int64_t count = std::min(rows, out - o0);
    at::Tensor part = panel.narrow(0, 0, count);
    dequantize_panel(*this, isa, o0, count, 0, in, part);
    add_base_product(y.narrow(1, o0, count), bias, o0, x, part.t());
  }
  return y;
}

at::Tensor Packed4bit::input_grad(const at::Tensor& grad_y) const {
  const int64_t M = grad_y.size(0);
  at::Tensor dx = at::empty({M, in}, grad_y.options());
  if (M == 0 || in == 0) return dx;
  if (out == 0) return dx.zero_();
  const Isa isa = chosen_isa();
  if (M <= kFusedRows && grad_y.scalar_type() == at::kFloat) {
    // one pass over the packed weight: the rows of W0 in kBlockShares fixed shares (one parallel region), each
    // share dequantizing its rows one at a time (in L1) and adding dy[m, o] times row o to its own float32 dx,
    // the shares' sums added in share order (the same result whatever the number of threads)
    const at::Tensor dy = grad_y.contiguous();
    const float* dyp = dy.data_ptr<float>();
    const int64_t shares = block_shares(kCpu, out);
    at::Tensor partial = at::empty({shares, M, in}, dy.options());
    float* pp = partial.data_ptr<float>();
    for_block_shares(kCpu, out, [&](int64_t first, int64_t end, int64_t share) {
      std::vector<float> row(in);
      float* acc = pp + share * M * in;
      std::fill(acc, acc + M * in, 0.0f);  // here, not as at::zeros: that would be one more parallel region
      for (int64_t o = first; o < end; ++o) {
        dequantize_span(*this, isa, o * in, in, row.data());
        for (int64_t m = 0; m < M; ++m) axpy(dyp[m * out + o], row.data(), acc + m * in, in);
      }
    });
    const SerialCalls serial(true);  // [shares, M <= 16, in]: too small for a parallel region of its own
    return shares == 1 ? partial[0] : partial.sum(0);
  }
  const int64_t cols = panel_extent(panel_bytes(grad_y.numel() * grad_y.element_size()), out,
                                    grad_y.element_size(), in);
  at::Tensor buffer = at::empty({out * cols}, grad_y.options());
  for (int64_t c0 = 0; c0 < in; c0 += cols) {
    const int64_t count = std::min(cols, in - c0);
    at::Tensor part = buffer.narrow(0, 0, out * count).view({out, count});
    dequantize_panel(*this, isa, 0, out, c0, count, part);
    at::Tensor dx_part = dx.narrow(1, c0, count);
    at::mm_out(dx_part, grad_y, part);
  }
  return dx;
}

at::Tensor Packed4bit::dequantize(at::ScalarType dtype) const {
  at::Tensor w = at::empty({out, in}, at::TensorOptions().dtype(dtype));
  if (out > 0 && in > 0) dequantize_panel(*this, chosen_isa(), 0, out, 0, in, w);
  return w;
}

}  // namespace fused
}  // namespace lora_kernels
