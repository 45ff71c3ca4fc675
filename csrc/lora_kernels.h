// Every C++/CUDA implementation of lora_kernels._C, declared once. registration.cpp
// binds them to the op schemas, the CPU implementations under the CPU dispatch key
// and the CUDA ones under the CUDA key:
//
//   op                       CPU                       CUDA
//   fused_forward            fused_forward_cpu         fused_forward_cuda      lora_linear.cpp
//   fused_backward           fused_backward_cpu        fused_backward_cuda     lora_linear.cpp
//   multi_forward            multi_forward_cpu         multi_forward_cuda      lora_linear_multi.cpp
//   multi_backward           multi_backward_cpu        multi_backward_cuda     lora_linear_multi.cpp
//   merge_kernel_            merge_cpu_                merge_cuda_             cpu/merge.cpp, cuda/merge.cu
//   merge_nonfinite_count    merge_nonfinite_count_cpu merge_nonfinite_count_cuda
//   fused_forward_4bit       fused_forward_4bit_cpu    -                       lora_linear_4bit.cpp
//   fused_backward_4bit      fused_backward_4bit_cpu   -                       lora_linear_4bit.cpp
//   multi_forward_4bit       multi_forward_4bit_cpu    -                       lora_linear_multi.cpp
//   multi_backward_4bit      multi_backward_4bit_cpu   -                       lora_linear_multi.cpp
//   dequantize_4bit          dequantize_4bit_cpu       -                       cpu/weight4bit.cpp
//   dora_gain_gradients      dora_gain_gradients_cpu   -                       cpu/dora_gain.cpp
//
// lora_linear.cpp composes ATen (BLAS / cuBLAS) GEMMs; the per-device pieces it
// needs are the dropout mask generators (cpu/dropout.cpp, cuda/dropout.cu).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lora_kernels {

#define LK_CHECK(cond, ...) TORCH_CHECK(cond, "lora_kernels: ", __VA_ARGS__)

using OptionalTensor = c10::optional<at::Tensor>;

// ---- fused LoRA linear (lora_linear.cpp)
// gain [out] (optional; DoRA's eval forward): y = gain ⊙ (x W0ᵀ + s · drop(x) Aᵀ Bᵀ) + bias, adapters in x's dtype
std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const OptionalTensor& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     int64_t seed, const OptionalTensor& gain);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed, bool need_dx);

// ---- many adapters in one batch (lora_linear_multi.cpp): lora_A [n, r_max, in], lora_B [n, out, r_max],
// scalings [n], adapter_ids [M] in [-1, n), ranks [n] in [1, r_max] (or none: all r_max), dropouts [n]
// (each adapter's dropout probability; a float64 CPU tensor)
std::tuple<at::Tensor, at::Tensor> multi_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const OptionalTensor& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, const at::Tensor& scalings,
                                                     const at::Tensor& adapter_ids, const OptionalTensor& ranks,
                                                     const at::Tensor& dropouts, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings, const at::Tensor& adapter_ids,
    const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx);

// ---- fused LoRA linear on a 4-bit base (lora_linear_4bit.cpp, cpu/weight4bit.cpp): W0 [out_features, in] as
// bitsandbytes' packed codes [ceil(out·in/2)] uint8, absmax [blocks] float32 (or uint8 with nested_absmax
// [ceil(blocks/256)], nested_code [256] and offset [1]: double quantization), code_table [16] float32
std::tuple<at::Tensor, at::Tensor> fused_forward_4bit_cpu(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
    const OptionalTensor& nested_code, const OptionalTensor& offset, const at::Tensor& code_table,
    int64_t out_features, int64_t blocksize, const OptionalTensor& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, int64_t seed, const OptionalTensor& gain);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_4bit_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
    const OptionalTensor& nested_absmax, const OptionalTensor& nested_code, const OptionalTensor& offset,
    const at::Tensor& code_table, int64_t out_features, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed, bool need_dx);
std::tuple<at::Tensor, at::Tensor> multi_forward_4bit_cpu(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
    const OptionalTensor& nested_code, const OptionalTensor& offset, const at::Tensor& code_table,
    int64_t out_features, int64_t blocksize, const OptionalTensor& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scalings, const at::Tensor& adapter_ids, const OptionalTensor& ranks,
    const at::Tensor& dropouts, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward_4bit_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
    const OptionalTensor& nested_absmax, const OptionalTensor& nested_code, const OptionalTensor& offset,
    const at::Tensor& code_table, int64_t out_features, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings, const at::Tensor& adapter_ids,
    const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx);
at::Tensor dequantize_4bit_cpu(const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                               const OptionalTensor& nested_code, const OptionalTensor& offset,
                               const at::Tensor& code_table, int64_t out_features, int64_t in_features,
                               int64_t blocksize, at::ScalarType dtype);

// ---- dropout masks: rows row0 .. row0+rows-1 of the [M, cols] mask (philox.h) as float32
// on the device of `options`: 1/(1-p) where kept, 0 where dropped.
at::Tensor dropout_mask_cpu(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed,
                            at::TensorOptions options);
// The whole mask of x [M, in] (the op dropout_mask, which DoRA's second product with W0 needs).
at::Tensor dropout_mask_of_cpu(const at::Tensor& x, double dropout_p, int64_t seed);

// ---- DoRA's backward epilogue (cpu/dora_gain.cpp): (g ⊙ dy in out_dtype, Σ_rows dy ⊙ z or an empty tensor)
std::tuple<at::Tensor, at::Tensor> dora_gain_gradients_cpu(const at::Tensor& grad_y, const OptionalTensor& z,
                                                           const at::Tensor& gain, at::ScalarType out_dtype);

// ---- in-place merge: W = round(W + s · B A - s' · B' A'), the two products accumulated
// in fp32 (fp64 for fp64 weights), one rounding per element; the subtracted adapter
// (sub_A [r', in], sub_B [out, r'], s') is optional and serves one-pass switching.
// The _count variants write nothing and return how many results would not be finite
// (a 0-d int64 tensor on weight's device, so that the op traces under torch.compile).
void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                      const OptionalTensor& sub_A, const OptionalTensor& sub_B);
void merge_cpu_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                const OptionalTensor& sub_A, const OptionalTensor& sub_B, double sub_scaling);
at::Tensor merge_nonfinite_count_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     double scaling, const OptionalTensor& sub_A, const OptionalTensor& sub_B,
                                  double sub_scaling);

#ifdef LORA_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> multi_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const OptionalTensor& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, const at::Tensor& scalings,
                                                      const at::Tensor& adapter_ids, const OptionalTensor& ranks,
                                                      const at::Tensor& dropouts, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings, const at::Tensor& adapter_ids,
    const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx);
std::tuple<at::Tensor, at::Tensor> fused_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const OptionalTensor& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, double scaling, double dropout_p,
                                                      int64_t seed, const OptionalTensor& gain);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed, bool need_dx);
at::Tensor dropout_mask_cuda(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed,
                             at::TensorOptions options);
at::Tensor dropout_mask_of_cuda(const at::Tensor& x, double dropout_p, int64_t seed);
void merge_cuda_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                 const OptionalTensor& sub_A, const OptionalTensor& sub_B, double sub_scaling);
at::Tensor merge_nonfinite_count_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   double scaling, const OptionalTensor& sub_A, const OptionalTensor& sub_B,
                                   double sub_scaling);
#endif

}  // namespace lora_kernels
