// Fused LoRA linear on a 4-bit base (QLoRA): lora_linear.cpp's op with W0 in bitsandbytes' 4-bit layout.
//
//   forward   y  = bias + x W0ᵀ           Packed4bit::forward (cpu/weight4bit.cpp): W0 dequantized a panel at a
//                                         time, or read once by the decode GEMV; never whole
//             xa, y += s · xa Bᵀ           the 16-bit-weight op's LoRA part (add_lora_forward), unchanged
//   backward  dx = dy W0 + LoRA term       Packed4bit::input_grad, then lora_backward: dA, dB and dx's LoRA term
//
// The rounding rules are lora_linear.cpp's, with W0 = dequantize(W0 in x's dtype) (reference.py).
#include "fused_common.h"
#include "weight4bit.h"

namespace lora_kernels {
namespace fused {
namespace {

void check_cpu_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  LK_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  LK_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  LK_CHECK(t.numel() == numel && t.is_contiguous(), name, " must be a contiguous tensor of ", numel,
           " elements, got ", t.sizes());
}

}  // namespace

Packed4bit packed_4bit(const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                       const OptionalTensor& nested_code, const OptionalTensor& offset, const at::Tensor& code_table,
                       int64_t out_features, int64_t in_features, int64_t blocksize) {
  LK_CHECK(out_features >= 0 && in_features >= 0, "the 4-bit weight's shape must be non-negative, got [",
           out_features, ", ", in_features, "]");
  LK_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
           "blocksize must be a power of two in [32, 4096], got ", blocksize);
  const int64_t n = out_features * in_features, blocks = (n + blocksize - 1) / blocksize;
  check_cpu_tensor(codes, "codes", at::kByte, (n + 1) / 2);
  check_cpu_tensor(code_table, "code_table", at::kFloat, 16);
  Packed4bit w;
  w.codes = codes.data_ptr<uint8_t>();
  w.out = out_features;
  w.in = in_features;
  w.blocksize = blocksize;
  std::copy_n(code_table.data_ptr<float>(), 16, w.table);
  const bool nested = nested_absmax.has_value();
  LK_CHECK(nested == nested_code.has_value() && nested == offset.has_value(),
           "nested_absmax, nested_code and offset come together (double quantization) or not at all");
  if (nested) {
    check_cpu_tensor(absmax, "absmax", at::kByte, blocks);
    check_cpu_tensor(*nested_absmax, "nested_absmax", at::kFloat,
                     (blocks + Packed4bit::kNestedBlock - 1) / Packed4bit::kNestedBlock);
    check_cpu_tensor(*nested_code, "nested_code", at::kFloat, 256);
    check_cpu_tensor(*offset, "offset", at::kFloat, 1);
    w.absmax_codes = absmax.data_ptr<uint8_t>();
    w.nested_absmax = nested_absmax->data_ptr<float>();
    w.nested_code = nested_code->data_ptr<float>();
    w.offset = offset->data_ptr<float>()[0];
  } else {
    check_cpu_tensor(absmax, "absmax", at::kFloat, blocks);
    w.absmax = absmax.data_ptr<float>();
  }
  return w;
}

int64_t Base::out_features() const { return packed != nullptr ? packed->out : dense.size(0); }
int64_t Base::in_features() const { return packed != nullptr ? packed->in : dense.size(1); }

at::Tensor Base::forward(const at::Tensor& x, const OptionalTensor& bias) const {
  return packed != nullptr ? packed->forward(x, bias) : base_forward(x, dense, bias);
}

at::Tensor Base::input_grad(const at::Tensor& grad_y) const {
  return packed != nullptr ? packed->input_grad(grad_y) : at::mm(grad_y, dense);
}

void Base::check(const at::Tensor& x) const {
  if (packed != nullptr) {
    LK_CHECK(packed->in == x.size(1), "the 4-bit weight must be [out, ", x.size(1), "], got [", packed->out, ", ",
             packed->in, "]");
    LK_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
             "x must be float32, bfloat16 or float16 on a 4-bit weight, got ", x.scalar_type());
    return;
  }
  LK_CHECK(dense.dim() == 2 && dense.size(1) == x.size(1), "weight must be [out, ", x.size(1), "], got ",
           dense.sizes());
  check_same(dense, "weight", x);
}

}  // namespace fused

std::tuple<at::Tensor, at::Tensor> fused_forward_4bit_cpu(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
    const OptionalTensor& nested_code, const OptionalTensor& offset, const at::Tensor& code_table,
    int64_t out_features, int64_t blocksize, const OptionalTensor& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, int64_t seed, const OptionalTensor& gain) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  const fused::Packed4bit w = fused::packed_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table,
                                                 out_features, x.size(1), blocksize);
  fused::check_lora_args(x, fused::Base{at::Tensor(), &w}, bias, lora_A, lora_B, dropout_p);
  fused::check_gain(gain, x, lora_A, out_features);
  at::Tensor y = w.forward(x, gain.has_value() ? OptionalTensor() : bias);
  at::Tensor xa = at::empty({x.size(0), lora_A.size(0)}, lora_A.options());
  fused::add_lora_forward(fused::kCpu, x, y, xa, lora_A, lora_B, scaling, dropout_p, seed, 0);
  if (gain.has_value()) y = fused::apply_gain(y, *gain, bias);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward_4bit_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
    const OptionalTensor& nested_absmax, const OptionalTensor& nested_code, const OptionalTensor& offset,
    const at::Tensor& code_table, int64_t out_features, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, int64_t seed, bool need_dx) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  const fused::Packed4bit w = fused::packed_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table,
                                                 out_features, x.size(1), blocksize);
  fused::check_lora_args(x, fused::Base{at::Tensor(), &w}, c10::nullopt, lora_A, lora_B, dropout_p);
  LK_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == out_features, "grad_y must be [",
           x.size(0), ", ", out_features, "], got ", grad_y.sizes());
  LK_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0), "xa must be [", x.size(0), ", ",
           lora_A.size(0), "], got ", xa.sizes());
  fused::check_same(grad_y, "grad_y", x);
  fused::check_same(xa, "xa", lora_A, "lora_A");
  at::Tensor dx = need_dx ? w.input_grad(grad_y.contiguous()) : at::Tensor();
  auto [dA, dB] = fused::lora_backward(fused::kCpu, grad_y, x, lora_A, lora_B, xa, scaling, dropout_p, seed, 0, dx);
  return {need_dx ? dx : at::empty({0}, x.options()), dA, dB};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                               const OptionalTensor& nested_code, const OptionalTensor& offset,
                               const at::Tensor& code_table, int64_t out_features, int64_t in_features,
                               int64_t blocksize, at::ScalarType dtype) {
  LK_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
           "dtype must be float32, bfloat16 or float16, got ", dtype);
  return fused::packed_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table, out_features, in_features,
                            blocksize)
      .dequantize(dtype);
}

}  // namespace lora_kernels
