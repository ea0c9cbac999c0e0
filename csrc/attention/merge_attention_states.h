// Validation of merge_attention_states, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace flash_attn_ext {

// out_a/out_b (..., D) of one floating dtype and device; lse_a/lse_b (...) float32 or float64.
void check_merge_inputs(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                        const at::Tensor& lse_b);

}  // namespace flash_attn_ext
