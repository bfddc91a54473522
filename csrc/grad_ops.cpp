// The phases' gradient bookkeeping in C++: one object that holds an optimizer's parameter lists and reads
// and writes each parameter's ``.grad`` itself.
//
// The Python phases of a step read every parameter's gradient (a Python wrapper made for each new
// gradient), move it aside, put it back and clear it, and hand lists of tensors to the kernels, which
// convert every element: on ResNet-32 about 95 x 6 object operations and 95 x 9 conversions a step, on
// caches that a forward and backward have just evicted. ParamBook converts its lists once (when the
// layout changes) and keeps them; each phase is then one method call, and the parameter kernels
// (param_ops.cpp, param_ops_cuda.cu) are called through the dispatcher, for every device they cover.
//
//   take()            h_j <- w_j.grad, w_j.grad <- None, for every parameter; the number of dense h_j
//   give()            w_j.grad <- h_j (None where h_j is)
//   ascend(eps)       buckets k (runs of consecutive tensors, one rho each): s = sum_k ||g_k||^2;
//                     b <- w; w <- w + rho_k / (sqrt(s) + eps) g_k; returns sqrt(s)
//   update_norm()     ||g||_2 over the SGD groups' gradients
//   restore_sgd(...)  per param group: w <- b, then torch.optim.SGD's update (restore_sgd_)
//   clear()           w_j.grad <- None
//
// Every gradient and list is checked before anything is written: a missing or sparse gradient, or a
// list the kernels do not take, is a NotImplementedError, and the caller runs the Python phases
// instead. Sums over several buckets are added as the Python backend adds them (torch.stack(...).sum(),
// in fp64 when the buckets' dtypes differ), so both paths agree bit for bit.

#include "param_checks.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace imbsam_fast {
namespace {

// The gradients of ``params``, each defined and dense, else NotImplementedError (nothing is changed).
std::vector<at::Tensor> dense_grads(at::TensorList params) {
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& g = params[i].unsafeGetTensorImpl()->grad();
    TORCH_CHECK_NOT_IMPLEMENTED(g.defined(), "imbsam_fast: parameter ", i, " has no gradient");
    TORCH_CHECK_NOT_IMPLEMENTED(g.layout() == at::kStrided, "imbsam_fast: parameter ", i,
                                " has a sparse gradient");
    grads.push_back(g);
  }
  return grads;
}

using Run = std::pair<size_t, size_t>;

// The [begin, end) offsets of consecutive runs of ``sizes`` tensors, which must cover ``n`` tensors.
std::vector<Run> runs(c10::IntArrayRef sizes, size_t n, const char* what) {
  std::vector<Run> out;
  size_t begin = 0;
  for (const int64_t s : sizes) {
    TORCH_CHECK(s > 0, "imbsam_fast: ", what, ": sizes must be positive");
    out.emplace_back(begin, begin + static_cast<size_t>(s));
    begin += static_cast<size_t>(s);
  }
  TORCH_CHECK(begin == n, "imbsam_fast: ", what, ": sizes add up to ", begin, ", not to the ", n, " tensors");
  return out;
}

at::TensorList slice(at::TensorList v, const Run& r) {
  return v.slice(r.first, r.second - r.first);
}

at::Tensor sq_norm_op(at::TensorList ts) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("imbsam_fast::sq_norm", "")
                             .typed<at::Tensor(at::TensorList)>();
  return op.call(ts);
}

// sum_k s_k as the Python backend adds per-bucket sums (backends/ext_ops.py, backends/buckets.py).
at::Tensor summed(std::vector<at::Tensor> parts) {
  if (parts.size() == 1) return parts[0];
  bool mixed = false;
  for (const auto& p : parts) mixed = mixed || p.scalar_type() != parts[0].scalar_type();
  const auto device = parts[0].device();
  for (auto& p : parts) {
    if (mixed) p = p.to(at::kDouble);
    p = p.to(device, /*non_blocking=*/true);
  }
  return at::stack(parts).sum();
}

at::Tensor grads_sq_norm(at::TensorList grads, const std::vector<Run>& lists) {
  std::vector<at::Tensor> parts;
  for (const auto& r : lists) {
    auto part = slice(grads, r);
    check_list(part, "grads");
    parts.push_back(sq_norm_op(part));
  }
  return summed(std::move(parts));
}

// The kernels are called below the autograd keys: the phases run without autograd (the Python ones under
// no_grad), and the autograd fallback would box every list to look for tensors that require grad.
using Below = at::AutoDispatchBelowADInplaceOrView;

// One optimizer's parameter lists, converted from Python once and kept: each phase of a step is then one
// method call with no list to convert (a list of 95 tensors costs about 50 us to pass to an op on a
// 2-core Xeon, more than the kernels of a small model's phase).
struct ParamBook : torch::CustomClassHolder {
  std::vector<at::Tensor> params;  // every parameter, in group order: take / give / clear
  std::vector<at::Tensor> held;    // g_h between take and give

  std::vector<at::Tensor> bucket_params, bucket_backups;  // bucket by bucket
  std::vector<Run> buckets;
  std::vector<double> rhos;

  std::vector<at::Tensor> sgd_params, sgd_backups, sgd_buffers;  // param group by param group
  std::vector<Run> groups, buffer_runs;  // each group's tensors, and its momentum buffers (none without)
  std::vector<bool> sgd_momentum;

  explicit ParamBook(std::vector<at::Tensor> ps) : params(std::move(ps)) {}

  void set_buckets(std::vector<at::Tensor> ps, std::vector<at::Tensor> backups, std::vector<int64_t> sizes,
                   std::vector<double> bucket_rhos) {
    TORCH_CHECK(ps.size() == backups.size(), "imbsam_fast: ParamBook.set_buckets: lists of different lengths");
    TORCH_CHECK(sizes.size() == bucket_rhos.size(), "imbsam_fast: ParamBook.set_buckets: one rho per bucket");
    buckets = runs(sizes, ps.size(), "ParamBook.set_buckets");
    bucket_params = std::move(ps);
    bucket_backups = std::move(backups);
    rhos = std::move(bucket_rhos);
  }

  void set_sgd(std::vector<at::Tensor> ps, std::vector<at::Tensor> backups, std::vector<at::Tensor> buffers,
               std::vector<int64_t> sizes, c10::List<bool> with_momentum) {
    TORCH_CHECK(ps.size() == backups.size(), "imbsam_fast: ParamBook.set_sgd: lists of different lengths");
    TORCH_CHECK(sizes.size() == with_momentum.size(), "imbsam_fast: ParamBook.set_sgd: one flag per group");
    auto group_runs = runs(sizes, ps.size(), "ParamBook.set_sgd");
    std::vector<Run> buffer_of;
    size_t used = 0;
    for (size_t k = 0; k < group_runs.size(); ++k) {
      const size_t n = with_momentum.get(k) ? group_runs[k].second - group_runs[k].first : 0;
      buffer_of.emplace_back(used, used + n);
      used += n;
    }
    TORCH_CHECK(used == buffers.size(), "imbsam_fast: ParamBook.set_sgd: ", buffers.size(), " momentum buffers for ",
                used, " tensors with momentum");
    sgd_params = std::move(ps);
    sgd_backups = std::move(backups);
    sgd_buffers = std::move(buffers);
    groups = std::move(group_runs);
    buffer_runs = std::move(buffer_of);
    sgd_momentum.assign(with_momentum.begin(), with_momentum.end());
  }

  // h_j <- w_j.grad, w_j.grad <- None for every parameter; the number of dense gradients taken.
  int64_t take() {
    held.clear();
    held.reserve(params.size());
    int64_t dense = 0;
    for (auto& p : params) {
      at::Tensor& g = p.unsafeGetTensorImpl()->mutable_grad();
      dense += g.defined() && g.layout() == at::kStrided;
      held.push_back(std::move(g));
      g.reset();
    }
    return dense;
  }

  // w_j.grad <- h_j (None where h_j is); the stash is emptied.
  void give() {
    TORCH_CHECK(held.size() == params.size(), "imbsam_fast: ParamBook.give: nothing taken");
    for (size_t i = 0; i < params.size(); ++i) params[i].unsafeGetTensorImpl()->mutable_grad() = std::move(held[i]);
    held.clear();
  }

  std::vector<std::optional<at::Tensor>> gradients() const {
    std::vector<std::optional<at::Tensor>> out;
    out.reserve(held.size());
    for (const auto& g : held) out.push_back(g.defined() ? std::optional<at::Tensor>(g) : std::nullopt);
    return out;
  }

  void drop() { held.clear(); }

  // s = sum_k ||g_k||^2 over the buckets; per bucket b <- w, w <- w + rho_k / (sqrt(s) + eps) g_k; sqrt(s).
  at::Tensor ascend(double eps) {
    const Below below_autograd;
    TORCH_CHECK(!buckets.empty(), "imbsam_fast: ParamBook.ascend: no buckets set");
    const auto grads = dense_grads(bucket_params);
    for (const auto& r : buckets) check_perturb_args(slice(bucket_params, r), slice(grads, r), slice(bucket_backups, r));
    const at::Tensor sq = grads_sq_norm(grads, buckets);
    static const auto perturb = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("imbsam_fast::perturb_", "")
                                    .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                                                double, double)>();
    for (size_t k = 0; k < buckets.size(); ++k) {
      perturb.call(slice(bucket_params, buckets[k]), slice(grads, buckets[k]), slice(bucket_backups, buckets[k]), sq,
                   rhos[k], eps);
    }
    return sq.sqrt();
  }

  // ||g||_2 of the update: the gradients of the SGD groups' parameters.
  at::Tensor update_norm() {
    const Below below_autograd;
    TORCH_CHECK(!groups.empty(), "imbsam_fast: ParamBook.update_norm: no SGD groups set");
    return grads_sq_norm(dense_grads(sgd_params), groups).sqrt();
  }

  // Per param group: w <- backup, then torch.optim.SGD's update with this step's options (restore_sgd_).
  void restore_sgd(std::vector<double> lr, std::vector<double> momentum, std::vector<double> dampening,
                   std::vector<double> weight_decay, c10::List<bool> nesterov, c10::List<bool> maximize,
                   std::optional<at::Tensor> skip) {
    const Below below_autograd;
    const size_t n_groups = groups.size();
    TORCH_CHECK(n_groups > 0, "imbsam_fast: ParamBook.restore_sgd: no SGD groups set");
    TORCH_CHECK(lr.size() == n_groups && momentum.size() == n_groups && dampening.size() == n_groups &&
                    weight_decay.size() == n_groups && nesterov.size() == n_groups && maximize.size() == n_groups,
                "imbsam_fast: ParamBook.restore_sgd: one value of each option per group");
    const auto grads = dense_grads(sgd_params);
    for (size_t k = 0; k < n_groups; ++k) {
      TORCH_CHECK((momentum[k] != 0.0) == sgd_momentum[k], "imbsam_fast: ParamBook.restore_sgd: group ", k,
                  " changed between momentum and none; set_sgd again");
    }
    const at::TensorList ps(sgd_params), bs(sgd_backups), ms(sgd_buffers);
    for (size_t k = 0; k < n_groups; ++k) {
      check_restore_sgd_args(slice(ps, groups[k]), slice(bs, groups[k]), slice(grads, groups[k]),
                             slice(ms, buffer_runs[k]), sgd_momentum[k]);
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("imbsam_fast::restore_sgd_", "")
                               .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                                           double, double, double, bool, bool, const std::optional<at::Tensor>&)>();
    for (size_t k = 0; k < n_groups; ++k) {
      op.call(slice(ps, groups[k]), slice(bs, groups[k]), slice(grads, groups[k]), slice(ms, buffer_runs[k]), lr[k],
              momentum[k], dampening[k], weight_decay[k], nesterov.get(k), maximize.get(k), skip);
    }
  }

  // w_j.grad <- None for every parameter.
  void clear() {
    for (auto& p : params) {
      if (p.unsafeGetTensorImpl()->grad().defined()) p.unsafeGetTensorImpl()->mutable_grad().reset();
    }
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(imbsam_fast, m) {
  m.class_<ParamBook>("ParamBook")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("set_buckets", &ParamBook::set_buckets)
      .def("set_sgd", &ParamBook::set_sgd)
      .def("take", &ParamBook::take)
      .def("give", &ParamBook::give)
      .def("gradients", &ParamBook::gradients)
      .def("drop", &ParamBook::drop)
      .def("ascend", &ParamBook::ascend)
      .def("update_norm", &ParamBook::update_norm)
      .def("restore_sgd", &ParamBook::restore_sgd)
      .def("clear", &ParamBook::clear);
}

}  // namespace imbsam_fast
