// The one way the CPU kernels run a loop on several threads.
//
// at::parallel_for cuts [0, count) into one range per thread up front and waits for all of them: on a busy
// machine (DataLoader workers, other jobs on the cores) a thread the OS has descheduled holds everyone at the
// region's end. Here the pieces are taken from a shared counter instead, so the running threads do the work of a
// descheduled one. Each thread runs with the caller's thread-local state (grad mode, inference mode, dispatch
// keys: a body may call ATen ops, and OpenMP's threads do not inherit it); ATen and BLAS calls inside a body run
// single-threaded (they see the parallel region). Which thread runs a piece never changes a result: bodies write
// disjoint outputs, or per-piece partial sums added in piece order.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

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

}  // namespace lora_kernels
