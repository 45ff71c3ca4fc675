// CUDA dropout masks: row blocks of the [M, in] mask of philox.h as float32 (1/(1-p)
// where kept, 0 where dropped), which lora_linear.cpp multiplies into row blocks of x
// and of dx's LoRA term before handing them to cuBLAS.
#include "../lora_kernels.h"
#include "../philox.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace lora_kernels {
namespace {

constexpr int kThreads = 256;

// mask[i, k] = keep(row0 + i, k) ? 1/(1-p) : 0; one thread per element. Each
// thread runs its group's Philox call (8 elements share it): compute is cheap
// here next to the memory traffic.
__global__ void dropout_mask_kernel(float* __restrict__ mask, int64_t rows, int64_t cols, int64_t row0,
                                    uint32_t threshold, float value, uint64_t seed) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const uint64_t e = static_cast<uint64_t>(row0) * static_cast<uint64_t>(cols) + static_cast<uint64_t>(idx);
  mask[idx] = dropout_draw(philox4x32_10(seed, e >> 3), e) >= threshold ? value : 0.0f;
}

}  // namespace

at::Tensor dropout_mask_cuda(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed,
                             at::TensorOptions options) {
  const c10::cuda::CUDAGuard guard(options.device());
  at::Tensor mask = at::empty({rows, cols}, options.dtype(at::kFloat));
  const int64_t n = mask.numel();
  if (n == 0) return mask;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  dropout_mask_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<float>(), rows, cols, row0, dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p)),
      static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace lora_kernels
