// Argument checks shared by the CPU and CUDA kernels of the parameter ops (param_ops.cpp, param_ops_cuda.cu).
#pragma once

#include <ATen/ATen.h>

namespace imbsam_fast {

// Every tensor of the list on one device, of one dtype, and contiguous.
inline void check_list(at::TensorList ts, const char* what) {
  if (ts.empty()) return;
  const auto dtype = ts[0].scalar_type();
  const auto device = ts[0].device();
  for (const auto& t : ts) {
    TORCH_CHECK(t.device() == device && t.scalar_type() == dtype, "imbsam_fast: the tensors of ", what,
                " must share one device and dtype");
    TORCH_CHECK(t.is_contiguous(), "imbsam_fast: the tensors of ", what, " must be contiguous");
  }
}

// Two lists of the same length whose i-th tensors hold as many elements.
inline void check_parallel(at::TensorList a, at::TensorList b, const char* what) {
  TORCH_CHECK(a.size() == b.size(), "imbsam_fast: ", what, ": lists of different lengths");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), "imbsam_fast: ", what, ": tensor ", i, " differs in size");
  }
}

}  // namespace imbsam_fast
