// CPU kernels for LoRA's skinny products (see lora_cpu_kernels.cpp). Shapes:
// x [M, K] and y [M, N] any strides; d [K, r], l [M, r], u [r, N] any layout.
// p > 0 applies the dropout mask of the [M, K] (or [M, N]) stream with `seed`
// and the 1/(1-p) factor; p = 0 applies none.
#pragma once

#include <ATen/ATen.h>

namespace lora_kernels {

// scale · drop?(x) d  ->  [M, r] in x's dtype
at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& d, double scale, double p, int64_t seed);

// y += scale · (l u) ⊙ mask?/(1-p), in place, rounded once per element
void expand_cpu_(at::Tensor& y, const at::Tensor& l, const at::Tensor& u, double scale, double p, int64_t seed);

// scale · lᵀ drop?(x)  ->  [r, N] in x's dtype (accumulated in fp32/fp64)
at::Tensor weight_grad_cpu(const at::Tensor& l, const at::Tensor& x, double scale, double p, int64_t seed);

}  // namespace lora_kernels
