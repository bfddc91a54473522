// Argument checks shared by the CPU and CUDA kernels of the parameter ops (param_ops.cpp, param_ops_cuda.cu).
#pragma once

#include <ATen/ATen.h>

namespace imbsam_fast {

// What the kernels do not take (tensors on several devices or of several dtypes, non-contiguous ones) is a
// NotImplementedError in Python, raised before anything is written: the caller may then run the torch ops
// instead (imbsam_fast/backends/ext_ops.py). Anything else wrong with the arguments is a RuntimeError.

// Every tensor of the list on one device, of one dtype, and contiguous.
inline void check_list(at::TensorList ts, const char* what) {
  if (ts.empty()) return;
  const auto dtype = ts[0].scalar_type();
  const auto device = ts[0].device();
  for (const auto& t : ts) {
    TORCH_CHECK_NOT_IMPLEMENTED(t.device() == device && t.scalar_type() == dtype, "imbsam_fast: the tensors of ",
                                what, " must share one device and dtype");
    TORCH_CHECK_NOT_IMPLEMENTED(t.is_contiguous(), "imbsam_fast: the tensors of ", what, " must be contiguous");
  }
}

// Two non-empty lists checked by check_list hold tensors of the same device and dtype.
inline void check_same_kind(at::TensorList a, at::TensorList b, const char* what) {
  if (a.empty() || b.empty()) return;
  TORCH_CHECK_NOT_IMPLEMENTED(a[0].device() == b[0].device() && a[0].scalar_type() == b[0].scalar_type(),
                              "imbsam_fast: ", what, ": the lists must share one device and dtype");
}

// Two lists of the same length whose i-th tensors hold as many elements.
inline void check_parallel(at::TensorList a, at::TensorList b, const char* what) {
  TORCH_CHECK(a.size() == b.size(), "imbsam_fast: ", what, ": lists of different lengths");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), "imbsam_fast: ", what, ": tensor ", i, " differs in size");
  }
}

// The arguments of each op, checked the same way by its CPU and its CUDA kernel.
inline void check_perturb_args(at::TensorList params, at::TensorList grads, at::TensorList backups) {
  check_list(params, "params");
  check_list(grads, "grads");
  check_list(backups, "backups");
  check_parallel(params, grads, "perturb_");
  check_parallel(params, backups, "perturb_");
  check_same_kind(params, grads, "perturb_");
  check_same_kind(params, backups, "perturb_");
}

inline void check_restore_args(at::TensorList params, at::TensorList backups) {
  check_list(params, "params");
  check_list(backups, "backups");
  check_parallel(params, backups, "restore_");
  check_same_kind(params, backups, "restore_");
}

inline void check_restore_sgd_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                   at::TensorList buffers, bool with_momentum) {
  check_list(params, "params");
  check_list(backups, "backups");
  check_list(grads, "grads");
  check_parallel(params, backups, "restore_sgd_");
  check_parallel(params, grads, "restore_sgd_");
  check_same_kind(params, backups, "restore_sgd_");
  check_same_kind(params, grads, "restore_sgd_");
  if (with_momentum) {
    check_list(buffers, "momentum_buffers");
    check_parallel(params, buffers, "restore_sgd_");
    check_same_kind(params, buffers, "restore_sgd_");
  }
}

}  // namespace imbsam_fast
