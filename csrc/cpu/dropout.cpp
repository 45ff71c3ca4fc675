// CPU dropout masks: rows of the [M, in] mask of philox.h as float32 blocks
// (1/(1-p) where kept, 0 where dropped), for lora_linear.cpp to multiply into
// row blocks of x and of dx's LoRA term before handing them to BLAS.
//
// The mask is the whole cost of CPU dropout (10 Philox rounds per 8 elements),
// so the rounds run on 16 counters at once in GCC/Clang vector types, and the
// row function is multi-versioned (multiversion.h): wheels stay portable.
#include "../lora_kernels.h"
#include "../philox.h"
#include "multiversion.h"
#include "parallel.h"

#include <algorithm>
#include <vector>

#define LK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lora_kernels {
namespace {

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
    const U64x16 prod_b = __builtin_convertvector(c2, U64x16) * static_cast<uint64_t>(kPhiloxMulB);
    const U64x16 prod_a = __builtin_convertvector(c0, U64x16) * static_cast<uint64_t>(kPhiloxMulA);
    c0 = __builtin_convertvector(prod_b >> 32, U32x16) ^ c1 ^ k0;
    c2 = __builtin_convertvector(prod_a >> 32, U32x16) ^ c3 ^ k1;
    c1 = __builtin_convertvector(prod_b, U32x16);
    c3 = __builtin_convertvector(prod_a, U32x16);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
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

// One row of the mask: `value` where kept, 0 where dropped. (A lambda inside a
// multi-versioned function would not inherit its ISA, so the parallel loop
// lives in the caller.)
LK_MULTIVERSIONED
void mask_row(uint64_t seed, uint64_t base, int64_t cols, uint32_t threshold, float value, uint8_t* keep, float* out) {
  keep_bits(seed, base, cols, threshold, keep);
  for (int64_t j = 0; j < cols; ++j) out[j] = keep[j] ? value : 0.0f;
}

}  // namespace

at::Tensor dropout_mask_cpu(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed, at::TensorOptions options) {
  at::Tensor mask = at::empty({rows, cols}, options.dtype(at::kFloat));
  const uint32_t threshold = dropout_threshold(p);
  const float value = static_cast<float>(1.0 / (1.0 - p));
  float* out = mask.data_ptr<float>();
  parallel_pieces(rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> keep(cols);
    for (int64_t i = begin; i < end; ++i) {
      mask_row(static_cast<uint64_t>(seed), static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(cols), cols,
               threshold, value, keep.data(), out + i * cols);
    }
  });
  return mask;
}

}  // namespace lora_kernels
