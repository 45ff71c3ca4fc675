// Operator schemas, and each op's implementation under the CPU and the CUDA dispatch
// keys (declared in lora_kernels.h): the dispatcher picks by the tensors' device, no
// implementation branches on it. The Python package (lora_kernels/ops/) registers
// their fakes and wraps them in the public custom ops, which add autograd and
// backend selection.
#include "cpu/parallel.h"
#include "lora_kernels.h"

#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <set>

TORCH_LIBRARY(lora_kernels, m) {
  m.def("fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scaling, float dropout_p, int seed, Tensor? gain=None) -> (Tensor, Tensor)");
  m.def("fused_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "Tensor xa, float scaling, float dropout_p, int seed, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("multi_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scalings, "
        "Tensor adapter_ids, Tensor? ranks, Tensor dropouts, int seed) -> (Tensor, Tensor)");
  m.def("multi_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
        "Tensor scalings, Tensor adapter_ids, Tensor? ranks, Tensor dropouts, int seed, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("merge_kernel_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor? sub_A, Tensor? sub_B, float sub_scaling) -> ()");
  m.def("merge_nonfinite_count(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, "
        "Tensor? sub_A, Tensor? sub_B, float sub_scaling) -> Tensor");
  m.def("fused_forward_4bit(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
        "Tensor? offset, Tensor code_table, int out_features, int blocksize, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, float scaling, float dropout_p, int seed, Tensor? gain=None) -> (Tensor, Tensor)");
  m.def("fused_backward_4bit(Tensor grad_y, Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? nested_code, Tensor? offset, Tensor code_table, int out_features, int blocksize, Tensor lora_A, "
        "Tensor lora_B, Tensor xa, float scaling, float dropout_p, int seed, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("multi_forward_4bit(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
        "Tensor? offset, Tensor code_table, int out_features, int blocksize, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, Tensor scalings, Tensor adapter_ids, Tensor? ranks, Tensor dropouts, int seed) "
        "-> (Tensor, Tensor)");
  m.def("multi_backward_4bit(Tensor grad_y, Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, "
        "Tensor? nested_code, Tensor? offset, Tensor code_table, int out_features, int blocksize, Tensor lora_A, "
        "Tensor lora_B, Tensor xa, Tensor scalings, Tensor adapter_ids, Tensor? ranks, Tensor dropouts, int seed, "
        "bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("dropout_mask(Tensor x, float dropout_p, int seed) -> Tensor");
  m.def("dora_gain_gradients(Tensor grad_y, Tensor? z, Tensor gain, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("dequantize_4bit(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
        "Tensor code_table, int out_features, int in_features, int blocksize, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("fused_forward", &lora_kernels::fused_forward_cpu);
  m.impl("fused_backward", &lora_kernels::fused_backward_cpu);
  m.impl("multi_forward", &lora_kernels::multi_forward_cpu);
  m.impl("multi_backward", &lora_kernels::multi_backward_cpu);
  m.impl("merge_kernel_", &lora_kernels::merge_cpu_);
  m.impl("merge_nonfinite_count", &lora_kernels::merge_nonfinite_count_cpu);
  m.impl("fused_forward_4bit", &lora_kernels::fused_forward_4bit_cpu);
  m.impl("fused_backward_4bit", &lora_kernels::fused_backward_4bit_cpu);
  m.impl("multi_forward_4bit", &lora_kernels::multi_forward_4bit_cpu);
  m.impl("multi_backward_4bit", &lora_kernels::multi_backward_4bit_cpu);
  m.impl("dequantize_4bit", &lora_kernels::dequantize_4bit_cpu);
  m.impl("dropout_mask", &lora_kernels::dropout_mask_of_cpu);
  m.impl("dora_gain_gradients", &lora_kernels::dora_gain_gradients_cpu);
}

#ifdef LORA_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("fused_forward", &lora_kernels::fused_forward_cuda);
  m.impl("fused_backward", &lora_kernels::fused_backward_cuda);
  m.impl("multi_forward", &lora_kernels::multi_forward_cuda);
  m.impl("multi_backward", &lora_kernels::multi_backward_cuda);
  m.impl("merge_kernel_", &lora_kernels::merge_cuda_);
  m.impl("merge_nonfinite_count", &lora_kernels::merge_nonfinite_count_cuda);
  m.impl("dropout_mask", &lora_kernels::dropout_mask_of_cuda);
}
#endif

namespace {

// How many threads one of the CPU kernels' parallel regions runs on (the build's OpenMP, checked by the tests:
// without it every region ran on one thread).
int64_t parallel_threads() {
  std::mutex lock;
  std::set<int> seen;
  lora_kernels::parallel_pieces(1 << 12, 1, [&](int64_t, int64_t) {
    volatile double sink = 0.0;
    for (int i = 0; i < 2000; ++i) sink = sink + i;  // long enough for every thread to take a piece
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels compiled kernels (ops live in torch.ops.lora_kernels)";
  m.def("parallel_threads", &parallel_threads, "threads a parallel region of the CPU kernels runs on");
#ifdef LORA_KERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
