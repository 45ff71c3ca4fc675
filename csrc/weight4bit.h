// A frozen base weight W0 [out, in] in bitsandbytes' 4-bit layout (see lora_kernels/weight4bit.py), as the CPU
// kernels read it in place: packed codes, one scale per block of the flattened weight (float32, or 8-bit codes
// of a 256-entry map with a float32 absmax per 256 blocks and an offset: double quantization), a 16-entry table.
#pragma once

#include "lora_kernels.h"

#include <cstdint>

namespace lora_kernels {
namespace fused {

struct Packed4bit {
  const uint8_t* codes = nullptr;
  int64_t out = 0, in = 0, blocksize = 64;
  const float* absmax = nullptr;             // float32 scales, or
  const uint8_t* absmax_codes = nullptr;     // double quantization: 8-bit codes of the scales,
  const float* nested_absmax = nullptr;      //   a float32 absmax per kNestedBlock of them,
  const float* nested_code = nullptr;        //   the 256-entry map,
  float offset = 0.0f;                       //   and the mean subtracted before coding them
  float table[16] = {};

  static constexpr int64_t kNestedBlock = 256;

  // The scale of block b (two float32 roundings under double quantization, as bitsandbytes decodes it).
  float scale(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    const volatile float coded = nested_code[absmax_codes[b]] * nested_absmax[b / kNestedBlock];  // no FMA
    return coded + offset;
  }

  // bias + x W0ᵀ [M, out] and dy W0 [M, in], in x's (dy's) dtype: float32, bfloat16 or float16.
  at::Tensor forward(const at::Tensor& x, const OptionalTensor& bias) const;
  at::Tensor input_grad(const at::Tensor& grad_y) const;
  // The whole weight (tests and export only; the ops never call it).
  at::Tensor dequantize(at::ScalarType dtype) const;
};

// The packed weight of the op arguments, checked (shapes, dtypes, devices): the tensors must outlive it.
Packed4bit packed_4bit(const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                       const OptionalTensor& nested_code, const OptionalTensor& offset, const at::Tensor& code_table,
                       int64_t out_features, int64_t in_features, int64_t blocksize);

}  // namespace fused
}  // namespace lora_kernels
