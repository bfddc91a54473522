// Parameter ops of one ImbSAM step over lists of tensors, as torch ops (torch.ops.imbsam_fast.*).
//
// Every op works on whole lists (a parameter bucket): the elements of all
// tensors are cut into fixed chunks of kChunk elements, and at::parallel_for
// walks the chunk table, so a list of hundreds of small tensors costs one
// dispatch and one parallel region instead of one per tensor. Math in fp32
// (fp64 for fp64 tensors); fp16 and bf16 are loaded to and stored from fp32.
//
//   sq_norm(ts)                       s = sum_j ||t_j||^2               (0-dim, fp32 or fp64)
//   perturb_(w, g, b, s, rho, eps)    b <- w; w <- w + rho / (sqrt(s) + eps) * g
//   restore_(w, b)                    w <- b                            (a bit copy)
//   restore_sgd_(w, b, g, m, ..., skip)  w <- b, then torch.optim.SGD's update of w with g and momentum m
//                                     (only w <- b when the optional flag ``skip`` is non-zero)
//
// The norm is deterministic: each chunk's partial sum is fixed by the chunk table,
// and the partials are added in chunk order, whatever the number of threads.

#include "param_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace imbsam_fast {
namespace {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> chunk_table(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      chunks.push_back({t, b, std::min(n, b + kChunk)});
    }
  }
  return chunks;
}

template <typename scalar_t, typename acc_t>
acc_t chunk_sq_sum(const scalar_t* x, int64_t n) {
  acc_t acc = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Four independent accumulators keep the multiply-adds from waiting on each other.
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t W = Vec::size();
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
      Vec v0 = Vec::loadu(x + i), v1 = Vec::loadu(x + i + W), v2 = Vec::loadu(x + i + 2 * W),
          v3 = Vec::loadu(x + i + 3 * W);
      a0 = a0 + v0 * v0;
      a1 = a1 + v1 * v1;
      a2 = a2 + v2 * v2;
      a3 = a3 + v3 * v3;
    }
    for (; i + W <= n; i += W) {
      Vec v = Vec::loadu(x + i);
      a0 = a0 + v * v;
    }
    Vec vacc = (a0 + a1) + (a2 + a3);
    float lanes[W];
    vacc.store(lanes);
    for (int64_t l = 0; l < W; ++l) acc += lanes[l];
    for (; i < n; ++i) acc += x[i] * x[i];
  } else if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    using Vec = at::vec::Vectorized<float>;
    using RVec = at::vec::Vectorized<scalar_t>;
    Vec vacc(0.f);
    int64_t i = 0;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(x + i));
      vacc = at::vec::fmadd(lo, lo, vacc);
      vacc = at::vec::fmadd(hi, hi, vacc);
    }
    float lanes[Vec::size()];
    vacc.store(lanes);
    for (int64_t l = 0; l < Vec::size(); ++l) acc += lanes[l];
    for (; i < n; ++i) {
      const float v = static_cast<float>(x[i]);
      acc += v * v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) acc += static_cast<acc_t>(x[i]) * static_cast<acc_t>(x[i]);
  }
  return acc;
}

at::Tensor sq_norm(at::TensorList tensors) {
  if (tensors.empty()) return at::zeros({}, at::kFloat);
  check_list(tensors, "sq_norm");
  const auto dtype = tensors[0].scalar_type();
  const bool wide = dtype == at::kDouble;
  const auto chunks = chunk_table(tensors);
  std::vector<double> partial(chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "imbsam_fast::sq_norm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const auto& ch = chunks[c];
        const scalar_t* x = tensors[ch.tensor].const_data_ptr<scalar_t>() + ch.begin;
        partial[c] = static_cast<double>(chunk_sq_sum<scalar_t, acc_t>(x, ch.end - ch.begin));
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(total, at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat));
}

template <typename scalar_t, typename opmath_t>
inline opmath_t round_to(opmath_t x) {
  return static_cast<opmath_t>(static_cast<scalar_t>(x));
}

// torch.optim.SGD, op by op: each of its ops rounds to the parameter dtype, and its vectorized
// "a + alpha * b" is one fused multiply-add. Built with -ffp-contract=off, so only these fma's fuse.
// The options are template parameters, so the inner loop has no branch and vectorizes.
template <typename scalar_t, typename opmath_t, bool MAXIMIZE, bool WD, bool MOMENTUM, bool NESTEROV>
void sgd_loop(scalar_t* w, const scalar_t* b, const scalar_t* g, scalar_t* m, int64_t n, opmath_t lr,
              opmath_t momentum, opmath_t keep, opmath_t wd) {
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t wi = static_cast<opmath_t>(b[i]);
    opmath_t d = MAXIMIZE ? -static_cast<opmath_t>(g[i]) : static_cast<opmath_t>(g[i]);
    if constexpr (WD) d = round_to<scalar_t>(std::fma(wi, wd, d));
    if constexpr (MOMENTUM) {
      const opmath_t decayed = round_to<scalar_t>(static_cast<opmath_t>(m[i]) * momentum);
      const scalar_t buf = static_cast<scalar_t>(std::fma(d, keep, decayed));
      m[i] = buf;
      d = NESTEROV ? round_to<scalar_t>(std::fma(static_cast<opmath_t>(buf), momentum, d))
                   : static_cast<opmath_t>(buf);
    }
    w[i] = static_cast<scalar_t>(std::fma(d, -lr, wi));
  }
}

template <typename F>
void sgd_dispatch(bool maximize, bool wd, bool momentum, bool nesterov, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  auto with_nesterov = [&](auto mx, auto w, auto mom) {
    if (nesterov) f(mx, w, mom, T{}); else f(mx, w, mom, N{});
  };
  auto with_momentum = [&](auto mx, auto w) {
    if (momentum) with_nesterov(mx, w, T{}); else with_nesterov(mx, w, N{});
  };
  auto with_wd = [&](auto mx) {
    if (wd) with_momentum(mx, T{}); else with_momentum(mx, N{});
  };
  if (maximize) with_wd(T{}); else with_wd(N{});
}

template <typename scalar_t, typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, F&& body) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) body(chunks[c]);
  });
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sq,
              double rho, double eps) {
  if (params.empty()) return;
  check_perturb_args(params, grads, backups);
  const auto chunks = chunk_table(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "imbsam_fast::perturb_", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // The same scale as the torch ops: rho / (||g|| + eps) in the norm's precision. ``sq`` is a CPU tensor
    // here (this is the CPU kernel), so reading it is no device sync.
    const opmath_t norm = static_cast<opmath_t>(std::sqrt(sq.item<double>()));
    const opmath_t scale = static_cast<opmath_t>(rho) / (norm + static_cast<opmath_t>(eps));
    for_each_chunk<scalar_t>(chunks, [&](const Chunk& ch) {
      scalar_t* w = params[ch.tensor].data_ptr<scalar_t>() + ch.begin;
      const scalar_t* g = grads[ch.tensor].const_data_ptr<scalar_t>() + ch.begin;
      scalar_t* b = backups[ch.tensor].data_ptr<scalar_t>() + ch.begin;
      const int64_t n = ch.end - ch.begin;
      // One pass: each weight is read once, then written to its backup and, moved, back in place.
      if constexpr (std::is_same_v<scalar_t, float>) {
        using Vec = at::vec::Vectorized<float>;
        const Vec s(scale);
        int64_t i = 0;
        for (; i + Vec::size() <= n; i += Vec::size()) {
          const Vec wv = Vec::loadu(w + i);
          wv.store(b + i);
          (wv + Vec::loadu(g + i) * s).store(w + i);
        }
        for (; i < n; ++i) {
          b[i] = w[i];
          w[i] = w[i] + g[i] * scale;
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t wi = w[i];
          b[i] = wi;
          w[i] = static_cast<scalar_t>(static_cast<opmath_t>(wi) + scale * static_cast<opmath_t>(g[i]));
        }
      }
    });
  });
}

void restore_(at::TensorList params, at::TensorList backups) {
  if (params.empty()) return;
  check_restore_args(params, backups);
  const auto chunks = chunk_table(params);
  const int64_t item = params[0].element_size();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const auto& ch = chunks[c];
      auto* w = static_cast<char*>(params[ch.tensor].data_ptr()) + ch.begin * item;
      const auto* b = static_cast<const char*>(backups[ch.tensor].const_data_ptr()) + ch.begin * item;
      std::memcpy(w, b, (ch.end - ch.begin) * item);
    }
  });
}

void restore_sgd_(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList buffers,
                  double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                  bool maximize, const std::optional<at::Tensor>& skip) {
  if (params.empty()) return;
  if (skip.has_value() && skip->item<double>() != 0.0) {
    // A skipped step: only the restore. (On the CPU reading the flag is no device sync.)
    restore_(params, backups);
    return;
  }
  const bool with_momentum = momentum != 0.0;
  check_restore_sgd_args(params, backups, grads, buffers, with_momentum);
  const auto chunks = chunk_table(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "imbsam_fast::restore_sgd_",
                                  [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto o_lr = static_cast<opmath_t>(lr);
    const auto o_m = static_cast<opmath_t>(momentum);
    const auto o_keep = static_cast<opmath_t>(1.0 - dampening);
    const auto o_wd = static_cast<opmath_t>(weight_decay);
    for_each_chunk<scalar_t>(chunks, [&](const Chunk& ch) {
      scalar_t* w = params[ch.tensor].data_ptr<scalar_t>() + ch.begin;
      const scalar_t* b = backups[ch.tensor].const_data_ptr<scalar_t>() + ch.begin;
      const scalar_t* g = grads[ch.tensor].const_data_ptr<scalar_t>() + ch.begin;
      scalar_t* m = with_momentum ? buffers[ch.tensor].data_ptr<scalar_t>() + ch.begin : nullptr;
      const int64_t n = ch.end - ch.begin;
      sgd_dispatch(maximize, weight_decay != 0.0, with_momentum, nesterov, [&](auto mx, auto wd, auto mom, auto nest) {
        sgd_loop<scalar_t, opmath_t, decltype(mx)::value, decltype(wd)::value, decltype(mom)::value,
                 decltype(nest)::value>(w, b, g, m, n, o_lr, o_m, o_keep, o_wd);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY(imbsam_fast, m) {
  m.def("sq_norm(Tensor[] tensors) -> Tensor");
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sq_norm, float rho, "
        "float eps) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def("restore_sgd_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
        "Tensor? skip=None) -> ()");
}

TORCH_LIBRARY_IMPL(imbsam_fast, CPU, m) {
  m.impl("sq_norm", &sq_norm);
  m.impl("perturb_", &perturb_);
  m.impl("restore_", &restore_);
  m.impl("restore_sgd_", &restore_sgd_);
}

}  // namespace imbsam_fast
