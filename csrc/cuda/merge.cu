// CUDA in-place merge: W = round(W + s·B A − s'·B' A'), one rounding per element.
#include "../lora_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace lora_kernels {
namespace {

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

// Products and sums rounded one by one (no FMA contraction): s·d − s'·d' is then exactly the
// negation of s'·d' − s·d, and switching adapters back and forth cannot drift.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename scalar_t>
__global__ void merge_kernel(scalar_t* __restrict__ w, int64_t w_rs, int64_t w_cs, int64_t out,
                             int64_t in, AdapterView add, at::opmath_type<scalar_t> scaling,
                             AdapterView sub, at::opmath_type<scalar_t> sub_scaling,
                             bool check_only, unsigned long long* nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t a_tile[kChunk][kTile];
  __shared__ acc_t b_tile[kTile][kChunk + 1];  // +1: no bank conflicts on column reads
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  unsigned long long local_nonfinite = 0;
  // Row tiles stride by gridDim.y (at most 65535), so any number of rows is covered.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile; row0 < out;
       row0 += static_cast<int64_t>(gridDim.y) * kTile) {
    acc_t acc[kRowsPerThread] = {}, sub_acc[kRowsPerThread] = {};
    tile_delta<scalar_t>(add, row0, col, out, in, a_tile, b_tile, acc);
    if (sub.r > 0) tile_delta<scalar_t>(sub, row0, col, out, in, a_tile, b_tile, sub_acc);
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int64_t row = row0 + threadIdx.y + j * blockDim.y;
      if (row >= out || col >= in) continue;
      scalar_t* w_elem = w + row * w_rs + col * w_cs;
      // Same expression as the CPU kernel: s·d - s'·d' negates exactly when the adapters swap.
      const acc_t change = sub.r > 0 ? sub_rn(mul_rn(scaling, acc[j]), mul_rn(sub_scaling, sub_acc[j]))
                                     : mul_rn(scaling, acc[j]);
      const acc_t merged = add_rn(static_cast<acc_t>(*w_elem), change);
      const scalar_t rounded = static_cast<scalar_t>(merged);  // overflow shows up here
      if (check_only) {
        local_nonfinite += !isfinite(static_cast<acc_t>(rounded));
      } else {
        *w_elem = rounded;
      }
    }
  }
  if (local_nonfinite) atomicAdd(nonfinite, local_nonfinite);
}

AdapterView view_of(const at::Tensor& A, const at::Tensor& B) {
  return {A.data_ptr(), A.stride(0), A.stride(1), B.data_ptr(), B.stride(0), B.stride(1), A.size(0)};
}

}  // namespace

namespace {

// The count of non-finite results (check_only) as a 0-d int64 tensor on weight's device: the check
// pass stays asynchronous too, and the caller reads it when it needs it.
at::Tensor merge_or_count(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       const OptionalTensor& sub_A, const OptionalTensor& sub_B, double sub_scaling,
                       bool check_only) {
  check_merge_args(weight, lora_A, lora_B, sub_A, sub_B);
  at::Tensor nonfinite = at::zeros({}, weight.options().dtype(at::kLong));
  if (weight.numel() == 0) return nonfinite;
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  const AdapterView add = view_of(lora_A, lora_B);
  const AdapterView sub = sub_A.has_value() ? view_of(*sub_A, *sub_B) : AdapterView{};
  const dim3 threads(kTile, kTile / kRowsPerThread);
  const dim3 blocks(static_cast<unsigned>((in + kTile - 1) / kTile),
                    static_cast<unsigned>(std::min<int64_t>((out + kTile - 1) / kTile, 65535)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    merge_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        static_cast<scalar_t*>(weight.data_ptr()), weight.stride(0), weight.stride(1), out, in, add,
        static_cast<acc_t>(scaling), sub, static_cast<acc_t>(sub_scaling), check_only,
        reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return nonfinite;
}

}  // namespace

void merge_cuda_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                 const OptionalTensor& sub_A, const OptionalTensor& sub_B, double sub_scaling) {
  merge_or_count(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, /*check_only=*/false);
}

at::Tensor merge_nonfinite_count_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                      double scaling, const OptionalTensor& sub_A, const OptionalTensor& sub_B,
                                      double sub_scaling) {
  return merge_or_count(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, /*check_only=*/true);
}

}  // namespace lora_kernels
