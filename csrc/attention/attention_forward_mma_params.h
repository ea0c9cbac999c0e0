// Arguments of the tensor-core forward and backward kernels, torch-free so that the kernels
// also compile in the host emulation of tests/native/cpp/test_mma_kernels_emulated.cpp.
#pragma once

#include <cstdint>

#include "../common/attention_semantics.h"

namespace flash_attn_ext::cuda {

struct MmaParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  // Element strides of (batch, head, position); features are contiguous.
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl;
  AttentionParams p;
  float scale_log2;  // softmax scale * log2(e): the kernel works in base 2 (exp2)
};

// Arguments of the tensor-core backward kernels (attention_backward_mma_kernel.cuh).
struct MmaBackwardParams {
  const void* q;
  const void* k;
  const void* v;
  const void* grad_out;
  const float* lse;    // (B, Hq, L), natural log
  const float* delta;  // (B, Hq, L): rowsum(dO * O)
  void* grad_q;
  void* grad_k;
  void* grad_v;
  // Element strides of (batch, head, position); features are contiguous.
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, do_sb, do_sh, do_sl;
  int64_t dq_sb, dq_sh, dq_sl, dk_sb, dk_sh, dk_sl, dv_sb, dv_sh, dv_sl;
  AttentionParams p;
  float scale_log2;  // softmax scale * log2(e)
};

}  // namespace flash_attn_ext::cuda
