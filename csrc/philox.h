// Counter-based dropout masks shared by the CPU and CUDA kernels.
//
// Element (m, k) of an [M, in] dropout mask is kept iff
//     philox4x32_10(key = seed, counter = (lo32(m*in + k), hi32(m*in + k), 0, 0)).word0 >= threshold
// This is bit-identical to triton's tl.randint(seed, int64 offsets) and to
// lora_kernels.reference.philox_uint32, so every backend regenerates the same
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

LK_HOST_DEVICE uint32_t philox_uint32(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  LK_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Draws below the threshold are dropped; threshold = round(p * 2^32), kept as
// uint64 so that p -> 1 cannot wrap around.
inline uint64_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967296.0 ? 4294967296ull : static_cast<uint64_t>(t);
}

}  // namespace lora_kernels
