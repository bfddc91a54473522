// Shared by the CPU and CUDA kernels of the class-masked cross-entropy (class_masked_ce.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace imbsam_fast {

// The one message for a label outside [0, num_classes) (as imbsam_fast.labels.label_range_message).
std::string label_range_message(int64_t num_classes, int64_t ignore_index);

// Shapes, dtypes and devices of masked_ce_forward's inputs; ValueError (or RuntimeError) with a clear message.
void check_masked_ce_inputs(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& head_w,
                            const at::Tensor& tail_w);

// masked_ce_forward's inputs checked and laid out for a kernel (rows of unit stride, int64 labels,
// contiguous weights), and its outputs allocated: losses (B) fp32, G (B, C) in the logits' dtype,
// row weights (2, B) fp32.
struct MaskedCEForward {
  at::Tensor logits, targets, head_w, tail_w, losses, grad, row_w;
  int64_t batch, classes;
};
MaskedCEForward prepare_masked_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                          const at::Tensor& head_w, const at::Tensor& tail_w);

// masked_ce_backward's inputs checked (G (B, C), row weights (2, B)) and made contiguous (row weights fp32),
// and dx allocated like G.
struct MaskedCEBackward {
  at::Tensor grad, row_w, out;
  int64_t batch, classes;
};
MaskedCEBackward prepare_masked_ce_backward(const at::Tensor& grad, const at::Tensor& row_w);

}  // namespace imbsam_fast
