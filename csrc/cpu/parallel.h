// The one way the CPU kernels run a loop on several threads.
//
// at::parallel_for cuts [0, count) into one range per thread up front and waits for all of them: on a busy
// machine (DataLoader workers, other jobs on the cores) a thread the OS has descheduled holds everyone at the
// region's end. Here the pieces are taken from a shared counter instead, so the running threads do the work of a
// descheduled one. Each thread runs with the caller's thread-local state (grad mode, inference mode, dispatch
// keys: a body may call ATen ops, and OpenMP's threads do not inherit it); ATen and BLAS calls inside a body run
// single-threaded (they see the parallel region). Which thread runs a piece never changes a result: bodies write
// disjoint outputs, or per-piece partial sums added in piece order. SerialCalls (below) is the other way round:
// a scope whose ATen and BLAS calls stay on the calling thread, for work too small to repay a region.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/ParallelGuard.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

// MKL's per-thread thread count (when torch links MKL, as its x86 builds do; null otherwise): returns the
// previous per-thread setting, 0 for "the global one". (The C entry point: the lower-case mkl_set_num_threads_local
// symbol is the Fortran one, which takes a pointer; mkl.h maps the C name to this.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace lora_kernels {

// body(begin, end) for the pieces [k·grain, min(count, (k+1)·grain)) of [0, count), on ATen's intra-op threads.
template <typename Body>
void parallel_pieces(int64_t count, int64_t grain, const Body& body) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t pieces = (count + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(pieces, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    body(0, count);
    return;
  }
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t piece = next.fetch_add(1); piece < pieces; piece = next.fetch_add(1))
      body(piece * grain, std::min(count, (piece + 1) * grain));
  });
}

// While one lives, the ATen and BLAS calls this thread makes run on this thread alone. For the small products
// of a call (the LoRA branch at a few rows: ~10-100 us of work each): MKL and ATen give each its own parallel
// region, and every region ends waiting for all threads; on a busy machine that is a wait for a descheduled
// thread, a time slice per region (issue 18: a 4-bit decode train step ran 10 regions, 15x slower beside two
// busy processes; PEFT 3x). Off (`serial` false), it does nothing.
class SerialCalls {
 public:
  explicit SerialCalls(bool serial) {
    if (!serial) return;
    guard_.emplace(true);  // ATen's parallel_for runs inline, as inside a region
#ifdef _OPENMP
    threads_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    if (MKL_Set_Num_Threads_Local != nullptr) mkl_threads_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialCalls() {
    if (!guard_.has_value()) return;
#ifdef _OPENMP
    omp_set_num_threads(threads_);
#endif
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads_);
  }
  SerialCalls(const SerialCalls&) = delete;
  SerialCalls& operator=(const SerialCalls&) = delete;

 private:
  std::optional<c10::ParallelGuard> guard_;  // engaged: serial
  int threads_ = 1, mkl_threads_ = 0;
};

}  // namespace lora_kernels
