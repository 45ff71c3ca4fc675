// The 4-bit base weight on the CPU (bitsandbytes' NF4/FP4 layout, lora_kernels/weight4bit.py): its products
// with x (forward) and dy (dx in backward), without ever building the whole dequantized [out, in] weight.
//
//   M <= 16, float32 one pass over the packed weight: 32 codes at a time are looked up in the 16-entry
//                    table, scaled once per block (shifts in "lane order", then one AVX-512 permute, or two
//                    AVX2 permutes and a blend, per vector), and multiplied with every row of x in registers;
//                    for dx each of 8 fixed shares of W0's rows adds dy[m, o] times row o to its own dx, a tile
//                    of 16 rows × 256 columns at a time (dequantized into L1, added register-blocked). Decode reads 1/8 of the float32 weight's bytes; at M = 1 it is bound by the
//                    decoding (~13 GB/s of codes on 2 cores, where F.linear streams ~50 GB/s), above by the FMAs.
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
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
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

// Lanes of a partial dot product (dot_chunks_*): an AVX-512 vector.
constexpr int64_t kLanes = 16;

// Elements per vector chunk: 16 bytes of codes. Blocks are multiples of 32 elements and start at multiples of
// their size, so a chunk that starts at a multiple of 32 lies in one block (one scale).
constexpr int64_t kChunk = 32;

// The scale of element e's block, decoded only when the block changes (a chunk loop meets each block
// blocksize / 32 times in a row; the blocksize is a power of two).
class BlockScale {
 public:
  explicit BlockScale(const Packed4bit& w) : w_(w), shift_(__builtin_ctzll(static_cast<uint64_t>(w.blocksize))) {}
  // Whether element e lies in another block than the previous call's (then value() is the new block's scale).
  bool moved(int64_t e) {
    const int64_t b = e >> shift_;
    if (b == block_) return false;
    block_ = b;
    scale_ = w_.scale(b);
    return true;
  }
  float value() const { return scale_; }
  float operator()(int64_t e) {
    moved(e);
    return scale_;
  }

 private:
  const Packed4bit& w_;
  int shift_;
  int64_t block_ = -1;
  float scale_ = 0.0f;
};

// The fused products read a chunk's 32 codes in "lane order": position p (0-31) is the nibble at bits
// 4·(p / 4) .. +3 of the chunk's 32-bit word p % 4. A vector of those words broadcast to every 128-bit lane and
// shifted right by a per-lane amount then holds the table indices in its lanes' low bits, which is all a
// table permute reads: no unpacking, widening or masking. x is packed in the same order (PackedX); a dot
// product does not care in which order its terms come. Element (within the chunk) at position p: byte
// 4·(p % 4) + p / 8, its high nibble (the element first in memory order) when p / 4 is odd.
constexpr int64_t element_at_lane(int64_t p) { return 2 * (4 * (p % 4) + p / 8) + ((p / 4) % 2 == 1 ? 0 : 1); }

// The inverse: the lane of element i of a chunk.
struct LaneOf {
  int8_t lane[32] = {};
  constexpr LaneOf() {
    for (int p = 0; p < 32; ++p) lane[element_at_lane(p)] = static_cast<int8_t>(p);
  }
  int64_t operator()(int64_t i) const { return lane[i]; }
};
constexpr LaneOf lane_of;

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

// In element order: lane j of a chunk's first vector takes element j, the nibble at bits 8·((j % 8) / 2) + 4
// (j even: the high nibble) .. of 32-bit word j / 8; a word permute places the words, a per-lane shift the
// nibble, and the table (scaled once per block) is permuted by the index in each lane's low 4 bits.
__attribute__((target("avx512f,avx512bw"))) void dequantize_chunks_avx512(const Packed4bit& w, int64_t e,
                                                                         int64_t chunks, float* out) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const __m512i first_words = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second_words = _mm512_add_epi32(first_words, _mm512_set1_epi32(2));
  const __m512i shifts = _mm512_set_epi32(24, 28, 16, 20, 8, 12, 0, 4, 24, 28, 16, 20, 8, 12, 0, 4);
  BlockScale block_scale(w);
  __m512 scaled = table;
  for (int64_t c = 0; c < chunks; ++c, e += kChunk, out += kChunk) {
    if (block_scale.moved(e)) scaled = _mm512_mul_ps(table, _mm512_set1_ps(block_scale.value()));
    const __m512i words =
        _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + (e >> 1))));
    const __m512i first = _mm512_srlv_epi32(_mm512_permutexvar_epi32(first_words, words), shifts);
    const __m512i second = _mm512_srlv_epi32(_mm512_permutexvar_epi32(second_words, words), shifts);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(first, scaled));
    _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(second, scaled));
  }
}

// The decode state of dot_chunks_avx512: the table scaled for the current block, the shifts of the lane order.
struct LaneDecodeAvx512 {
  __m512 table, scaled;
  __m512i first_shifts, second_shifts;
};

// One chunk at element e into the accumulators: sum[r][..] += its values · x's chunk of row r.
template <int R, int kSplit>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void dot_chunk_avx512(
    const Packed4bit& w, BlockScale& block_scale, LaneDecodeAvx512& d, int64_t e, const float* x,
    __m512 (&sum)[R][kSplit]) {
  if (block_scale.moved(e)) d.scaled = _mm512_mul_ps(d.table, _mm512_set1_ps(block_scale.value()));
  const __m512i words = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + (e >> 1))));
  const __m512 v0 = _mm512_permutexvar_ps(_mm512_srlv_epi32(words, d.first_shifts), d.scaled);
  const __m512 v1 = _mm512_permutexvar_ps(_mm512_srlv_epi32(words, d.second_shifts), d.scaled);
  for (int r = 0; r < R; ++r) {
    sum[r][0] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + r * kChunk), sum[r][0]);
    sum[r][kSplit - 1] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + r * kChunk + 16), sum[r][kSplit - 1]);
  }
}

// partial[r] += Σ W0 element · x[r, k] over the chunks, for R rows of x at once: each chunk is decoded once and
// multiplied with every row (R accumulators in registers). partial holds kLanes floats per row of x, whose sum is
// the row's dot product: added lane-wise here, summed once at the end (fused_forward_rows), so that a row can be
// taken in several spans at no cost.
//
// x is packed chunk-major in lane order (PackedX below): chunk c of row r at x + c·(R_total·32) + r·32, so that
// the rows' loads are at fixed offsets from one pointer (row-major rows a power of two apart also share L1 sets).
// The table is scaled once per block (table[code] · scale: the same float32 product as scaling each looked-up
// value), so a chunk costs one broadcast load, two variable shifts and two permutes before its FMAs.
template <int R>
__attribute__((target("avx512f,avx512bw"))) void dot_chunks_avx512(const Packed4bit& w, int64_t e, int64_t chunks,
                                                                  const float* x, int64_t cstride, float* partial) {
  // Independent accumulators, so that the FMAs do not wait on each other's latency (~4 cycles; a chunk's decode
  // takes less): up to 4 rows of x two per row, and for one or two rows two chunks per step into two sets.
  constexpr int kSplit = R <= 4 ? 2 : 1, kSets = R <= 2 ? 2 : 1;
  LaneDecodeAvx512 d;
  d.table = d.scaled = _mm512_loadu_ps(w.table);
  d.first_shifts = _mm512_set_epi32(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
  d.second_shifts = _mm512_add_epi32(d.first_shifts, _mm512_set1_epi32(16));
  __m512 acc[kSets][R][kSplit];
  for (int set = 0; set < kSets; ++set)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kSplit; ++i) acc[set][r][i] = _mm512_setzero_ps();
  BlockScale block_scale(w);
  int64_t c = 0;
  for (; c + kSets <= chunks; c += kSets, e += kSets * kChunk, x += kSets * cstride)
    for (int set = 0; set < kSets; ++set)
      dot_chunk_avx512<R, kSplit>(w, block_scale, d, e + set * kChunk, x + set * cstride, acc[set]);
  for (; c < chunks; ++c, e += kChunk, x += cstride) dot_chunk_avx512<R, kSplit>(w, block_scale, d, e, x, acc[0]);
  for (int r = 0; r < R; ++r) {
    __m512 total = acc[0][r][0];
    for (int set = 0; set < kSets; ++set)
      for (int i = 0; i < kSplit; ++i)
        if (set + i > 0) total = _mm512_add_ps(total, acc[set][r][i]);
    float* lanes = partial + r * kLanes;
    _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), total));
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

// 8 values of the 16-entry table for the indices in the low 4 bits of `right` (any bits above), whose bit 3 is
// the sign bit of `left`: two 8-entry permutes (which read bits 0-2) and a blend.
__attribute__((target("avx2,fma"))) inline __m256 lookup8_shifted_avx2(__m256i right, __m256i left, __m256 table_lo,
                                                                      __m256 table_hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_lo, right), _mm256_permutevar8x32_ps(table_hi, right),
                          _mm256_castsi256_ps(left));
}

// dot_chunks_avx512 with 8 lanes: four vectors per chunk, the lane order's shifts 8q + 4·(j / 4) for vector q,
// lane j; a left shift by 28 minus that moves the index's bit 3 to the sign bit for the blend.
template <int R>
__attribute__((target("avx2,fma"))) void dot_chunks_avx2(const Packed4bit& w, int64_t e, int64_t chunks,
                                                        const float* x, int64_t cstride, float* partial) {
  // Few rows: 4 (2) accumulators per row, so that a chunk's four FMAs per row do not wait on each other.
  constexpr int kSplit = R == 1 ? 4 : R == 2 ? 2 : 1;
  const __m256 table_lo = _mm256_loadu_ps(w.table), table_hi = _mm256_loadu_ps(w.table + 8);
  __m256i right[4], left[4];
  for (int q = 0; q < 4; ++q) {
    right[q] = _mm256_add_epi32(_mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0), _mm256_set1_epi32(8 * q));
    left[q] = _mm256_sub_epi32(_mm256_set1_epi32(28), right[q]);
  }
  __m256 acc[R][kSplit];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kSplit; ++i) acc[r][i] = _mm256_setzero_ps();
  BlockScale block_scale(w);
  __m256 scaled_lo = table_lo, scaled_hi = table_hi;
  for (int64_t c = 0; c < chunks; ++c, e += kChunk, x += cstride) {
    if (block_scale.moved(e)) {
      const __m256 scale = _mm256_set1_ps(block_scale.value());
      scaled_lo = _mm256_mul_ps(table_lo, scale);
      scaled_hi = _mm256_mul_ps(table_hi, scale);
    }
    const __m256i words =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + (e >> 1))));
    for (int q = 0; q < 4; ++q) {
      const __m256 v = lookup8_shifted_avx2(_mm256_srlv_epi32(words, right[q]), _mm256_sllv_epi32(words, left[q]),
                                            scaled_lo, scaled_hi);
      for (int r = 0; r < R; ++r)
        acc[r][q % kSplit] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * kChunk + 8 * q), acc[r][q % kSplit]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 total = acc[r][0];
    for (int i = 1; i < kSplit; ++i) total = _mm256_add_ps(total, acc[r][i]);
    float* lanes = partial + r * kLanes;  // the first 8 of its lanes
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_loadu_ps(lanes), total));
  }
}
#endif

void dequantize_chunks_scalar(const Packed4bit& w, int64_t e, int64_t chunks, float* out) {
  for (int64_t i = 0; i < chunks * kChunk; ++i) out[i] = element(w, e + i);
}

void dot_chunks_scalar(const Packed4bit& w, int64_t e, int64_t chunks, const float* x, int64_t cstride,
                       int64_t rows, float* partial) {
  for (int64_t c = 0; c < chunks; ++c, x += cstride)
    for (int64_t p = 0; p < kChunk; ++p) {  // x in lane order (PackedX)
      const float value = element(w, e + c * kChunk + element_at_lane(p));
      for (int64_t r = 0; r < rows; ++r) partial[r * kLanes] += value * x[r * kChunk + p];
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
                float* partial) {
#ifdef LK_X86
  if (isa == Isa::kAvx512) return dot_chunks_avx512<R>(w, e, chunks, x, cstride, partial);
  if (isa == Isa::kAvx2 && R <= 8) return dot_chunks_avx2<R <= 8 ? R : 8>(w, e, chunks, x, cstride, partial);
#endif
  dot_chunks_scalar(w, e, chunks, x, cstride, R, partial);
}

// x [rows, in] packed chunk-major for the fused forward, each chunk in lane order: element (r, k) at
// ((k / 32)·rows + r)·32 + lane_of(k % 32), the last chunk zero-padded.
struct PackedX {
  std::vector<float> data;
  int64_t rows, chunks;
  PackedX(const float* x, int64_t rows_, int64_t in) : rows(rows_), chunks((in + kChunk - 1) / kChunk) {
    data.assign(chunks * rows * kChunk, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < in; ++k) data[index(r, k)] = x[r * in + k];
  }
  float at(int64_t r, int64_t k) const { return data[index(r, k)]; }

 private:
  int64_t index(int64_t r, int64_t k) const { return ((k / kChunk) * rows + r) * kChunk + lane_of(k % kChunk); }
};

// partial[r] += Σ_k W0[o, k] · x[r, k] over chunks c0 .. c1-1 of row o, for every row of x (≤ kFusedRows), in
// groups of rows the vector kernels take. Row o must start on a chunk (in a multiple of 32).
void dot_row_span(const Packed4bit& w, Isa isa, int64_t o, int64_t c0, int64_t c1, const PackedX& x,
                  float* partial) {
  const int64_t e0 = o * w.in + c0 * kChunk, rows = x.rows, chunks = c1 - c0, cstride = rows * kChunk;
  const float* xp = x.data.data() + c0 * cstride;
  int64_t r = 0;
  auto group = [&](auto rows_at_once) {
    constexpr int R = decltype(rows_at_once)::value;
    dot_chunks<R>(w, isa, e0, chunks, xp + r * kChunk, cstride, partial + r * kLanes);
    r += R;
  };
  while (rows - r >= 16 && isa == Isa::kAvx512) group(std::integral_constant<int, 16>());
  while (rows - r >= 8) group(std::integral_constant<int, 8>());
  while (rows - r >= 4) group(std::integral_constant<int, 4>());
  while (rows - r >= 2) group(std::integral_constant<int, 2>());
  while (r < rows) group(std::integral_constant<int, 1>());
}

// y[m, o] = bias[o] + Σ_k W0[o, k] · x[m, k] for output rows begin .. end-1 and every row of x (≤ kFusedRows).
//
// Rows whose chunks line up with x's (in a multiple of 32) are taken in spans of chunks: the span of x read
// for all of them stays in L1 (~32 KB), where one whole row of x at a time came from L2 for every output row
// (16 rows of 4096: 256 KB per output row, L2-bound: 3.5-5 ms for a 4096² forward at M = 16 on 2 cores).
// Other rows take one element at a time.
void fused_forward_rows(const Packed4bit& w, Isa isa, const PackedX& x, const float* bias, int64_t begin,
                        int64_t end, float* y) {
  const int64_t rows = x.rows, count = end - begin;
  std::vector<float> partial(count * rows * kLanes, 0.0f);
  if (w.in % kChunk == 0) {
    const int64_t span = std::max<int64_t>(1, (int64_t{32} << 10) / (rows * kChunk * 4));
    for (int64_t c0 = 0; c0 < x.chunks; c0 += span)
      for (int64_t o = begin; o < end; ++o)
        dot_row_span(w, isa, o, c0, std::min(x.chunks, c0 + span), x, partial.data() + (o - begin) * rows * kLanes);
  } else {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t k = 0; k < w.in; ++k) {
        const float value = element(w, o * w.in + k);
        for (int64_t r = 0; r < rows; ++r) partial[((o - begin) * rows + r) * kLanes] += value * x.at(r, k);
      }
  }
  for (int64_t o = begin; o < end; ++o)
    for (int64_t r = 0; r < rows; ++r) {
      const float* lanes = partial.data() + ((o - begin) * rows + r) * kLanes;
      float sum = 0.0f;
      for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
      y[r * w.out + o] = sum + (bias != nullptr ? bias[o] : 0.0f);
    }
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

// The fused dx's inner step on a tile: acc[r, j] += Σ_i g[r, i] · tile[i, j] for R rows (acc rows acc_stride apart,
// g rows g_stride apart), i in order, one rounding per term (an FMA each, as a[j] += g · v[j] compiles to). Each
// column vector of the R rows stays in registers over the tile's rows: no load and store of acc per term.
#ifdef LK_X86
// Columns j0 .. cols-1 of the vector kernels' R rows, one element at a time (the same FMA per term).
void add_tile_products_tail(const float* g, int64_t g_stride, const float* tile, int64_t tile_stride, int64_t rows,
                            float* acc, int64_t acc_stride, int64_t j0, int64_t cols, int64_t R) {
  for (int64_t j = j0; j < cols; ++j)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < rows; ++i)
        acc[r * acc_stride + j] = std::fma(g[r * g_stride + i], tile[i * tile_stride + j], acc[r * acc_stride + j]);
}

// Columns [j, j + 16·C) of the R rows: R·C accumulators, so that few rows still keep C·R FMAs in flight (one
// row alone would wait on each FMA's latency).
template <int R, int C>
__attribute__((target("avx512f"), always_inline)) inline void tile_columns_avx512(
    const float* g, int64_t g_stride, const float* tile, int64_t tile_stride, int64_t rows, float* acc,
    int64_t acc_stride, int64_t j) {
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_loadu_ps(acc + r * acc_stride + j + 16 * c);
  for (int64_t i = 0; i < rows; ++i) {
    __m512 t[C];
    for (int c = 0; c < C; ++c) t[c] = _mm512_loadu_ps(tile + i * tile_stride + j + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 gv = _mm512_set1_ps(g[r * g_stride + i]);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(gv, t[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * acc_stride + j + 16 * c, a[r][c]);
}

template <int R>
__attribute__((target("avx512f"))) void add_tile_products_avx512(const float* g, int64_t g_stride, const float* tile,
                                                                 int64_t tile_stride, int64_t rows, float* acc,
                                                                 int64_t acc_stride, int64_t cols) {
  constexpr int C = R >= 4 ? 1 : 4 / R;
  int64_t j = 0;
  for (; j + 16 * C <= cols; j += 16 * C)
    tile_columns_avx512<R, C>(g, g_stride, tile, tile_stride, rows, acc, acc_stride, j);
  for (; j + 16 <= cols; j += 16) tile_columns_avx512<R, 1>(g, g_stride, tile, tile_stride, rows, acc, acc_stride, j);
  add_tile_products_tail(g, g_stride, tile, tile_stride, rows, acc, acc_stride, j, cols, R);
}

template <int R, int C>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_columns_avx2(
    const float* g, int64_t g_stride, const float* tile, int64_t tile_stride, int64_t rows, float* acc,
    int64_t acc_stride, int64_t j) {
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_loadu_ps(acc + r * acc_stride + j + 8 * c);
  for (int64_t i = 0; i < rows; ++i) {
    __m256 t[C];
    for (int c = 0; c < C; ++c) t[c] = _mm256_loadu_ps(tile + i * tile_stride + j + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 gv = _mm256_set1_ps(g[r * g_stride + i]);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(gv, t[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + r * acc_stride + j + 8 * c, a[r][c]);
}

template <int R>
__attribute__((target("avx2,fma"))) void add_tile_products_avx2(const float* g, int64_t g_stride, const float* tile,
                                                               int64_t tile_stride, int64_t rows, float* acc,
                                                               int64_t acc_stride, int64_t cols) {
  constexpr int C = R >= 4 ? 1 : 4 / R;
  int64_t j = 0;
  for (; j + 8 * C <= cols; j += 8 * C)
    tile_columns_avx2<R, C>(g, g_stride, tile, tile_stride, rows, acc, acc_stride, j);
  for (; j + 8 <= cols; j += 8) tile_columns_avx2<R, 1>(g, g_stride, tile, tile_stride, rows, acc, acc_stride, j);
  add_tile_products_tail(g, g_stride, tile, tile_stride, rows, acc, acc_stride, j, cols, R);
}
#endif

// add_tile_products for every one of `count` rows, in groups of 8, 4, 2 and 1 (without AVX2: plain loops, rows in
// the same order).
void add_tile_products(Isa isa, const float* g, int64_t g_stride, const float* tile, int64_t tile_stride,
                       int64_t rows, float* acc, int64_t acc_stride, int64_t cols, int64_t count) {
  int64_t r = 0;
#ifdef LK_X86
  auto group = [&](auto rows_at_once) {
    constexpr int R = decltype(rows_at_once)::value;
    const float* gr = g + r * g_stride;
    float* ar = acc + r * acc_stride;
    if (isa == Isa::kAvx512) {
      add_tile_products_avx512<R>(gr, g_stride, tile, tile_stride, rows, ar, acc_stride, cols);
    } else {
      add_tile_products_avx2<R>(gr, g_stride, tile, tile_stride, rows, ar, acc_stride, cols);
    }
    r += R;
  };
  if (isa != Isa::kScalar) {
    while (count - r >= 8) group(std::integral_constant<int, 8>());
    while (count - r >= 4) group(std::integral_constant<int, 4>());
    while (count - r >= 2) group(std::integral_constant<int, 2>());
    while (r < count) group(std::integral_constant<int, 1>());
  }
#endif
  for (; r < count; ++r)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        acc[r * acc_stride + j] += g[r * g_stride + i] * tile[i * tile_stride + j];
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
      fused_forward_rows(*this, isa, xpack, bp, begin, end, yp);
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
    // share adding dy[m, o] times row o to its own float32 dx, the shares' sums added in share order (the same
    // result whatever the number of threads). A share takes its rows kTileRows at a time and their columns
    // kTileColumns at a time: the dequantized tile and the dx columns it adds to stay in L1 (whole rows made
    // every row of W0 re-read and re-write all of the share's dx from L2: 256 KB at 16 rows of 4096, ~10 ms of a
    // 4096² dx on 2 cores). For each dx element the rows still come in order: the same sums as row by row.
    constexpr int64_t kTileRows = 16, kTileColumns = 256;
    const at::Tensor dy = grad_y.contiguous();
    const float* dyp = dy.data_ptr<float>();
    const int64_t shares = block_shares(kCpu, out);
    at::Tensor partial = at::empty({shares, M, in}, dy.options());
    float* pp = partial.data_ptr<float>();
    for_block_shares(kCpu, out, [&](int64_t first, int64_t end, int64_t share) {
      std::vector<float> tile(kTileRows * kTileColumns);
      float* acc = pp + share * M * in;
      std::fill(acc, acc + M * in, 0.0f);  // here, not as at::zeros: that would be one more parallel region
      for (int64_t o0 = first; o0 < end; o0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, end - o0);
        for (int64_t k0 = 0; k0 < in; k0 += kTileColumns) {
          const int64_t cols = std::min(kTileColumns, in - k0);
          for (int64_t i = 0; i < rows; ++i)
            dequantize_span(*this, isa, (o0 + i) * in + k0, cols, tile.data() + i * kTileColumns);
          add_tile_products(isa, dyp + o0, out, tile.data(), kTileColumns, rows, acc + k0, in, cols, M);
        }
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
