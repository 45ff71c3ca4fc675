// Function multi-versioning for the CPU kernels: with GCC 12+ on x86-64, a
// function marked LK_MULTIVERSIONED is compiled for AVX-512 (x86-64-v4), AVX2
// (x86-64-v3) and baseline x86-64, and the best version for the CPU is picked
// at load time, so one wheel is both portable and fast. Elsewhere (other
// compilers, aarch64) it is an ordinary function built for the compiler's
// target. LK_NO_FMA_CONTRACTION keeps a*b + c as two roundings in every version,
// for kernels whose results must not depend on the version picked.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define LK_MULTIVERSIONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define LK_NO_FMA_CONTRACTION __attribute__((optimize("fp-contract=off")))
#else
#define LK_MULTIVERSIONED
#define LK_NO_FMA_CONTRACTION  // baseline targets have no FMA; clang contracts only with -ffp-contract=fast
#endif
