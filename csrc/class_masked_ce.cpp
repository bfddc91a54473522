// Class-masked cross-entropy as torch ops (torch.ops.imbsam_fast.masked_ce*): the CPU kernels, the
// schema and the autograd formula, all in C++, so that an eager call never runs Python after the
// dispatcher. The CUDA kernels are in class_masked_ce_cuda.cu.
//
// For a row x of C logits with label y and label smoothing s:
//
//   lse = log sum_k exp(x_k)
//   l   = lse - (1 - s) x_y - (s / C) sum_k x_k
//   G_k = dl/dx_k = softmax(x)_k - (1 - s) [k = y] - s / C
//
// Rows with y = ignore_index get l = 0 and G = 0. With per-class weights a (head) and b (tail) over
// a batch of B rows:
//
//   head = sum_i a[y_i] l_i / B,     tail = sum_i b[y_i] l_i / B
//
// and the backward never recomputes the softmax: with upstream gradients g_h, g_t and g_l,
//
//   dx_i = (g_h a[y_i] / B + g_t b[y_i] / B + g_l[i]) G_i
//
//   masked_ce_forward(x, y, a, b, ignore_index, s) -> (head, tail, l, G, row_w)   row_w = [a[y_i]; b[y_i]]
//   masked_ce_backward(G, row_w, g_h?, g_t?, g_l?) -> dx
//   masked_ce(x, y, a, b, ignore_index, s) -> (head, tail, l)                        differentiable in x
//
// Math in fp32 (fp64 for fp64 logits); G is stored in the logits' dtype. A label outside [0, C)
// that is not ignore_index raises ValueError on the CPU and is a device-side assert on CUDA.

#include "class_masked_ce.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace imbsam_fast {

std::string label_range_message(int64_t num_classes, int64_t ignore_index) {
  return "labels must lie in [0, " + std::to_string(num_classes) + ") (or equal ignore_index=" +
         std::to_string(ignore_index) + ") (class weights: " + std::to_string(num_classes) +
         " entries, one per class; a label >= " + std::to_string(num_classes) +
         " means the class weights is too short for the data)";
}

void check_masked_ce_inputs(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& head_w,
                            const at::Tensor& tail_w) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "masked_ce: logits must be 2-D (batch, classes), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0),
                    "masked_ce: targets must be 1-D with one label per row of logits: logits ", logits.sizes(),
                    ", targets ", targets.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
                    "masked_ce: targets must be integer class labels, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "masked_ce: logits need at least one class");
  for (const auto* w : {&head_w, &tail_w}) {
    TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == logits.size(1), "masked_ce: the class weights have ",
                      w->numel(), " entries but logits have ", logits.size(1), " classes");
    TORCH_CHECK_VALUE(w->scalar_type() == at::kFloat, "masked_ce: class weights must be float32, got ",
                      w->scalar_type());
  }
  TORCH_CHECK(targets.device() == logits.device() && head_w.device() == logits.device() &&
                  tail_w.device() == logits.device(),
              "masked_ce: logits, targets and class weights must be on one device");
}

MaskedCEForward prepare_masked_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                          const at::Tensor& head_w, const at::Tensor& tail_w) {
  check_masked_ce_inputs(logits, targets, head_w, tail_w);
  const int64_t batch = logits.size(0);
  const int64_t classes = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  const at::Tensor rows = logits.stride(1) == 1 && logits.stride(0) == classes ? logits : logits.contiguous();
  return {rows, targets.to(at::kLong).contiguous(), head_w.contiguous(), tail_w.contiguous(),
          at::empty({batch}, f32), at::empty({batch, classes}, logits.options()), at::empty({2, batch}, f32), batch,
          classes};
}

MaskedCEBackward prepare_masked_ce_backward(const at::Tensor& grad, const at::Tensor& row_w) {
  TORCH_CHECK(grad.dim() == 2 && row_w.dim() == 2 && row_w.size(0) == 2 && row_w.size(1) == grad.size(0),
              "masked_ce_backward: G must be (B, C) and row_w (2, B)");
  return {grad.contiguous(), row_w.to(at::kFloat).contiguous(), at::empty_like(grad, at::MemoryFormat::Contiguous),
          grad.size(0), grad.size(1)};
}

namespace {

using at::Tensor;
namespace vec = at::vec;


std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_ce_forward_cpu(const Tensor& logits_in,
                                                                         const Tensor& targets_in,
                                                                         const Tensor& head_w_in,
                                                                         const Tensor& tail_w_in,
                                                                         int64_t ignore_index, double smoothing) {
  auto [logits, targets, head_w, tail_w, losses, grad, row_w, batch, classes] =
      prepare_masked_ce_forward(logits_in, targets_in, head_w_in, tail_w_in);
  const auto f32 = losses.options();
  std::atomic<bool> bad_label{false};
  // The softmax through ATen's vectorized kernels (an extension cannot use at::vec's exp), then one
  // parallel pass per row for l, G and the row weights.
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  const Tensor log_p = at::log_softmax(logits.to(acc_type), 1);
  const Tensor p = at::exp(log_p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "imbsam_fast::masked_ce_forward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = vec::Vectorized<acc_t>;
    const acc_t* lp = log_p.const_data_ptr<acc_t>();
    const acc_t* pp = p.const_data_ptr<acc_t>();
    const int64_t* y = targets.const_data_ptr<int64_t>();
    const float* a = head_w.const_data_ptr<float>();
    const float* b = tail_w.const_data_ptr<float>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    float* l = losses.data_ptr<float>();
    float* row_a = row_w.data_ptr<float>();
    float* row_b = row_a + batch;
    const acc_t s = static_cast<acc_t>(smoothing);
    const acc_t s_over_c = s / static_cast<acc_t>(classes);
    const int64_t grain = std::max<int64_t>(1, 32768 / classes);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t label = y[i];
        const bool in_range = label >= 0 && label < classes;
        if (!in_range && label != ignore_index) bad_label.store(true, std::memory_order_relaxed);
        scalar_t* gi = g + i * classes;
        if (!in_range || label == ignore_index) {
          l[i] = 0.f;
          row_a[i] = 0.f;
          row_b[i] = 0.f;
          std::fill(gi, gi + classes, scalar_t(0));
          continue;
        }
        const acc_t* lpi = lp + i * classes;
        const acc_t sum_lp = s == acc_t(0) ? acc_t(0)
            : vec::reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; }, lpi, classes);
        l[i] = static_cast<float>(-(acc_t(1) - s) * lpi[label] - s_over_c * sum_lp);
        row_a[i] = a[label];
        row_b[i] = b[label];
        const acc_t* pi = pp + i * classes;
        for (int64_t k = 0; k < classes; ++k) gi[k] = static_cast<scalar_t>(pi[k] - s_over_c);
        gi[label] = static_cast<scalar_t>(pi[label] - s_over_c - (acc_t(1) - s));
      }
    });
  });
  TORCH_CHECK_VALUE(!bad_label.load(), label_range_message(classes, ignore_index));
  // The two weighted sums in row order (fixed, whatever the number of threads), accumulated in fp64.
  const float* l = losses.const_data_ptr<float>();
  const float* row_a = row_w.const_data_ptr<float>();
  double head = 0.0, tail = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    head += static_cast<double>(row_a[i]) * l[i];
    tail += static_cast<double>(row_a[batch + i]) * l[i];
  }
  const double inv_b = batch > 0 ? 1.0 / static_cast<double>(batch) : 0.0;
  return {at::scalar_tensor(head * inv_b, f32), at::scalar_tensor(tail * inv_b, f32), losses, grad, row_w};
}

Tensor masked_ce_backward_cpu(const Tensor& grad_in, const Tensor& row_w_in, const std::optional<Tensor>& g_head,
                              const std::optional<Tensor>& g_tail, const std::optional<Tensor>& g_losses) {
  auto [grad, row_w, out, batch, classes] = prepare_masked_ce_backward(grad_in, row_w_in);
  if (batch == 0 || classes == 0) return out;
  // CPU scalars: reading them is no device sync.
  const double inv_b = 1.0 / static_cast<double>(batch);
  const double gh = g_head.has_value() ? g_head->item<double>() * inv_b : 0.0;
  const double gt = g_tail.has_value() ? g_tail->item<double>() * inv_b : 0.0;
  const Tensor gl = g_losses.has_value() ? g_losses->to(at::kFloat).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "imbsam_fast::masked_ce_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dx = out.data_ptr<scalar_t>();
    const float* row_a = row_w.const_data_ptr<float>();
    const float* row_b = row_a + batch;
    const float* glp = gl.defined() ? gl.const_data_ptr<float>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / classes);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t w = static_cast<acc_t>(static_cast<float>(gh * row_a[i] + gt * row_b[i]) +
                                           (glp ? glp[i] : 0.f));
        const scalar_t* gi = g + i * classes;
        scalar_t* di = dx + i * classes;
        for (int64_t k = 0; k < classes; ++k) di[k] = static_cast<scalar_t>(w * static_cast<acc_t>(gi[k]));
      }
    });
  });
  return out;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> call_forward(const Tensor& logits, const Tensor& targets,
                                                                const Tensor& head_w, const Tensor& tail_w,
                                                                int64_t ignore_index, double smoothing) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("imbsam_fast::masked_ce_forward", "")
                       .typed<decltype(masked_ce_forward_cpu)>();
  return op.call(logits, targets, head_w, tail_w, ignore_index, smoothing);
}

class MaskedCE : public torch::autograd::Function<MaskedCE> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets,
                               const Tensor& head_w, const Tensor& tail_w, int64_t ignore_index, double smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [head, tail, losses, grad, row_w] = call_forward(logits, targets, head_w, tail_w, ignore_index, smoothing);
    ctx->save_for_backward({grad, row_w});
    return {head, tail, losses};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("imbsam_fast::masked_ce_backward", "")
                         .typed<decltype(masked_ce_backward_cpu)>();
    const auto saved = ctx->get_saved_variables();
    auto given = [&](size_t k) { return grads[k].defined() ? std::optional<Tensor>(grads[k]) : std::nullopt; };
    Tensor dx;
    if (grads[0].defined() || grads[1].defined() || grads[2].defined()) {
      dx = op.call(saved[0], saved[1], given(0), given(1), given(2));
    }
    return {dx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> masked_ce_autograd(const Tensor& logits, const Tensor& targets,
                                                      const Tensor& head_w, const Tensor& tail_w,
                                                      int64_t ignore_index, double smoothing) {
  auto out = MaskedCE::apply(logits, targets, head_w, tail_w, ignore_index, smoothing);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> masked_ce_no_autograd(const Tensor& logits, const Tensor& targets,
                                                         const Tensor& head_w, const Tensor& tail_w,
                                                         int64_t ignore_index, double smoothing) {
  auto [head, tail, losses, grad, row_w] = call_forward(logits, targets, head_w, tail_w, ignore_index, smoothing);
  return {head, tail, losses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(imbsam_fast, m) {
  m.def("masked_ce_forward(Tensor logits, Tensor targets, Tensor head_w, Tensor tail_w, int ignore_index, "
        "float smoothing) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_ce_backward(Tensor grad, Tensor row_w, Tensor? g_head, Tensor? g_tail, Tensor? g_losses) -> Tensor");
  m.def("masked_ce(Tensor logits, Tensor targets, Tensor head_w, Tensor tail_w, int ignore_index, "
        "float smoothing) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(imbsam_fast, CPU, m) {
  m.impl("masked_ce_forward", &masked_ce_forward_cpu);
  m.impl("masked_ce_backward", &masked_ce_backward_cpu);
}

TORCH_LIBRARY_IMPL(imbsam_fast, Autograd, m) { m.impl("masked_ce", &masked_ce_autograd); }

TORCH_LIBRARY_IMPL(imbsam_fast, CompositeExplicitAutograd, m) { m.impl("masked_ce", &masked_ce_no_autograd); }

}  // namespace imbsam_fast
