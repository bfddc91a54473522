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

}  // namespace imbsam_fast
