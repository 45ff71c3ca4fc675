// Declarations shared by the C++ (CPU) and CUDA sources of lora_kernels._C.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lora_kernels {

#define LK_CHECK(cond, ...) TORCH_CHECK(cond, "lora_kernels: ", __VA_ARGS__)

#ifdef LORA_KERNELS_WITH_CUDA
// Rows row0 .. row0+rows-1 of the [M, cols] dropout mask (philox.h) as float32
// on the CUDA device of `options`: 1/(1-p) where kept, 0 where dropped.
at::Tensor dropout_mask_cuda(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed,
                             at::TensorOptions options);
#endif

// In-place W = round(W + s · B A - s' · B' A'), the two products accumulated in
// fp32 (fp64 for fp64 weights), one rounding per element; the subtracted adapter
// (sub_A [r', in], sub_B [out, r'], s') is optional and serves one-pass switching.
// With check_only nothing is written and the number of non-finite results is returned.
void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      const c10::optional<at::Tensor>& sub_A, const c10::optional<at::Tensor>& sub_B);
int64_t merge_cpu(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                  double scaling, const c10::optional<at::Tensor>& sub_A,
                  const c10::optional<at::Tensor>& sub_B, double sub_scaling, bool check_only);
#ifdef LORA_KERNELS_WITH_CUDA
int64_t merge_cuda(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   double scaling, const c10::optional<at::Tensor>& sub_A,
                   const c10::optional<at::Tensor>& sub_B, double sub_scaling, bool check_only);
#endif

}  // namespace lora_kernels
