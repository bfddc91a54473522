// CUDA kernels of the class-masked cross-entropy (math and ops in class_masked_ce.cpp).
//
// Forward: one block per row reads its logits twice: an online max / sum of exponentials (each thread
// over a strided slice, then (max, sum) pairs merged across the block), then G. A second, one-block
// kernel sums head and tail over the rows in a fixed order (deterministic). A bad label sets a device
// flag that a device-side assert checks: no host sync. Backward: one launch scales G row by row.

#include "class_masked_ce.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace imbsam_fast {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ void merge(acc_t& m, acc_t& z, acc_t m2, acc_t z2) {
  const acc_t hi = m > m2 ? m : m2;
  if (hi == -INFINITY) return;  // both empty
  z = z * exp(m - hi) + z2 * exp(m2 - hi);
  m = hi;
}

// (max, sum of exp(x - max)) and sum of x over the block; every thread gets the result.
template <typename acc_t>
__device__ void block_reduce(acc_t& m, acc_t& z, acc_t& sx) {
  __shared__ acc_t sm[kWarps], sz[kWarps], ss[kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    merge(m, z, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, z, off));
    sx += __shfl_xor_sync(0xffffffff, sx, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    sz[warp] = z;
    ss[warp] = sx;
  }
  __syncthreads();
  m = sm[0];
  z = sz[0];
  sx = ss[0];
  for (int w = 1; w < kWarps; ++w) {
    merge(m, z, sm[w], sz[w]);
    sx += ss[w];
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ logits, int64_t stride_row,
                               const int64_t* __restrict__ targets, const float* __restrict__ head_w,
                               const float* __restrict__ tail_w, int* __restrict__ bad_label,
                               float* __restrict__ losses, scalar_t* __restrict__ grad, float* __restrict__ row_a,
                               float* __restrict__ row_b, int64_t classes, int64_t ignore_index, float smoothing) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x;
  const int64_t y = targets[i];
  const bool in_range = y >= 0 && y < classes;
  const bool valid = in_range && y != ignore_index;
  const scalar_t* x = logits + i * stride_row;
  scalar_t* g = grad + i * classes;
  if (!valid) {
    if (threadIdx.x == 0) {
      if (y != ignore_index) atomicMax(bad_label, 1);
      losses[i] = 0.f;
      row_a[i] = 0.f;
      row_b[i] = 0.f;
    }
    for (int64_t k = threadIdx.x; k < classes; k += blockDim.x) g[k] = scalar_t(0);
    return;
  }
  acc_t m = -INFINITY, z = 0, sx = 0;
  for (int64_t k = threadIdx.x; k < classes; k += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[k]);
    merge(m, z, v, acc_t(1));
    sx += v;
  }
  block_reduce(m, z, sx);
  const acc_t lse = m + log(z);
  const acc_t s = smoothing;
  const acc_t s_over_c = s / static_cast<acc_t>(classes);
  if (threadIdx.x == 0) {
    losses[i] = static_cast<float>(lse - (acc_t(1) - s) * static_cast<acc_t>(x[y]) - s_over_c * sx);
    row_a[i] = head_w[y];
    row_b[i] = tail_w[y];
  }
  for (int64_t k = threadIdx.x; k < classes; k += blockDim.x) {
    const acc_t hot = k == y ? acc_t(1) - s : acc_t(0);
    g[k] = static_cast<scalar_t>(exp(static_cast<acc_t>(x[k]) - lse) - s_over_c - hot);
  }
}

// head = sum_i a_i l_i / B, tail = sum_i b_i l_i / B: one block, fixed order.
__global__ void weighted_sums_kernel(const float* __restrict__ losses, const float* __restrict__ row_a,
                                     const float* __restrict__ row_b, float* __restrict__ head,
                                     float* __restrict__ tail, int64_t batch, float inv_b) {
  __shared__ float sh[kThreads], st[kThreads];
  float h = 0.f, t = 0.f;
  for (int64_t i = threadIdx.x; i < batch; i += kThreads) {
    h += row_a[i] * losses[i];
    t += row_b[i] * losses[i];
  }
  sh[threadIdx.x] = h;
  st[threadIdx.x] = t;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) {
      sh[threadIdx.x] += sh[threadIdx.x + width];
      st[threadIdx.x] += st[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *head = sh[0] * inv_b;
    *tail = st[0] * inv_b;
  }
}

// dx_i = (g_h a_i / B + g_t b_i / B + g_l[i]) G_i; absent upstream gradients are null pointers.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ dx,
                                const float* __restrict__ row_a, const float* __restrict__ row_b,
                                const float* __restrict__ g_head, const float* __restrict__ g_tail,
                                const float* __restrict__ g_losses, int64_t classes, int64_t col_blocks,
                                float inv_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x / col_blocks;
  float w = 0.f;
  if (g_head) w += *g_head * row_a[i] * inv_b;
  if (g_tail) w += *g_tail * row_b[i] * inv_b;
  if (g_losses) w += g_losses[i];
  const int64_t k = (blockIdx.x % col_blocks) * blockDim.x + threadIdx.x;
  if (k < classes) dx[i * classes + k] = static_cast<scalar_t>(static_cast<acc_t>(w) * static_cast<acc_t>(grad[i * classes + k]));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_ce_forward_cuda(const Tensor& logits_in,
                                                                          const Tensor& targets_in,
                                                                          const Tensor& head_w_in,
                                                                          const Tensor& tail_w_in,
                                                                          int64_t ignore_index, double smoothing) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  auto [logits, targets, head_w, tail_w, losses, grad, row_w, batch, classes] =
      prepare_masked_ce_forward(logits_in, targets_in, head_w_in, tail_w_in);
  const auto f32 = losses.options();
  Tensor head = at::zeros({}, f32);
  Tensor tail = at::zeros({}, f32);
  Tensor bad_label = at::zeros({1}, logits.options().dtype(at::kInt));
  if (batch > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                    "imbsam_fast::masked_ce_forward_cuda", [&] {
      forward_kernel<scalar_t><<<batch, kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), logits.stride(0), targets.const_data_ptr<int64_t>(),
          head_w.const_data_ptr<float>(), tail_w.const_data_ptr<float>(), bad_label.data_ptr<int>(),
          losses.data_ptr<float>(), grad.data_ptr<scalar_t>(), row_w.data_ptr<float>(),
          row_w.data_ptr<float>() + batch, classes, ignore_index, static_cast<float>(smoothing));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    weighted_sums_kernel<<<1, kThreads, 0, stream>>>(losses.const_data_ptr<float>(), row_w.const_data_ptr<float>(),
                                                     row_w.const_data_ptr<float>() + batch, head.data_ptr<float>(),
                                                     tail.data_ptr<float>(), batch, 1.f / static_cast<float>(batch));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::_assert_async(bad_label.eq(0).squeeze(0), label_range_message(classes, ignore_index));
  }
  return {head, tail, losses, grad, row_w};
}

Tensor masked_ce_backward_cuda(const Tensor& grad_in, const Tensor& row_w_in, const std::optional<Tensor>& g_head,
                               const std::optional<Tensor>& g_tail, const std::optional<Tensor>& g_losses) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  auto [grad, row_w, out, batch, classes] = prepare_masked_ce_backward(grad_in, row_w_in);
  if (batch == 0 || classes == 0) return out;
  auto as_float = [](const std::optional<Tensor>& t) {
    return t.has_value() ? std::optional<Tensor>(t->to(at::kFloat).contiguous()) : std::nullopt;
  };
  const auto gh = as_float(g_head), gt = as_float(g_tail), gl = as_float(g_losses);
  const int64_t col_blocks = (classes + kThreads - 1) / kThreads;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "imbsam_fast::masked_ce_backward_cuda",
                                  [&] {
    backward_kernel<scalar_t><<<col_blocks * batch, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), row_w.const_data_ptr<float>(),
        row_w.const_data_ptr<float>() + batch, gh ? gh->const_data_ptr<float>() : nullptr,
        gt ? gt->const_data_ptr<float>() : nullptr, gl ? gl->const_data_ptr<float>() : nullptr, classes,
        col_blocks, 1.f / static_cast<float>(batch));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam_fast, CUDA, m) {
  m.impl("masked_ce_forward", &masked_ce_forward_cuda);
  m.impl("masked_ce_backward", &masked_ce_backward_cuda);
}

}  // namespace imbsam_fast
