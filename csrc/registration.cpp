// Operator schemas and their CPU / CUDA implementations (namespace lora_kernels).
// The Python package wraps these in the public custom ops (lora_kernels/ops/),
// which add autograd, fake tensors and backend selection.
#include "lora_kernels.h"

#include <torch/extension.h>
#include <torch/library.h>

namespace lora_kernels {

std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias,
                                                 const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, double scaling,
                                                 double dropout_p, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
    double dropout_p, int64_t seed, bool need_dx);

namespace {

int64_t merge_dispatch(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                       double scaling, const c10::optional<at::Tensor>& sub_A,
                       const c10::optional<at::Tensor>& sub_B, double sub_scaling,
                       bool check_only) {
  if (weight.is_cuda()) {
#ifdef LORA_KERNELS_WITH_CUDA
    return merge_cuda(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only);
#else
    LK_CHECK(false, "this build of lora_kernels._C has no CUDA kernels");
#endif
  }
  return merge_cpu(weight, lora_A, lora_B, scaling, sub_A, sub_B, sub_scaling, check_only);
}

}  // namespace

TORCH_LIBRARY(lora_kernels, m) {
  m.def("fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scaling, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("fused_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "Tensor xa, float scaling, float dropout_p, int seed, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("merge_kernel_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor? sub_A, Tensor? sub_B, float sub_scaling, bool check_only) -> int");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("fused_forward", &fused_forward);
  m.impl("fused_backward", &fused_backward);
  m.impl("merge_kernel_", &merge_dispatch);
}

#ifdef LORA_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("fused_forward", &fused_forward);
  m.impl("fused_backward", &fused_backward);
  m.impl("merge_kernel_", &merge_dispatch);
}
#endif

}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels compiled kernels (ops live in torch.ops.lora_kernels)";
#ifdef LORA_KERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
