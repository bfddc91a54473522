// CUDA kernels of the parameter ops (the same schemas as param_ops.cpp), multi-tensor style as in apex:
// the host writes one table of tensor pointers and sizes and one table of (tensor, chunk) pairs, copies
// them to the device (asynchronously, from pinned memory), and one launch covers every chunk of every
// tensor of the list. No host synchronization anywhere:
//
//   sq_norm   two stages: one partial sum per chunk (a fixed-order block reduction), then one block
//             adds the partials in chunk order, so the result is deterministic;
//   perturb_  reads the squared norm on the device: scale = rho / (sqrt(s) + eps);
//   restore_sgd_ takes an optional device-side flag: when it is non-zero the kernel only restores
//             (w <- b), so a skipped step needs no host decision.

#include "param_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace imbsam_fast {
namespace {

constexpr int kBlock = 512;
constexpr int64_t kChunk = 1 << 16;

template <typename T>
using opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Tables {
  at::Tensor pointers;  // int64 [tensors, lists + 1]: the lists' data pointers, then the tensor's numel
  at::Tensor chunks;    // int64 [chunks, 2]: (tensor, chunk index)
  int64_t n_chunks;
};

Tables make_tables(const std::vector<at::TensorList>& lists) {
  const int64_t nt = static_cast<int64_t>(lists[0].size());
  const int64_t k = static_cast<int64_t>(lists.size());
  const auto pinned = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  at::Tensor pointers = at::empty({nt, k + 1}, pinned);
  int64_t* p = pointers.data_ptr<int64_t>();
  std::vector<int64_t> chunks;
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t l = 0; l < k; ++l) p[t * (k + 1) + l] = reinterpret_cast<int64_t>(lists[l][t].data_ptr());
    const int64_t n = lists[0][t].numel();
    p[t * (k + 1) + k] = n;
    for (int64_t c = 0; c * kChunk < n; ++c) {
      chunks.push_back(t);
      chunks.push_back(c);
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size()) / 2;
  at::Tensor chunk_table = at::empty({std::max<int64_t>(n_chunks, 1), 2}, pinned);
  std::copy(chunks.begin(), chunks.end(), chunk_table.data_ptr<int64_t>());
  const auto device = lists[0][0].device();
  return {pointers.to(device, /*non_blocking=*/true), chunk_table.to(device, /*non_blocking=*/true), n_chunks};
}

struct ChunkRange {
  int64_t tensor, begin, end;
};

__device__ inline ChunkRange chunk_range(const int64_t* pointers, const int64_t* chunks, int k) {
  const int64_t t = chunks[2 * blockIdx.x];
  const int64_t begin = chunks[2 * blockIdx.x + 1] * kChunk;
  const int64_t n = pointers[t * (k + 1) + k];
  return {t, begin, min(n, begin + kChunk)};
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t shared[kBlock];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  return shared[0];
}

template <typename T, typename acc_t>
__global__ void sq_norm_partials(const int64_t* pointers, const int64_t* chunks, acc_t* partials) {
  const ChunkRange r = chunk_range(pointers, chunks, 1);
  const T* x = reinterpret_cast<const T*>(pointers[r.tensor * 2]);
  acc_t acc = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kBlock) {
    const acc_t v = static_cast<acc_t>(x[i]);
    acc += v * v;
  }
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename acc_t>
__global__ void sum_partials(const acc_t* partials, int64_t n, acc_t* out) {
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) acc += partials[i];
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) out[0] = total;
}

template <typename T>
__global__ void perturb_kernel(const int64_t* pointers, const int64_t* chunks, const opmath<T>* sq, opmath<T> rho,
                               opmath<T> eps) {
  const ChunkRange r = chunk_range(pointers, chunks, 3);
  T* w = reinterpret_cast<T*>(pointers[r.tensor * 4]);
  const T* g = reinterpret_cast<const T*>(pointers[r.tensor * 4 + 1]);
  T* b = reinterpret_cast<T*>(pointers[r.tensor * 4 + 2]);
  const opmath<T> scale = rho / (sqrt(sq[0]) + eps);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kBlock) {
    const T wi = w[i];
    b[i] = wi;
    w[i] = static_cast<T>(static_cast<opmath<T>>(wi) + scale * static_cast<opmath<T>>(g[i]));
  }
}

template <typename T>
__global__ void restore_kernel(const int64_t* pointers, const int64_t* chunks) {
  const ChunkRange r = chunk_range(pointers, chunks, 2);
  T* w = reinterpret_cast<T*>(pointers[r.tensor * 3]);
  const T* b = reinterpret_cast<const T*>(pointers[r.tensor * 3 + 1]);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kBlock) w[i] = b[i];
}

template <typename T>
__global__ void restore_sgd_kernel(const int64_t* pointers, const int64_t* chunks, const float* skip,
                                   opmath<T> lr, opmath<T> momentum, opmath<T> keep, opmath<T> wd, bool with_momentum,
                                   bool nesterov, bool maximize) {
  using M = opmath<T>;
  const ChunkRange r = chunk_range(pointers, chunks, 4);
  T* w = reinterpret_cast<T*>(pointers[r.tensor * 5]);
  const T* b = reinterpret_cast<const T*>(pointers[r.tensor * 5 + 1]);
  const T* g = reinterpret_cast<const T*>(pointers[r.tensor * 5 + 2]);
  T* m = reinterpret_cast<T*>(pointers[r.tensor * 5 + 3]);
  const bool restore_only = skip != nullptr && skip[0] != 0.f;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kBlock) {
    const M wi = static_cast<M>(b[i]);
    if (restore_only) {
      w[i] = b[i];
      continue;
    }
    M d = maximize ? -static_cast<M>(g[i]) : static_cast<M>(g[i]);
    if (wd != 0) d = static_cast<M>(static_cast<T>(fma(wi, wd, d)));
    if (with_momentum) {
      const M decayed = static_cast<M>(static_cast<T>(static_cast<M>(m[i]) * momentum));
      const T buf = static_cast<T>(fma(d, keep, decayed));
      m[i] = buf;
      d = nesterov ? static_cast<M>(static_cast<T>(fma(static_cast<M>(buf), momentum, d))) : static_cast<M>(buf);
    }
    w[i] = static_cast<T>(fma(d, -lr, wi));
  }
}

at::Tensor sq_norm_cuda(at::TensorList tensors) {
  check_list(tensors, "sq_norm");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const bool wide = tensors[0].scalar_type() == at::kDouble;
  const auto acc_options = tensors[0].options().dtype(wide ? at::kDouble : at::kFloat);
  at::Tensor out = at::zeros({}, acc_options);
  const Tables tables = make_tables({tensors});
  if (tables.n_chunks == 0) return out;
  at::Tensor partials = at::empty({tables.n_chunks}, acc_options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "imbsam_fast::sq_norm", [&] {
    using acc_t = opmath<scalar_t>;
    sq_norm_partials<scalar_t, acc_t><<<tables.n_chunks, kBlock, 0, stream>>>(
        tables.pointers.data_ptr<int64_t>(), tables.chunks.data_ptr<int64_t>(), partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials<acc_t><<<1, kBlock, 0, stream>>>(partials.data_ptr<acc_t>(), tables.n_chunks, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sq,
                  double rho, double eps) {
  if (params.empty()) return;
  check_perturb_args(params, grads, backups);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Tables tables = make_tables({params, grads, backups});
  if (tables.n_chunks == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "imbsam_fast::perturb_", [&] {
    using M = opmath<scalar_t>;
    const at::Tensor s = sq.to(params[0].device(), std::is_same_v<M, double> ? at::kDouble : at::kFloat);
    perturb_kernel<scalar_t><<<tables.n_chunks, kBlock, 0, stream>>>(
        tables.pointers.data_ptr<int64_t>(), tables.chunks.data_ptr<int64_t>(), s.data_ptr<M>(), static_cast<M>(rho),
        static_cast<M>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  if (params.empty()) return;
  check_restore_args(params, backups);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Tables tables = make_tables({params, backups});
  if (tables.n_chunks == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "imbsam_fast::restore_", [&] {
    restore_kernel<scalar_t><<<tables.n_chunks, kBlock, 0, stream>>>(tables.pointers.data_ptr<int64_t>(),
                                                                     tables.chunks.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void restore_sgd_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList buffers,
                      double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                      const std::optional<at::Tensor>& skip) {
  if (params.empty()) return;
  const bool with_momentum = momentum != 0.0;
  check_restore_sgd_args(params, backups, grads, buffers, with_momentum);
  const c10::cuda::CUDAGuard guard(params[0].device());
  // Without momentum the kernel never touches the buffer slot; the params stand in for it in the table.
  const Tables tables = make_tables({params, backups, grads, with_momentum ? buffers : params});
  if (tables.n_chunks == 0) return;
  at::Tensor flag;
  if (skip.has_value()) flag = skip->to(params[0].device(), at::kFloat);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "imbsam_fast::restore_sgd_", [&] {
    using M = opmath<scalar_t>;
    restore_sgd_kernel<scalar_t><<<tables.n_chunks, kBlock, 0, stream>>>(
        tables.pointers.data_ptr<int64_t>(), tables.chunks.data_ptr<int64_t>(),
        flag.defined() ? flag.data_ptr<float>() : nullptr, static_cast<M>(lr), static_cast<M>(momentum),
        static_cast<M>(1.0 - dampening), static_cast<M>(weight_decay), with_momentum, nesterov, maximize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam_fast, CUDA, m) {
  m.impl("sq_norm", &sq_norm_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("restore_sgd_", &restore_sgd_cuda);
}

}  // namespace imbsam_fast
