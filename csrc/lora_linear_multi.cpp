// Many adapters in one batch (segmented LoRA), forward and backward:
//
//   row m uses adapter a = ids[m] (none when -1), of rank r_a <= r_max and scaling s_a:
//   forward   y   = bias + x W0ᵀ                       one GEMM over the whole batch
//             xa  = drop(x)_a A_a[:r_a]ᵀ                per adapter, over its rows
//             y_a += s_a · xa_a B_a[:, :r_a]ᵀ
//   backward  gb_a = dy_a B_a;  dA_a = s_a gb_aᵀ drop(x)_a;  dB_a = s_a dy_aᵀ xa_a
//             dx  = dy W0 + s_a (gb_a A_a) ⊙ mask/(1-p)
//
// The rows are grouped by adapter on the host (a counting sort of the ids: one copy of the
// ids to the host, a synchronisation on CUDA). Each adapter's A and B are then read once, by
// r-wide GEMMs over its rows, and an adapter of rank r_a < r_max computes only its r_a ranks.
// Two layouts:
// - grouped batch (each adapter's rows are one range of rows, in any order of adapters: what
//   a server that batches by adapter sends): lora_linear's own LoRA code runs on views of each
//   range, no copy at all; a batch on one adapter is exactly lora_linear (bit for bit);
// - scattered rows: x is copied once in grouped order (dropped, when dropout is on, with
//   lora_linear's mask regenerated in row blocks), the LoRA terms are formed in that order
//   and added to y with one scatter.
// Each adapter has its own dropout probability (dropouts [n]): row m of adapter a is dropped
// by lora_linear's rule with p_a, so a batch on one adapter is lora_linear exactly.
// Rounding follows reference.lora_linear_multi, which follows lora_linear.
#include "fused_common.h"
#include "weight4bit.h"

#include <c10/util/accumulate.h>

#include <vector>

namespace lora_kernels {
namespace {

using fused::DeviceParts;

// The batch's rows grouped by adapter. Adapter a (-1 .. n-1) owns sorted positions
// [begin(a), begin(a) + count(a)); order[pos] is the row at a sorted position and
// position[row] the inverse (both int64 on the batch's device).
struct Grouping {
  std::vector<int64_t> offsets;  // n + 2 entries: segment of adapter a is [offsets[a + 1], offsets[a + 2])
  std::vector<int64_t> first_row;  // per adapter: its first row in the batch
  bool grouped = true;             // every adapter's rows are one range of the batch's rows
  std::vector<int64_t> ranks;
  std::vector<double> scalings;
  std::vector<double> dropouts;   // per adapter
  std::vector<int64_t> host_ids;  // the batch's ids, on the host
  at::Tensor order, position;

  int64_t begin(int64_t a) const { return offsets[a + 1]; }
  int64_t count(int64_t a) const { return offsets[a + 2] - offsets[a + 1]; }
  int64_t adapters() const { return static_cast<int64_t>(ranks.size()); }
};

void check_multi_args(const at::Tensor& x, const fused::Base& base, const OptionalTensor& bias,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
                      const at::Tensor& ids, const OptionalTensor& ranks, const at::Tensor& dropouts) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  base.check(x);
  LK_CHECK(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1 && lora_A.size(2) == x.size(1),
           "lora_A must be [n, r_max, ", x.size(1), "], got ", lora_A.sizes());
  const int64_t n = lora_A.size(0), r_max = lora_A.size(1);
  const int64_t out = base.out_features();
  LK_CHECK(lora_B.dim() == 3 && lora_B.size(0) == n && lora_B.size(1) == out && lora_B.size(2) == r_max,
           "lora_B must be [", n, ", ", out, ", ", r_max, "], got ", lora_B.sizes());
  if (fused::is_mixed(x, lora_A)) {
    fused::check_same(lora_B, "lora_B", lora_A, "lora_A");
  } else {
    fused::check_same(lora_A, "lora_A", x);
    fused::check_same(lora_B, "lora_B", x);
  }
  LK_CHECK(lora_A.device() == x.device(), "lora_A must be on x's device ", x.device());
  if (bias.has_value()) {
    LK_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be [", out, "], got ", bias->sizes());
    fused::check_same(*bias, "bias", x);
  }
  LK_CHECK(scalings.dim() == 1 && scalings.size(0) == n && scalings.is_floating_point(),
           "scalings must be a float tensor [", n, "], got ", scalings.sizes(), " ", scalings.scalar_type());
  LK_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0) && !ids.is_floating_point() && ids.device() == x.device(),
           "adapter_ids must be an integer tensor [", x.size(0), "] on x's device, got ", ids.sizes(), " ",
           ids.scalar_type(), " on ", ids.device());
  if (ranks.has_value()) {
    LK_CHECK(ranks->dim() == 1 && ranks->size(0) == n && !ranks->is_floating_point(),
             "ranks must be an integer tensor [", n, "], got ", ranks->sizes());
  }
  LK_CHECK(dropouts.dim() == 1 && dropouts.size(0) == n && dropouts.is_floating_point() &&
               dropouts.device().is_cpu(),
           "dropouts must be a float CPU tensor [", n, "] (one probability per adapter), got ", dropouts.sizes(),
           " on ", dropouts.device());
}

Grouping group_rows(const at::Tensor& ids, const at::Tensor& scalings, const OptionalTensor& ranks,
                    const at::Tensor& dropouts, int64_t n, int64_t r_max) {
  const at::Tensor host_ids = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t M = host_ids.size(0);
  const int64_t* id = host_ids.data_ptr<int64_t>();
  Grouping g;
  g.offsets.assign(n + 2, 0);
  for (int64_t m = 0; m < M; ++m) {
    LK_CHECK(id[m] >= -1 && id[m] < n, "adapter_ids must be in [-1, ", n, "), got ", id[m], " at row ", m);
    ++g.offsets[id[m] + 2];
  }
  for (int64_t a = 1; a < n + 2; ++a) g.offsets[a] += g.offsets[a - 1];
  at::Tensor order = at::empty({M}, at::kLong), position = at::empty({M}, at::kLong);
  int64_t* order_p = order.data_ptr<int64_t>();
  int64_t* position_p = position.data_ptr<int64_t>();
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);  // next free position of adapter a at a + 1
  g.first_row.assign(n, -1);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t pos = next[id[m] + 1]++;
    order_p[pos] = m;
    position_p[m] = pos;
    if (id[m] < 0) continue;
    int64_t& first = g.first_row[id[m]];
    if (first < 0) first = m;
    // a row of adapter a belongs to its range iff it comes count-so-far rows after the first
    if (m - first != pos - g.offsets[id[m] + 1]) g.grouped = false;
  }
  g.order = order.to(ids.device());
  g.position = position.to(ids.device());
  g.host_ids.assign(id, id + M);
  const at::Tensor host_dropouts = dropouts.to(at::kDouble).contiguous();
  g.dropouts.assign(host_dropouts.data_ptr<double>(), host_dropouts.data_ptr<double>() + n);
  for (int64_t a = 0; a < n; ++a) {
    LK_CHECK(g.dropouts[a] >= 0.0 && g.dropouts[a] < 1.0, "dropout probabilities must be in [0, 1), got ",
             g.dropouts[a], " for adapter ", a);
  }
  const at::Tensor host_scalings = scalings.to(at::kCPU, at::kDouble).contiguous();
  g.scalings.assign(host_scalings.data_ptr<double>(), host_scalings.data_ptr<double>() + n);
  if (ranks.has_value()) {
    const at::Tensor host_ranks = ranks->to(at::kCPU, at::kLong).contiguous();
    g.ranks.assign(host_ranks.data_ptr<int64_t>(), host_ranks.data_ptr<int64_t>() + n);
    for (int64_t a = 0; a < n; ++a) {
      LK_CHECK(g.ranks[a] >= 1 && g.ranks[a] <= r_max, "ranks must be in [1, r_max=", r_max, "], got ",
               g.ranks[a], " for adapter ", a);
    }
  } else {
    g.ranks.assign(n, r_max);
  }
  return g;
}

// The scattered path's [M, in] / [M, out] temporaries. On the CPU they are kept between calls (one
// set per thread, grown as needed): a fresh multi-megabyte allocation costs more in page faults than
// the copy it holds (8 MB: 2.3 ms for index_select into a new tensor, 0.3 ms into a reused one,
// benchmarks/NOTES.md). Up to kMaxKeptBytes each: beyond it the page faults are small next to the
// GEMMs of such a batch, and one large batch must not pin hundreds of megabytes for the thread's
// lifetime. CUDA's caching allocator already reuses memory.
enum WorkspaceSlot { kGroupedX, kGroupedTerm, kGroupedGradY, kSlots };
constexpr int64_t kMaxKeptBytes = int64_t{16} << 20;

at::Tensor workspace(WorkspaceSlot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().type() != at::kCPU) return at::empty(sizes, options);
  const int64_t numel = c10::multiply_integers(sizes);
  if (numel * static_cast<int64_t>(options.dtype().itemsize()) > kMaxKeptBytes) return at::empty(sizes, options);
  static thread_local at::Tensor buffers[kSlots];
  at::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.scalar_type() != options.dtype().toScalarType() || buffer.numel() < numel) {
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel).view(sizes);
}

// The dropout mask of rows m0 .. m0+rows-1 of x, each row with its adapter's probability (rows of -1 and
// of adapters without dropout: ones), or an undefined tensor when no row of the block is dropped. One
// generator pass per distinct probability in the block: with one lora_dropout for all adapters, one.
at::Tensor block_mask(const DeviceParts& device, const at::Tensor& x, const Grouping& g, int64_t m0, int64_t rows,
                      int64_t seed) {
  std::vector<double> ps;
  bool some_kept_whole = false;  // a row whose adapter has no dropout
  for (int64_t m = m0; m < m0 + rows; ++m) {
    if (g.host_ids[m] < 0) continue;
    const double p = g.dropouts[g.host_ids[m]];
    if (p == 0.0) {
      some_kept_whole = true;
    } else if (std::find(ps.begin(), ps.end(), p) == ps.end()) {
      ps.push_back(p);
    }
  }
  if (ps.empty()) return at::Tensor();
  if (ps.size() == 1 && !some_kept_whole) return device.mask_rows(x, m0, rows, ps[0], seed);
  at::Tensor mask;
  for (const double p : ps) {
    const at::Tensor mask_p = device.mask_rows(x, m0, rows, p, seed);
    if (!mask.defined()) mask = at::ones_like(mask_p);
    std::vector<int64_t> local;
    for (int64_t m = m0; m < m0 + rows; ++m) {
      if (g.host_ids[m] >= 0 && g.dropouts[g.host_ids[m]] == p) local.push_back(m - m0);
    }
    const at::Tensor index = at::tensor(local, at::kLong).to(x.device());
    mask.index_copy_(0, index, mask_p.index_select(0, index));
  }
  return mask;
}

bool any_dropout(const Grouping& g) {
  for (int64_t a = 0; a < g.adapters(); ++a) {
    if (g.count(a) > 0 && g.dropouts[a] != 0.0) return true;
  }
  return false;
}

// x's rows in grouped order, dropped when dropout is on, in `dtype`: the one [M, in] copy.
at::Tensor grouped_x(const DeviceParts& device, const at::Tensor& x, const Grouping& g, int64_t seed,
                     at::ScalarType dtype) {
  at::Tensor out = workspace(kGroupedX, x.sizes(), x.options().dtype(dtype));
  if (!any_dropout(g)) {
    if (dtype == x.scalar_type()) return at::index_select_out(out, x, 0, g.order);
    return out.copy_(x.index_select(0, g.order));
  }
  const int64_t M = x.size(0), block = device.block_rows(x.size(1));
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    const at::Tensor mask = block_mask(device, x, g, m0, rows, seed);
    at::Tensor x_rows = x.narrow(0, m0, rows);
    out.index_copy_(0, g.position.narrow(0, m0, rows), (mask.defined() ? x_rows.mul(mask) : x_rows).to(dtype));
  }
  return out;
}

// t += term, where term [M, cols] holds t's rows in grouped order (in t's dtype or wider): the
// sum is rounded once into t's dtype.
void add_grouped_(at::Tensor& t, const Grouping& g, const at::Tensor& term) {
  if (term.scalar_type() == t.scalar_type()) {
    t.index_add_(0, g.order, term);
  } else {
    t.copy_(t.to(term.scalar_type()).add_(term.index_select(0, g.position)));
  }
}

at::ScalarType accumulation(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

std::tuple<at::Tensor, at::Tensor> multi_forward(const DeviceParts& device, const at::Tensor& x,
                                                 const fused::Base& base, const OptionalTensor& bias,
                                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                 const at::Tensor& scalings, const at::Tensor& ids,
                                                 const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed) {
  check_multi_args(x, base, bias, lora_A, lora_B, scalings, ids, ranks, dropouts);
  const int64_t M = x.size(0), n = lora_A.size(0), r_max = lora_A.size(1);
  const Grouping g = group_rows(ids, scalings, ranks, dropouts, n, r_max);
  at::Tensor y = base.forward(x, bias);
  at::Tensor xa = at::zeros({M, r_max}, lora_A.options());
  if (g.count(-1) == M) return {y, xa};
  if (g.grouped) {
    for (int64_t a = 0; a < n; ++a) {
      const int64_t count = g.count(a), r = g.ranks[a], row0 = g.first_row[a];
      if (count == 0) continue;
      fused::add_lora_forward(device, x.narrow(0, row0, count), y.narrow(0, row0, count),
                              xa.narrow(0, row0, count).narrow(1, 0, r), lora_A[a].narrow(0, 0, r),
                              lora_B[a].narrow(1, 0, r), g.scalings[a], g.dropouts[a], seed, row0);
    }
    return {y, xa};
  }
  // Scattered rows: the LoRA terms in grouped order (one [M, out] buffer in the accumulation
  // dtype), then added to y's rows with one rounding.
  const auto acc = accumulation(x);
  const at::Tensor xs = grouped_x(device, x, g, seed, lora_A.scalar_type());
  at::Tensor lora = workspace(kGroupedTerm, {M, y.size(1)}, y.options().dtype(acc));
  lora.narrow(0, 0, g.count(-1)).zero_();
  for (int64_t a = 0; a < n; ++a) {
    const int64_t count = g.count(a), r = g.ranks[a];
    if (count == 0) continue;
    const at::Tensor xa_a = at::mm(xs.narrow(0, g.begin(a), count), lora_A[a].narrow(0, 0, r).t());
    xa.narrow(1, 0, r).index_copy_(0, g.order.narrow(0, g.begin(a), count), xa_a);
    fused::scaled_mm_out(lora.narrow(0, g.begin(a), count), xa_a.to(acc), lora_B[a].narrow(1, 0, r).t().to(acc),
                         g.scalings[a]);
  }
  add_grouped_(y, g, lora);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward(
    const DeviceParts& device, const at::Tensor& grad_y, const at::Tensor& x, const fused::Base& base,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings,
    const at::Tensor& ids, const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx) {
  check_multi_args(x, base, c10::nullopt, lora_A, lora_B, scalings, ids, ranks, dropouts);
  const int64_t M = x.size(0), n = lora_A.size(0), r_max = lora_A.size(1);
  LK_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == base.out_features(), "grad_y must be [",
           M, ", ", base.out_features(), "], got ", grad_y.sizes());
  LK_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == r_max, "xa must be [", M, ", ", r_max, "], got ",
           xa.sizes());
  fused::check_same(grad_y, "grad_y", x);
  fused::check_same(xa, "xa", lora_A, "lora_A");
  const Grouping g = group_rows(ids, scalings, ranks, dropouts, n, r_max);
  if (g.grouped) {
    at::Tensor dx = need_dx ? base.input_grad(grad_y) : at::Tensor();
    at::Tensor dA = at::zeros_like(lora_A), dB = at::zeros_like(lora_B);
    for (int64_t a = 0; a < n; ++a) {
      const int64_t count = g.count(a), r = g.ranks[a], row0 = g.first_row[a];
      if (count == 0) continue;
      auto [dA_a, dB_a] = fused::lora_backward(device, grad_y.narrow(0, row0, count), x.narrow(0, row0, count),
                                               lora_A[a].narrow(0, 0, r), lora_B[a].narrow(1, 0, r),
                                               xa.narrow(0, row0, count).narrow(1, 0, r), g.scalings[a], g.dropouts[a],
                                               seed, row0, need_dx ? dx.narrow(0, row0, count) : at::Tensor());
      dA[a].narrow(0, 0, r).copy_(dA_a);
      dB[a].narrow(1, 0, r).copy_(dB_a);
    }
    return {need_dx ? dx : at::empty({0}, x.options()), dA, dB};
  }
  // Scattered rows: x (dropped) and dy in grouped order, each adapter's gradients from views of them,
  // dx's LoRA term formed in grouped order and added (masked, with dropout) at the end.
  const auto acc = accumulation(x);
  at::Tensor dx = need_dx ? base.input_grad(grad_y) : at::empty({0}, x.options());
  at::Tensor dA = at::zeros(lora_A.sizes(), lora_A.options().dtype(acc));
  at::Tensor dB = at::zeros(lora_B.sizes(), lora_B.options().dtype(acc));
  if (g.count(-1) == M) return {dx, dA.to(lora_A.scalar_type()), dB.to(lora_B.scalar_type())};
  const at::Tensor xs = grouped_x(device, x, g, seed, acc);
  at::Tensor dys = workspace(kGroupedGradY, grad_y.sizes(), grad_y.options());
  at::index_select_out(dys, grad_y, 0, g.order);
  const at::Tensor xas = xa.index_select(0, g.order);
  at::Tensor dx_lora;
  if (need_dx) {
    dx_lora = workspace(kGroupedTerm, x.sizes(), x.options().dtype(acc));
    dx_lora.narrow(0, 0, g.count(-1)).zero_();
  }
  for (int64_t a = 0; a < n; ++a) {
    const int64_t count = g.count(a), r = g.ranks[a];
    if (count == 0) continue;
    const double s = g.scalings[a];
    const at::Tensor dy = dys.narrow(0, g.begin(a), count).to(acc);
    const at::Tensor gb = fused::scaled_mm(dy, lora_B[a].narrow(1, 0, r).to(acc), s);  // s · dy B   [count, r]
    at::Tensor dA_a = dA[a].narrow(0, 0, r);
    at::mm_out(dA_a, gb.t(), xs.narrow(0, g.begin(a), count));
    fused::scaled_mm_out(dB[a].narrow(1, 0, r), dy.t(), xas.narrow(0, g.begin(a), count).narrow(1, 0, r).to(acc), s);
    if (!need_dx) continue;
    at::Tensor dx_lora_a = dx_lora.narrow(0, g.begin(a), count);
    at::mm_out(dx_lora_a, gb, lora_A[a].narrow(0, 0, r).to(acc));
  }
  if (need_dx && !any_dropout(g)) {
    add_grouped_(dx, g, dx_lora);
  } else if (need_dx) {
    const int64_t block = device.block_rows(x.size(1));
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t rows = std::min(block, M - m0);
      at::Tensor lora = dx_lora.index_select(0, g.position.narrow(0, m0, rows));
      const at::Tensor mask = block_mask(device, x, g, m0, rows, seed);
      if (mask.defined()) lora.mul_(mask);
      at::Tensor dx_rows = dx.narrow(0, m0, rows);
      dx_rows.copy_(dx_rows.to(acc).add_(lora));  // one rounding into dx's dtype
    }
  }
  return {dx, dA.to(lora_A.scalar_type()), dB.to(lora_B.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const OptionalTensor& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, const at::Tensor& scalings,
                                                     const at::Tensor& adapter_ids, const OptionalTensor& ranks,
                                                     const at::Tensor& dropouts, int64_t seed) {
  return multi_forward(fused::kCpu, x, fused::Base{weight}, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings, const at::Tensor& adapter_ids,
    const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx) {
  return multi_backward(fused::kCpu, grad_y, x, fused::Base{weight}, lora_A, lora_B, xa, scalings, adapter_ids, ranks, dropouts,
                        seed, need_dx);
}

std::tuple<at::Tensor, at::Tensor> multi_forward_4bit_cpu(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const OptionalTensor& nested_absmax,
    const OptionalTensor& nested_code, const OptionalTensor& offset, const at::Tensor& code_table,
    int64_t out_features, int64_t blocksize, const OptionalTensor& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scalings, const at::Tensor& adapter_ids, const OptionalTensor& ranks,
    const at::Tensor& dropouts, int64_t seed) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  const fused::Packed4bit w = fused::packed_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table,
                                                 out_features, x.size(1), blocksize);
  fused::Base base;
  base.packed = &w;
  return multi_forward(fused::kCpu, x, base, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward_4bit_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
    const OptionalTensor& nested_absmax, const OptionalTensor& nested_code, const OptionalTensor& offset,
    const at::Tensor& code_table, int64_t out_features, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings, const at::Tensor& adapter_ids,
    const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx) {
  LK_CHECK(x.dim() == 2, "x must be 2-D [M, in], got ", x.sizes());
  const fused::Packed4bit w = fused::packed_4bit(codes, absmax, nested_absmax, nested_code, offset, code_table,
                                                 out_features, x.size(1), blocksize);
  fused::Base base;
  base.packed = &w;
  return multi_backward(fused::kCpu, grad_y.contiguous(), x, base, lora_A, lora_B, xa, scalings, adapter_ids, ranks,
                        dropouts, seed, need_dx);
}

#ifdef LORA_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> multi_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const OptionalTensor& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, const at::Tensor& scalings,
                                                      const at::Tensor& adapter_ids, const OptionalTensor& ranks,
                                                      const at::Tensor& dropouts, int64_t seed) {
  return multi_forward(fused::kCuda, x, fused::Base{weight}, bias, lora_A, lora_B, scalings, adapter_ids, ranks, dropouts,
                       seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, const at::Tensor& scalings, const at::Tensor& adapter_ids,
    const OptionalTensor& ranks, const at::Tensor& dropouts, int64_t seed, bool need_dx) {
  return multi_backward(fused::kCuda, grad_y, x, fused::Base{weight}, lora_A, lora_B, xa, scalings, adapter_ids, ranks,
                        dropouts, seed, need_dx);
}
#endif

}  // namespace lora_kernels
