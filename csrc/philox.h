// Counter-based dropout masks shared by the CPU and CUDA kernels.
//
// Element e = m * in + k of an [M, in] dropout mask gets a 16-bit draw: one
// Philox-4x32-10 call, key = seed, counter = (lo32(e / 8), hi32(e / 8), 0, 0),
// gives 128 bits that serve the 8 elements of that group (word (e / 2) % 4,
// half e % 2). The element is kept iff its draw >= round(p * 2^16). This is
// bit-identical to the Triton kernels (tl.randint4x) and to
// lora_kernels.reference.dropout_draws, so every backend regenerates the same
// mask from the seed alone and nothing of size [M, in] is saved for backward.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#else
#define LK_HOST_DEVICE inline
#define LK_UNROLL _Pragma("GCC unroll 10")
#endif

namespace lora_kernels {

constexpr int kPhiloxRounds = 10;
// Philox-4x32's round multipliers and key increments (Salmon et al., SC'11), for
// every C++/CUDA implementation (the scalar one below, cpu/dropout.cpp's vector one).
constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t w[4];
};

LK_HOST_DEVICE PhiloxWords philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  LK_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxMulB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxMulA) * c0;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {{c0, c1, c2, c3}};
}

// The 16-bit draw of element e, from the Philox words of its group e / 8.
LK_HOST_DEVICE uint32_t dropout_draw(const PhiloxWords& words, uint64_t e) {
  return (words.w[(e >> 1) & 3] >> ((e & 1) * 16)) & 0xFFFFu;
}

// Draws below the threshold are dropped: threshold = round(p * 2^16) in [0, 65536].
inline uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65536.0 ? 65536u : static_cast<uint32_t>(t);
}

}  // namespace lora_kernels
