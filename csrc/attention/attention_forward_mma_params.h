// Arguments of the tensor-core forward kernel, torch-free so that the kernel also compiles in
// the host emulation of tests/cpp/test_mma_forward_emulated.cpp.
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

}  // namespace flash_attn_ext::cuda
