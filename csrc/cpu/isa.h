// The vector ISA the hand-written CPU kernels (weight4bit.cpp, dora_dropped.cpp) use, chosen at run time: the
// CPU's best, or a lower one asked for by LORA_KERNELS_CPU_ISA=avx512|avx2|scalar (read per call: tests and
// measurements run every version on one machine). Kernels the compiler vectorizes use multiversion.h instead.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_X86 1
#endif

namespace lora_kernels {

enum class Isa { kScalar, kAvx2, kAvx512 };

inline Isa detected_isa() {
#ifdef LK_X86
  static const Isa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? Isa::kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")   ? Isa::kAvx2
                                                                                                : Isa::kScalar;
  return best;
#else
  return Isa::kScalar;
#endif
}

inline Isa chosen_isa() {
  const Isa best = detected_isa();
  const char* asked = std::getenv("LORA_KERNELS_CPU_ISA");
  if (asked == nullptr || *asked == '\0') return best;
  Isa want = best;
  if (std::strcmp(asked, "scalar") == 0) want = Isa::kScalar;
  if (std::strcmp(asked, "avx2") == 0) want = Isa::kAvx2;
  if (std::strcmp(asked, "avx512") == 0) want = Isa::kAvx512;
  return std::min(want, best);
}

}  // namespace lora_kernels
