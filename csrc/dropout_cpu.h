// CPU dropout masks (see dropout_cpu.cpp and philox.h).
#pragma once

#include <ATen/ATen.h>

namespace lora_kernels {

// Rows row0 .. row0+rows-1 of the [M, cols] dropout mask for probability p and
// `seed`, as float32: 1/(1-p) where kept, 0 where dropped.
at::Tensor dropout_mask_cpu(int64_t row0, int64_t rows, int64_t cols, double p, int64_t seed, at::TensorOptions options);

}  // namespace lora_kernels
