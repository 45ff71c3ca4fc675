// CUDA kernels of lora_kernels._C: the dropout mask blocks used by the fused
// forward/backward (lora_linear.cpp runs its GEMMs through cuBLAS), and the
// in-place merge.
#include "lora_kernels.h"
#include "philox.h"

#include <ATen/OpMathType.h>
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

// Merge tile: a block of 32 x 8 threads owns a 32 x 32 tile of W; each thread
// accumulates 4 rows of one column in the accumulation dtype, k in order,
// staging 32-wide chunks of A and B in shared memory.
constexpr int kTile = 32, kRowsPerThread = 4, kChunk = 32;

struct AdapterView {
  const void* a;
  int64_t a_rs, a_cs;
  const void* b;
  int64_t b_rs, b_cs;
  int64_t r;
};

// acc[j] = Σ_k B[row0 + ty + 8j, k] A[k, col] for this thread's 4 rows.
template <typename scalar_t, typename acc_t>
__device__ void tile_delta(const AdapterView& ad, int64_t row0, int64_t col, int64_t out,
                           int64_t in, acc_t (&a_tile)[kChunk][kTile],
                           acc_t (&b_tile)[kTile][kChunk + 1], acc_t (&acc)[kRowsPerThread]) {
  const scalar_t* a = static_cast<const scalar_t*>(ad.a);
  const scalar_t* b = static_cast<const scalar_t*>(ad.b);
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t k0 = 0; k0 < ad.r; k0 += kChunk) {
    for (int kk = ty; kk < kChunk; kk += blockDim.y) {
      const bool ok = k0 + kk < ad.r && col < in;
      a_tile[kk][tx] = ok ? static_cast<acc_t>(a[(k0 + kk) * ad.a_rs + col * ad.a_cs]) : acc_t(0);
    }
    for (int rr = ty; rr < kTile; rr += blockDim.y) {
      const bool ok = row0 + rr < out && k0 + tx < ad.r;
      b_tile[rr][tx] = ok ? static_cast<acc_t>(b[(row0 + rr) * ad.b_rs + (k0 + tx) * ad.b_cs]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kChunk; ++kk) {
      const acc_t a_val = a_tile[kk][tx];
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) acc[j] += b_tile[ty + j * blockDim.y][kk] * a_val;
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void merge_kernel(scalar_t* __restrict__ w, int64_t w_rs, int64_t w_cs, int64_t out,
                             int64_t in, AdapterView add, at::opmath_type<scalar_t> scaling,
                             AdapterView sub, at::opmath_type<scalar_t> sub_scaling,
                             bool check_only, unsigned long long* nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t a_tile[kChunk][kTile];
  __shared__ acc_t b_tile[kTile][kChunk + 1];  // +1: no bank conflicts on column reads
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  acc_t acc[kRowsPerThread] = {}, sub_acc[kRowsPerThread] = {};
  tile_delta<scalar_t>(add, row0, col, out, in, a_tile, b_tile, acc);
  if (sub.r > 0) tile_delta<scalar_t>(sub, row0, col, out, in, a_tile, b_tile, sub_acc);

  unsigned long long local_nonfinite = 0;
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int64_t row = row0 + threadIdx.y + j * blockDim.y;
    if (row >= out || col >= in) continue;
    scalar_t* w_elem = w + row * w_rs + col * w_cs;
    // Same expression as the CPU kernel: s·d - s'·d' negates exactly when the adapters swap.
    const acc_t change = sub.r > 0 ? scaling * acc[j] - sub_scaling * sub_acc[j] : scaling * acc[j];
    const acc_t merged = static_cast<acc_t>(*w_elem) + change;
    const scalar_t rounded = static_cast<scalar_t>(merged);  // overflow shows up here
    if (check_only) {
      local_nonfinite += !isfinite(static_cast<acc_t>(rounded));
    } else {
      *w_elem = rounded;
    }
  }
  if (local_nonfinite) atomicAdd(nonfinite, local_nonfinite);
}

AdapterView view_of(const at::Tensor& A, const at::Tensor& B) {
  return {A.data_ptr(), A.stride(0), A.stride(1), B.data_ptr(), B.stride(0), B.stride(1), A.size(0)};
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

int64_t merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   double scaling, const c10::optional<at::Tensor>& sub_A,
                   const c10::optional<at::Tensor>& sub_B, double sub_scaling, bool check_only) {
  check_merge_args(weight, lora_A, lora_B, sub_A, sub_B);
  if (weight.numel() == 0) return 0;
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  at::Tensor nonfinite = at::zeros({1}, weight.options().dtype(at::kLong));
  const AdapterView add = view_of(lora_A, lora_B);
  const AdapterView sub = sub_A.has_value() ? view_of(*sub_A, *sub_B) : AdapterView{};
  const dim3 threads(kTile, kTile / kRowsPerThread);
  const dim3 blocks(static_cast<unsigned>((in + kTile - 1) / kTile),
                    static_cast<unsigned>((out + kTile - 1) / kTile));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    merge_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1), out, in, add,
        static_cast<acc_t>(scaling), sub, static_cast<acc_t>(sub_scaling), check_only,
        reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Only the check pass needs its count on the host; the write pass stays asynchronous.
  return check_only ? nonfinite.item<int64_t>() : 0;
}

}  // namespace lora_kernels
